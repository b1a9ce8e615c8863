"""A batch run: a dataset through a model into Parquet shards; resumable, preemption-safe, honest.

The rows are cut into shards of ``shard_rows`` consecutive row ids (shard ``i`` holds rows
``[i * shard_rows, (i + 1) * shard_rows)``); ``shard=(K, N)`` takes the shards ``i`` with ``i % N == K``,
so N processes (a Kubernetes Indexed Job) share the work without talking to each other. Shards are
processed a few at a time, each as requests of ``batch_size`` rows with ``concurrency`` requests in flight,
and committed to the output folder as they finish (see :mod:`tritonforge.batch.store`). A run started
again on the same folder skips the finished shards.

On SIGTERM / SIGINT (with ``handle_signals``): no new shard starts, the shards under way go on until they
finish or ``grace_s`` is spent, then what is left is abandoned (it is redone next time) and the run returns
with ``status == "interrupted"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tritonforge.batch.columns import InputPlan, outputs_to_arrow, plan_inputs, prepare
from tritonforge.batch.engine import Engine, RowResult
from tritonforge.batch.sources import Dataset, digest, open_dataset
from tritonforge.batch.store import Manifest
from tritonforge.errors import BatchError, ClientError

if TYPE_CHECKING:  # the client is imported where it is used, as AsyncClient is
    from tritonforge.client._stats import Counters

__all__ = [
    "EXIT_FAILED_ROWS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TOO_MANY_FAILURES",
    "BatchResult",
    "ServerSplit",
    "arun_batch",
    "parse_shard",
    "run_batch",
]

EXIT_OK = 0
EXIT_FAILED_ROWS = 3  # finished; some rows are in the errors files
EXIT_TOO_MANY_FAILURES = 4  # stopped at --max-errors; finished shards kept
EXIT_INTERRUPTED = 143  # SIGTERM / SIGINT: stopped cleanly; run again to resume

Event = Callable[[str, Mapping[str, Any]], None]


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


@dataclass(frozen=True)
class ServerSplit:
    """Triton's own view of the run, from its statistics API (summed over endpoints): requests, rows,
    executions and the mean µs per request in queue and in compute (input, infer, output)."""

    model: str
    requests: int
    inferences: int
    executions: int
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float

    @property
    def mean_batch(self) -> float:
        return self.inferences / self.executions if self.executions else 0.0


@dataclass
class BatchResult:
    """What a run did. ``status``: ``complete``, ``interrupted`` or ``too many failures``."""

    status: str
    output: Path
    rows_total: int  # rows of this process's shards
    rows_skipped: int  # already done by an earlier run
    rows_ok: int  # answered in this run
    rows_failed: int  # failed in this run
    shards_total: int
    shards_done: int  # finished shards, earlier runs included
    elapsed_s: float
    requests: int
    latencies_ms: dict[str, float]
    server: list[ServerSplit] = field(default_factory=list)
    failed_before: int = 0

    @property
    def rows_per_s(self) -> float:
        return (self.rows_ok + self.rows_failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.status == "interrupted":
            return EXIT_INTERRUPTED
        if self.status == "too many failures":
            return EXIT_TOO_MANY_FAILURES
        return EXIT_FAILED_ROWS if self.rows_failed + self.failed_before else EXIT_OK


@dataclass
class _Shard:
    index: int
    first_row: int
    rows: int
    table: Any = None


def run_batch(
    model: str, urls: str | Sequence[str], input: Any, output: str | Path, **options: Any
) -> BatchResult:
    """Run ``model`` over the dataset at ``input`` into ``output`` (see :func:`arun_batch`); blocking.

    Example:
        >>> result = run_batch("digits_mlp", "127.0.0.1:8001", "digits/*.parquet", "out/")   # doctest: +SKIP
        >>> result.rows_ok, result.rows_failed, result.exit_code

    Raises:
        BatchError: bad input, mapping or output folder; the server unreachable (finished shards kept).
    """
    return asyncio.run(arun_batch(model, urls, input, output, **options))


async def arun_batch(
    model: str,
    urls: str | Sequence[str],
    input: Any,
    output: str | Path,
    *,
    version: str | int | None = None,
    mapping: Mapping[str, str | Sequence[str]] | None = None,
    outputs: Sequence[str] | None = None,
    batch_size: int | None = None,
    concurrency: int = 8,
    shard_rows: int = 10_000,
    shard: tuple[int, int] = (0, 1),
    max_errors: int | None = 1000,
    grace_s: float = 20.0,
    handle_signals: bool = False,
    timeout_s: float | None = None,
    on_event: Event | None = None,
    client_options: Mapping[str, Any] | None = None,
) -> BatchResult:
    """Run ``model`` on every row of ``input`` (:func:`~tritonforge.batch.open_dataset`: a file, folder,
    glob or list) and write ``row_id`` + outputs as Parquet shards into ``output``.

    Args:
        urls: one Triton gRPC endpoint or several (the client balances over them).
        mapping: ``{input: column | [columns] | "glob*"}``; unmapped inputs take the column of their name.
        outputs: outputs to keep (None: all the model has).
        batch_size: rows per request (default and maximum: the model's ``max_batch_size``).
        concurrency: requests in flight.
        shard_rows: rows per output shard (the unit of resuming).
        shard: ``(K, N)``: this process takes shards ``i % N == K``.
        max_errors: stop once more rows than this have failed (all runs on the folder counted);
            None: no limit.
        grace_s: after SIGTERM, how long shards under way may take to finish.
        handle_signals: stop cleanly on SIGTERM / SIGINT (the CLI does; a library caller may not want it).
        on_event: ``fn(kind, data)`` for progress: ``start``, ``rows``, ``shard``, ``stopping``, ``done``.
        client_options: passed to :class:`~tritonforge.client.AsyncClient` (retry, deadline, tls, ...).

    Raises:
        BatchError: bad input, mapping or output folder; a model that isn't there; the servers unreachable
            mid-run (the finished shards are kept: run again to resume).
    """
    from tritonforge.client import AsyncClient

    if shard_rows < 1:
        raise ValueError("shard_rows must be at least 1")
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    k, n = shard
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard {shard}: K must be in 0..N-1")
    emit = on_event or (lambda kind, data: None)
    started = time.perf_counter()
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise BatchError("no Triton endpoint given (--url HOST:PORT)")
    dataset = await asyncio.to_thread(open_dataset, input)
    if dataset.rows == 0:
        raise BatchError(f"{input}: the input has no rows")
    columns = await asyncio.to_thread(dataset.columns)
    v = None if version is None else str(version)
    options = dict(client_options or {})
    async with AsyncClient(url_list, **options) as client:
        try:
            meta = await client.model_metadata(model, v)
            config = await client.model_config(model, v)
        except ClientError as exc:
            raise BatchError(exc.message, model=model, endpoint=exc.endpoint) from exc
        batched = int(config.max_batch_size) > 0
        plans = plan_inputs(meta.inputs, batched, columns, mapping)
        out_names = list(outputs) if outputs else [t.name for t in meta.outputs]
        unknown = sorted(set(out_names) - {t.name for t in meta.outputs})
        if unknown:
            raise BatchError(
                f"--outputs names outputs model {model!r} doesn't have: {unknown}; it has "
                f"{[t.name for t in meta.outputs]}"
            )
        variable = {t.name: any(d < 0 for d in t.shape[1 if batched else 0 :]) for t in meta.outputs}
        limit = int(config.max_batch_size) if batched else 1
        size = min(batch_size or limit, limit) if batched else 1
        settings = {
            "model": model,
            "version": v,
            "input": dataset.fingerprint(),
            "inputs": [p.as_dict() for p in plans],
            "outputs": out_names,
            "shard_rows": shard_rows,
            "shard": f"{k}/{n}",
        }
        root = Path(output)
        manifest = Manifest(root, (k, n), {**settings, "digest": digest(settings)})
        n_shards = math.ceil(dataset.rows / shard_rows)
        mine = [i for i in range(n_shards) if i % n == k]
        todo = [i for i in mine if i not in manifest.done]
        manifest.clean_temporaries(set(mine))
        rows_of = {i: min(shard_rows, dataset.rows - i * shard_rows) for i in mine}
        rows_total = sum(rows_of.values())
        rows_skipped = sum(rows_of[i] for i in mine if i in manifest.done)
        _, failed_before = manifest.totals()
        engine = Engine(
            client, model, version=v, batched=batched, batch_size=size, outputs=out_names, timeout_s=timeout_s
        )
        stats_models = await _composing(client, model, config)
        before = await _statistics(url_list, stats_models, options)
        runner = _Runner(
            engine=engine,
            manifest=manifest,
            dataset=dataset,
            plans=plans,
            variable=variable,
            shard_rows=shard_rows,
            concurrency=concurrency,
            max_errors=max_errors,
            failed_before=failed_before,
            grace_s=grace_s,
            emit=emit,
        )
        emit(
            "start",
            {
                "model": model,
                "rows_total": rows_total,
                "rows_skipped": rows_skipped,
                "shards_total": len(mine),
                "shards_todo": len(todo),
                "batch_size": size,
                "concurrency": concurrency,
                "failed_before": failed_before,
            },
        )
        with _signals(runner, handle_signals):
            await runner.run([_Shard(i, i * shard_rows, rows_of[i]) for i in todo])
        after = await _statistics(url_list, stats_models, options)
    elapsed = time.perf_counter() - started
    lat = np.array(engine.latencies_s) * 1e3
    result = BatchResult(
        status=runner.status,
        output=root,
        rows_total=rows_total,
        rows_skipped=rows_skipped,
        rows_ok=runner.rows_ok,
        rows_failed=runner.rows_failed,
        shards_total=len(mine),
        shards_done=len(manifest.done & set(mine)),
        elapsed_s=elapsed,
        requests=engine.requests,
        latencies_ms={
            "p50": float(np.percentile(lat, 50)) if len(lat) else 0.0,
            "p99": float(np.percentile(lat, 99)) if len(lat) else 0.0,
            "mean": float(lat.mean()) if len(lat) else 0.0,
        },
        server=_splits(before, after),
        failed_before=failed_before,
    )
    emit("done", {"result": result})
    if runner.fatal is not None:
        raise runner.fatal
    return result


class _Runner:
    """The event-loop side of a run: reads shards ahead, keeps ``concurrency`` requests in flight across
    at most two shards at a time, commits each shard when its last request is answered."""

    OPEN_SHARDS = 2

    def __init__(
        self,
        *,
        engine: Engine,
        manifest: Manifest,
        dataset: Dataset,
        plans: list[InputPlan],
        variable: Mapping[str, bool],
        shard_rows: int,
        concurrency: int,
        max_errors: int | None,
        failed_before: int,
        grace_s: float,
        emit: Event,
    ) -> None:
        self.engine = engine
        self.manifest = manifest
        self.dataset = dataset
        self.plans = plans
        self.variable = variable
        self.shard_rows = shard_rows
        self.slots = asyncio.Semaphore(concurrency)
        self.max_errors = max_errors
        self.failed_before = failed_before
        self.grace_s = grace_s
        self.emit = emit
        self.status = "complete"
        self.rows_ok = 0
        self.rows_failed = 0
        self.stopping = False
        self.fatal: BaseException | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending_failures = 0
        self._grace_task: asyncio.Task[None] | None = None

    # -- stopping ----------------------------------------------------------------------------------------

    def interrupt(self) -> None:
        """SIGTERM / SIGINT: start no new shard; abandon the shards under way after ``grace_s``."""
        if self.stopping:
            return
        self.stopping = True
        self.status = "interrupted"
        self.emit("stopping", {"reason": "signal", "grace_s": self.grace_s})
        self._grace_task = asyncio.get_running_loop().create_task(self._abandon_after(self.grace_s))

    async def _abandon_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._cancel_all()

    def _cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _stop_now(self, status: str, fatal: BaseException | None = None) -> None:
        if fatal is not None and self.fatal is None:
            self.fatal = fatal
        if not self.stopping or status != "interrupted":
            self.status = status
        self.stopping = True
        self._cancel_all()

    # -- the work ----------------------------------------------------------------------------------------

    async def run(self, shards: list[_Shard]) -> None:
        if not shards:
            return
        open_shards = asyncio.Semaphore(self.OPEN_SHARDS)
        workers: set[asyncio.Task[None]] = set()
        reader = _Reader(self.dataset, self.shard_rows, shards)
        try:
            while not self.stopping:
                await open_shards.acquire()
                if self.stopping:
                    break
                shard = await asyncio.to_thread(reader.next)
                if shard is None or self.stopping:
                    open_shards.release()
                    break
                slot = _Slot(open_shards)
                task = asyncio.get_running_loop().create_task(self._shard(shard, slot))
                workers.add(task)
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._worker_done, slot=slot, workers=workers))
            if workers:
                await asyncio.gather(*workers, return_exceptions=True)
        finally:
            if self._grace_task is not None:
                self._grace_task.cancel()

    def _worker_done(self, task: asyncio.Task[None], slot: _Slot, workers: set[asyncio.Task[None]]) -> None:
        slot.release()
        workers.discard(task)
        self._tasks.discard(task)

    async def _shard(self, shard: _Shard, slot: _Slot) -> None:
        try:
            await self._do_shard(shard, slot)
        except asyncio.CancelledError:
            return  # abandoned: the shard is redone by the next run
        except Exception as exc:  # a bug or a disk error: stop, keep what is committed, say what happened
            self._stop_now("failed", exc)

    async def _do_shard(self, shard: _Shard, slot: _Slot) -> None:
        try:
            prepared = await asyncio.to_thread(prepare, shard.table, self.plans)
            errors: list[dict[str, Any]] = [
                {"row_id": shard.first_row + i, "stage": "input", "error": reason}
                for i, reason in sorted(prepared.bad.items())
            ]
            self._count_failures(len(errors))
            if errors:
                self.emit("rows", {"rows": len(errors), "failed": len(errors)})
            batches = self.engine.batches(prepared.arrays)
            requests = []
            for rows in batches:
                await self.slots.acquire()
                if self.stopping and self.status != "interrupted":
                    self.slots.release()
                    return
                t = asyncio.get_running_loop().create_task(self.engine.run(prepared.arrays, rows))
                t.add_done_callback(self._request_done)
                requests.append(t)
            results: list[RowResult] = list(await asyncio.gather(*requests))
            slot.release()  # answered: the next shard may start while this one is written
        except asyncio.CancelledError:
            for t in locals().get("requests", []):
                t.cancel()
            return  # abandoned: the shard is redone by the next run
        except ClientError as exc:
            for t in locals().get("requests", []):
                t.cancel()
            self._stop_now(
                "failed",
                BatchError(
                    f"stopped: {exc.message}; {len(self.manifest.done)} shards are finished — run the "
                    "same command again to resume",
                    model=exc.model,
                    endpoint=exc.endpoint,
                ),
            )
            return
        ok_tables = []
        failed_here = 0
        for result in results:
            pos = prepared.rows  # positions of good rows in the shard table
            for p, reason in sorted(result.failed.items()):
                errors.append({"row_id": shard.first_row + int(pos[p]), "stage": "model", "error": reason})
                failed_here += 1
            if len(result.rows):
                ok_tables.append((shard.first_row + pos[result.rows], result.outputs))
        self._count_failures(failed_here)
        if self.status == "too many failures":
            return
        table = await asyncio.to_thread(self._table, ok_tables)
        errors.sort(key=lambda e: e["row_id"])
        ok = 0 if table is None else table.num_rows
        await asyncio.shield(
            asyncio.to_thread(
                self.manifest.commit,
                shard.index,
                table,
                errors,
                {"first_row": shard.first_row, "rows": shard.rows, "rows_ok": ok, "rows_failed": len(errors)},
            )
        )
        self.rows_ok += ok
        self.rows_failed += len(errors)
        self.emit(
            "shard", {"index": shard.index, "rows": shard.rows, "rows_ok": ok, "rows_failed": len(errors)}
        )

    def _request_done(self, task: asyncio.Task[RowResult]) -> None:
        self.slots.release()
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        self.emit("rows", {"rows": len(result.rows) + len(result.failed), "failed": len(result.failed)})

    def _count_failures(self, count: int) -> None:
        if not count:
            return
        self._pending_failures += count
        if self.max_errors is not None and self.failed_before + self._pending_failures > self.max_errors:
            self.emit("stopping", {"reason": "too many failures", "max_errors": self.max_errors})
            self._stop_now("too many failures")

    def _table(self, parts: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> Any:
        import pyarrow as pa

        if not parts:
            return None
        tables = []
        for row_ids, outs in parts:
            cols = {"row_id": pa.array(np.asarray(row_ids, dtype=np.int64))}
            for name in self.engine.outputs or sorted(outs):  # one column order for every batch
                cols[name] = outputs_to_arrow(name, outs[name], self.variable.get(name, False))
            tables.append(pa.table(cols))
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        return table.sort_by("row_id").combine_chunks()


class _Slot:
    """One shard's place among the shards under way, given back once (when answered, or at the end)."""

    def __init__(self, gate: asyncio.Semaphore) -> None:
        self.gate = gate
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.gate.release()


class _Reader:
    """Reads the shards to do, in order, from one pass over the dataset (skipping what isn't needed)."""

    def __init__(self, dataset: Dataset, shard_rows: int, shards: list[_Shard]) -> None:
        self.shards = list(shards)
        self.shard_rows = shard_rows
        self._stream = dataset.read(self.shards[0].first_row) if self.shards else iter(())
        self._pending: list[tuple[int, Any]] = []  # (first row, batch) read but not yet used

    def next(self) -> _Shard | None:
        import pyarrow as pa

        if not self.shards:
            return None
        shard = self.shards.pop(0)
        start, stop = shard.first_row, shard.first_row + shard.rows
        pieces = []
        while True:
            if not self._pending:
                item = next(self._stream, None)
                if item is None:
                    break
                self._pending.append(item)
            first, batch = self._pending[0]
            end = first + batch.num_rows
            if end <= start:
                self._pending.pop(0)
                continue
            if first >= stop:
                break
            lo, hi = max(start, first), min(stop, end)
            pieces.append(batch.slice(lo - first, hi - lo))
            if end <= stop:
                self._pending.pop(0)
            if hi >= stop:
                break
        table = pa.Table.from_batches(pieces) if pieces else None
        if table is None or table.num_rows != shard.rows:
            raise BatchError(
                f"shard {shard.index}: expected {shard.rows} rows from row {start}, read "
                f"{0 if table is None else table.num_rows}; did the input change?"
            )
        shard.table = table
        return shard


@contextlib.contextmanager
def _signals(runner: _Runner, enabled: bool) -> Any:
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    sigs = (signal.SIGTERM, signal.SIGINT)
    for sig in sigs:
        loop.add_signal_handler(sig, runner.interrupt)
    try:
        yield
    finally:
        for sig in sigs:
            loop.remove_signal_handler(sig)


async def _composing(client: Any, model: str, config: Any) -> list[str]:
    """The model and, for an ensemble, every model its steps run (recursively)."""
    found = [model]
    pending = [step.model_name for step in config.ensemble_scheduling.step]
    while pending:
        name = pending.pop(0)
        if name in found:
            continue
        found.append(name)
        with contextlib.suppress(ClientError):
            pending.extend(
                step.model_name for step in (await client.model_config(name)).ensemble_scheduling.step
            )
    return found


async def _statistics(
    urls: Sequence[str], models: Sequence[str], options: Mapping[str, Any]
) -> dict[str, Counters]:
    """Triton's cumulative counters per model, summed over endpoints (each asked alone)."""
    from tritonforge.client import AsyncClient
    from tritonforge.client._stats import Counters

    totals: dict[str, Counters] = {}
    for url in urls:
        try:
            async with AsyncClient(
                url, metrics=False, **{k: v for k, v in options.items() if k in ("tls", "headers")}
            ) as c:
                data = await c.model_statistics("")
        except ClientError:
            continue
        for stat in data.get("model_stats", []):
            name = stat.get("name")
            if name in models:
                totals[name] = totals.get(name, Counters()) + Counters.from_dict(stat)
    return totals


def _splits(before: Mapping[str, Counters], after: Mapping[str, Counters]) -> list[ServerSplit]:
    from tritonforge.client._stats import Counters, split

    out = []
    for name, a in after.items():
        s = split(before.get(name, Counters()), a)
        out.append(
            ServerSplit(
                model=name,
                requests=s.requests,
                inferences=s.inferences,
                executions=s.executions,
                queue_us=s.queue_us,
                compute_input_us=s.compute_input_us,
                compute_infer_us=s.compute_infer_us,
                compute_output_us=s.compute_output_us,
            )
        )
    return out
