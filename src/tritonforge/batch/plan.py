"""A batch run's plan, made before any request: its options checked, the output folder refused early
when it can't be one, the model's inputs mapped to the dataset's columns, and the shards: which are this
process's (``shard=(K, N)``), which are finished already (resuming), and how many rows each holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonforge.batch.columns import InputPlan, plan_inputs
from tritonforge.batch.sources import Dataset, digest
from tritonforge.batch.store import Manifest
from tritonforge.errors import BatchError, ClientError

__all__ = [
    "ModelPlan",
    "Shard",
    "ShardPlan",
    "check_options",
    "check_output",
    "parse_shard",
    "plan_model",
    "plan_shards",
]


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> ``(K, N)`` with ``0 <= K < N``.

    Raises:
        ValueError: not of that form.
    """
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected K/N, e.g. 0/4 (process 0 of 4)") from None
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"--shard {text!r}: K must be in 0..N-1 and N >= 1")
    return k, n


def _count_option(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be a whole number >= {least}, not {value!r}")


def _seconds_option(name: str, value: Any, *, zero: bool) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        least = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {least}, not {value!r}")


def check_options(
    shard_rows: Any, concurrency: Any, batch_size: Any, timeout_s: Any, grace_s: Any, max_errors: Any
) -> None:
    """Refuse a run's options up front (a negative timeout would fail every row, one by one).

    Raises:
        ValueError: naming the option and what it takes.
    """
    _count_option("shard_rows", shard_rows, 1)
    _count_option("concurrency", concurrency, 1)
    if batch_size is not None:
        _count_option("batch_size", batch_size, 1)
    if max_errors is not None:
        _count_option("max_errors", max_errors, 0)
    if timeout_s is not None:
        _seconds_option("timeout_s", timeout_s, zero=False)
    _seconds_option("grace_s", grace_s, zero=True)


def check_output(root: Path) -> None:
    """Refuse an output folder that is a file, or lies under one, before anything is read or sent.

    Raises:
        BatchError: naming the file.
    """
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is a file" if folder == root else f"lies under {folder}, which is a file"
                raise BatchError(f"output folder {root} {what}; give a folder (it is created if missing)")
            return


@dataclass
class Shard:
    index: int
    first_row: int
    rows: int
    table: Any = None


@dataclass
class ModelPlan:
    """What the model asks of a run: its config, its inputs mapped to columns, the outputs to keep."""

    config: Any
    plans: list[InputPlan]
    outputs: list[str]
    variable: dict[str, bool]  # per output: a dimension after the batch one is variable
    batch_size: int


async def plan_model(
    client: Any,
    model: str,
    version: str | None,
    columns: Any,
    mapping: Mapping[str, str | Sequence[str]] | None,
    outputs: Sequence[str] | None,
    batch_size: int | None,
) -> ModelPlan:
    """The model's metadata and config, its inputs mapped to ``columns``, the outputs checked.

    Raises:
        BatchError: a model that isn't there, a mapping that doesn't fit, outputs the model lacks.
    """
    try:
        meta = await client.model_metadata(model, version)
        config = await client.model_config(model, version)
    except ClientError as exc:
        raise BatchError(exc.message, model=model, endpoint=exc.endpoint) from exc
    batched = int(config.max_batch_size) > 0
    plans = plan_inputs(meta.inputs, batched, columns, mapping)
    out_names = list(outputs) if outputs else [t.name for t in meta.outputs]
    unknown = sorted(set(out_names) - {t.name for t in meta.outputs})
    if unknown:
        raise BatchError(
            f"--output-name names outputs model {model!r} doesn't have: {unknown}; it has "
            f"{[t.name for t in meta.outputs]}"
        )
    variable = {t.name: any(d < 0 for d in t.shape[1 if batched else 0 :]) for t in meta.outputs}
    limit = int(config.max_batch_size) if batched else 1
    size = min(batch_size or limit, limit) if batched else 1
    return ModelPlan(config, plans, out_names, variable, size)


@dataclass
class ShardPlan:
    """This process's shards: all of them (``mine``), those left to do, their rows, and the manifest."""

    manifest: Manifest
    mine: list[int]
    todo: list[int]
    rows_of: dict[int, int]
    shard_rows: int
    failed_before: int

    @property
    def rows_total(self) -> int:
        return sum(self.rows_of.values())

    @property
    def rows_skipped(self) -> int:
        return sum(self.rows_of[i] for i in self.mine if i in self.manifest.done)

    def shards_to_do(self) -> list[Shard]:
        return [Shard(i, i * self.shard_rows, self.rows_of[i]) for i in self.todo]


def plan_shards(
    root: Path,
    model: str,
    version: str | None,
    dataset: Dataset,
    plan: ModelPlan,
    shard_rows: int,
    shard: tuple[int, int],
) -> ShardPlan:
    """Open the output folder's manifest for these settings and find this process's shards left to do
    (removing the temporaries an earlier, stopped run left)."""
    k, n = shard
    settings = {
        "model": model,
        "version": version,
        "input": dataset.fingerprint(),
        "inputs": [p.as_dict() for p in plan.plans],
        "outputs": plan.outputs,
        "shard_rows": shard_rows,
        "shard": f"{k}/{n}",
    }
    manifest = Manifest(root, (k, n), {**settings, "digest": digest(settings)})
    n_shards = math.ceil(dataset.rows / shard_rows)
    mine = [i for i in range(n_shards) if i % n == k]
    todo = [i for i in mine if i not in manifest.done]
    manifest.clean_temporaries(set(mine))
    rows_of = {i: min(shard_rows, dataset.rows - i * shard_rows) for i in mine}
    _, failed_before = manifest.totals()
    return ShardPlan(manifest, mine, todo, rows_of, shard_rows, failed_before)
