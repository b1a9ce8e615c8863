"""Ray Data integration: a callable class for ``ray.data.Dataset.map_batches`` that sends rows to Triton.

Ray Data does the distribution (reading, partitioning, actors on many machines, retries of failed tasks);
this class does what the batch CLI does inside one batch: columns to inputs, requests of many rows with
many in flight, failures narrowed down to their rows. Each actor holds one
:class:`~tritonforge.client.AsyncClient` over the endpoint list (or a headless service's address,
``dns:///triton-headless.ns.svc:8001``) on an event loop of its own::

    import ray
    from tritonforge.batch import TritonPredictor

    ds = ray.data.read_parquet("s3://bucket/digits/")
    out = ds.map_batches(
        TritonPredictor,
        fn_constructor_kwargs={"model": "digits_mlp", "urls": ["10.0.0.5:8001", "10.0.0.6:8001"]},
        concurrency=4,              # actors, each with one client
        batch_size=1024,            # rows per call of the predictor (many requests each)
        batch_format="pyarrow",
    )

Nothing here imports ray: Ray calls the class like any other.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tritonforge.batch.columns import plan_inputs, prepare
from tritonforge.batch.engine import Engine, join_outputs
from tritonforge.errors import BatchError, ClientError

__all__ = ["ERROR_COLUMN", "TritonPredictor"]

ERROR_COLUMN = "error"


class TritonPredictor:
    """``fn(batch) -> batch`` for ``map_batches``: the input columns plus the model's outputs, and an
    ``error`` column (empty for answered rows, the reason for failed ones, whose outputs are zeros).

    Args:
        model: model or ensemble name; ``version``: None for the server's choice.
        urls: one gRPC endpoint or a list (the client balances over them; a headless service name works).
        mapping: ``{input: column | [columns] | "glob*"}`` (see :func:`~tritonforge.batch.plan_inputs`).
        outputs: outputs to keep (None: all).
        batch_size: rows per request (default: the model's ``max_batch_size``).
        concurrency: requests in flight per actor.
        keep_columns: input columns to pass through (None: all; ``[]``: none).
        on_error: ``"column"`` (default) records failed rows in the ``error`` column; ``"raise"`` raises
            (Ray then retries the task or fails the dataset).
        client_options: passed to :class:`~tritonforge.client.AsyncClient`.

    Raises:
        BatchError: the model is not on the servers, or the columns don't fit its inputs; with
            ``on_error="raise"``, a batch with failed rows.
    """

    def __init__(
        self,
        model: str,
        urls: str | Sequence[str],
        *,
        version: str | int | None = None,
        mapping: Mapping[str, str | Sequence[str]] | None = None,
        outputs: Sequence[str] | None = None,
        batch_size: int | None = None,
        concurrency: int = 8,
        keep_columns: Sequence[str] | None = None,
        on_error: str = "column",
        timeout_s: float | None = None,
        client_options: Mapping[str, Any] | None = None,
    ) -> None:
        if on_error not in ("column", "raise"):
            raise ValueError("on_error must be 'column' or 'raise'")
        from tritonforge.client import AsyncClient

        self.model = model
        self.version = None if version is None else str(version)
        self.mapping = dict(mapping or {})
        self.keep_columns = None if keep_columns is None else list(keep_columns)
        self.on_error = on_error
        self.concurrency = max(1, concurrency)
        # one loop per actor, on its own thread: Ray may call from a thread that already runs a loop
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tritonforge-predictor", daemon=True
        )
        self._thread.start()
        self._client = AsyncClient(urls, **dict(client_options or {}))
        try:
            meta, config = self._wait(self._describe())
        except ClientError as exc:
            self.close()
            raise BatchError(f"model {model!r}: {exc.message}") from exc
        self._inputs = meta.inputs
        self._batched = int(config.max_batch_size) > 0
        limit = int(config.max_batch_size) if self._batched else 1
        self._outputs = list(outputs) if outputs else [t.name for t in meta.outputs]
        self._output_meta = {t.name: t for t in meta.outputs}
        self._engine = Engine(
            self._client,
            model,
            version=self.version,
            batched=self._batched,
            batch_size=min(batch_size or limit, limit),
            outputs=self._outputs,
            timeout_s=timeout_s,
        )
        self._plans: Any = None

    async def _describe(self) -> tuple[Any, Any]:
        meta = await self._client.model_metadata(self.model, self.version)
        config = await self._client.model_config(self.model, self.version)
        return meta, config

    def _wait(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __call__(self, batch: Any) -> Any:
        """Answer one batch (a pyarrow Table, a pandas DataFrame or a dict of numpy arrays)."""
        import pyarrow as pa

        table = _as_table(batch)
        if self._plans is None:
            self._plans = plan_inputs(self._inputs, self._batched, table.schema.names, self.mapping)
        prepared = prepare(table, self._plans)
        n = table.num_rows
        results = self._wait(self._answer(prepared.arrays))
        errors = [""] * n
        for pos, reason in prepared.bad.items():
            errors[pos] = f"input: {reason}"
        parts = []
        for result in results:
            for p, reason in result.failed.items():
                errors[int(prepared.rows[p])] = f"model: {reason}"
            if len(result.rows):
                parts.append((prepared.rows[result.rows], result.outputs))
        failed = [e for e in errors if e]
        if failed and self.on_error == "raise":
            raise BatchError(f"{len(failed)} of {n} rows failed; first: {failed[0]}", model=self.model)
        keep = table.schema.names if self.keep_columns is None else self.keep_columns
        out: dict[str, Any] = {name: table.column(name) for name in keep}
        joined = join_outputs([p[1] for p in parts]) if parts else {}
        positions = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
        for name in self._outputs:
            if name in joined:
                value = joined[name]
                full = np.zeros((n, *value.shape[1:]), dtype=value.dtype)
                if value.dtype == object:
                    full[...] = b""
                full[positions] = value
            else:  # every row failed: no shape to go by beyond the model's dims
                dims = tuple(max(d, 0) for d in self._output_meta[name].shape[1 if self._batched else 0 :])
                full = np.zeros((n, *dims), dtype=np.float32)
            out[name] = _arrow(full)
        out[ERROR_COLUMN] = pa.array(errors, pa.string())
        return pa.table(out)

    async def _answer(self, arrays: Mapping[str, np.ndarray]) -> list[Any]:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(rows: np.ndarray) -> Any:
            async with gate:
                return await self._engine.run(arrays, rows)

        return list(await asyncio.gather(*(one(rows) for rows in self._engine.batches(arrays))))

    def close(self) -> None:
        """Close the client and stop the actor's event loop."""
        if self._loop.is_closed():
            return
        with _suppress():
            self._wait(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __del__(self) -> None:
        with _suppress():
            self.close()


def _suppress() -> Any:
    import contextlib

    return contextlib.suppress(Exception)


def _as_table(batch: Any) -> Any:
    import pyarrow as pa

    from tritonforge.batch.sources import numpy_to_arrow

    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    if isinstance(batch, Mapping):
        return pa.table({k: numpy_to_arrow(np.asarray(v)) for k, v in batch.items()})
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # pandas
        return pa.Table.from_pandas(batch, preserve_index=False)
    raise BatchError(
        f"TritonPredictor got a batch of type {type(batch).__name__}; use batch_format='pyarrow'"
    )


def _arrow(array: np.ndarray) -> Any:
    from tritonforge.batch.columns import outputs_to_arrow

    return outputs_to_arrow("", array, False)
