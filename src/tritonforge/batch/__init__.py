"""Batch inference over datasets: files in, Parquet shards out, resumable, honest about failures.

    from tritonforge.batch import run_batch, read_outputs, read_errors

    result = run_batch("digits_mlp", ["127.0.0.1:8001"], "digits/*.parquet", "out/",
                       mapping={"input": "pixel_*"}, shard=(0, 1), max_errors=100)
    table = read_outputs("out/")             # row_id + outputs, every finished shard
    print(result.rows_ok, result.rows_failed, result.exit_code)

The CLI is ``tritonforge batch-infer``. Beyond one machine: :class:`TritonPredictor` for Ray Data's
``map_batches``, or N processes with ``shard=(K, N)`` (a Kubernetes Indexed Job). Needs the ``[batch]``
extra (pyarrow; ray for Ray Data).

Modules: ``sources`` (reading files), ``columns`` (columns <-> tensors), ``engine`` (rows through the
client), ``store`` (shards and the manifest), ``run`` (the resumable run), ``ray_data`` (the Ray adapter).
"""

from __future__ import annotations

from tritonforge.batch.columns import InputPlan, plan_inputs
from tritonforge.batch.ray_data import ERROR_COLUMN, TritonPredictor
from tritonforge.batch.run import (
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TOO_MANY_FAILURES,
    BatchResult,
    ServerSplit,
    arun_batch,
    parse_shard,
    run_batch,
)
from tritonforge.batch.sources import Dataset, open_dataset
from tritonforge.batch.store import read_errors, read_outputs

__all__ = [
    "ERROR_COLUMN",
    "EXIT_FAILED_ROWS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TOO_MANY_FAILURES",
    "BatchResult",
    "Dataset",
    "InputPlan",
    "ServerSplit",
    "TritonPredictor",
    "arun_batch",
    "open_dataset",
    "parse_shard",
    "plan_inputs",
    "read_errors",
    "read_outputs",
    "run_batch",
]
