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
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tritonforge.batch.columns import InputPlan, Prepared, outputs_to_arrow, plan_inputs, prepare
from tritonforge.batch.engine import Engine, RowResult
from tritonforge.batch.sources import Dataset, digest, open_dataset
from tritonforge.batch.store import Manifest
from tritonforge.client._wire import Streams
from tritonforge.config import ComposingWalk
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
    startup_s: float = 0.0  # from the call until the first request went out (reading, metadata, manifest)
    requests_streamed: int = 0  # of ``requests``, answered on a lane's stream (the rest: client calls)

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

    The run gets an event loop of its own: uvloop's when it is installed (the ``batch`` extra; its loop
    costs less CPU per request), asyncio's otherwise.

    Raises:
        BatchError: bad input, mapping or output folder; the server unreachable (finished shards kept).
    """
    return _run_loop(arun_batch(model, urls, input, output, **options))


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


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
    streams: bool = True,
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
        streams: each lane sends its requests as messages of a ``ModelStreamInfer`` stream of its own
            (:mod:`tritonforge.client._wire`; not with TLS, ``dns:///`` URLs or shared memory asked for), the
            client taking over any request that can't go that way or fails; ``False``: every request a
            grpc.aio call of the client (``AsyncClient(streams=False)``).

    Raises:
        BatchError: bad input, mapping or output folder; a model that isn't there; the servers unreachable
            mid-run (the finished shards are kept: run again to resume).
    """
    from tritonforge.client import AsyncClient

    _check_options(shard_rows, concurrency, batch_size, timeout_s, grace_s, max_errors)
    _check_output(Path(output))
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
    # no streams at all: the client's own (for the requests it sends) off too, unless told otherwise
    client_kwargs = options if streams else {"streams": False, **options}
    async with AsyncClient(url_list, **client_kwargs) as client:
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
                f"--output-name names outputs model {model!r} doesn't have: {unknown}; it has "
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
        lanes = _streams(client, url_list, timeout_s) if streams else None
        engine = Engine(
            client,
            model,
            version=v,
            batched=batched,
            batch_size=size,
            outputs=out_names,
            timeout_s=timeout_s,
            streams=lanes,
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
        try:
            with _signals(runner, handle_signals):
                await runner.run([_Shard(i, i * shard_rows, rows_of[i]) for i in todo])
        finally:
            if lanes is not None:
                await lanes.aclose()
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
        startup_s=(runner.first_request_s or time.perf_counter()) - started,
        requests_streamed=engine.streamed,
    )
    emit("done", {"result": result})
    if runner.fatal is not None:
        raise runner.fatal
    return result


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


def _check_options(
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


def _check_output(root: Path) -> None:
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


class _Work:
    """A shard under way: its rows as inputs, its requests (row positions), their answers as they come."""

    __slots__ = ("batches", "errors", "left", "prepared", "results", "shard", "slot")

    def __init__(
        self, shard: _Shard, prepared: Prepared, batches: list[np.ndarray], errors: list[dict[str, Any]]
    ) -> None:
        self.shard = shard
        self.prepared = prepared
        self.batches = batches
        self.results: list[RowResult | None] = [None] * len(batches)
        self.left = len(batches)
        self.errors = errors  # the rows that failed at the input stage
        self.slot: _Slot | None = None


class _Runner:
    """The event-loop side of a run: ``concurrency`` lanes, each one request in flight at a time, take
    the requests of the shards under way (at most two read ahead) in order; a shard is committed, off the
    loop, once its last request is answered, while the lanes go on with the next one.

    Per request the loop does little: a lane awaits the client and files the answer; no task, semaphore
    or callback per request. The answers of a shard become its Arrow table in one step when it is whole.
    """

    OPEN_SHARDS = 2
    PROGRESS_EVERY_S = 0.1  # "rows" events at most this often (a progress bar needs no more)

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
        self.concurrency = concurrency
        self.max_errors = max_errors
        self.failed_before = failed_before
        self.grace_s = grace_s
        self.emit = emit
        self.status = "complete"
        self.rows_ok = 0
        self.rows_failed = 0
        self.stopping = False
        self.fatal: BaseException | None = None
        self.first_request_s: float | None = None  # perf_counter() when the first request went out
        self._tasks: set[asyncio.Task[Any]] = set()  # the reader and the lanes: cancelled on a stop
        self._commits: set[asyncio.Task[None]] = set()  # never cancelled: a commit runs to its end
        self._queue: asyncio.Queue[tuple[_Work, int] | None] = asyncio.Queue()
        self._pending_failures = 0
        self._grace_task: asyncio.Task[None] | None = None
        self._progress_rows = 0
        self._progress_failed = 0
        self._progress_at = 0.0

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

    @property
    def _committing(self) -> bool:
        """Whether answered shards are still committed: yes unless the run stopped for failures."""
        return self.status in ("complete", "interrupted")

    # -- the work ----------------------------------------------------------------------------------------

    async def run(self, shards: list[_Shard]) -> None:
        if not shards:
            return
        loop = asyncio.get_running_loop()
        lanes = [loop.create_task(self._lane(i)) for i in range(self.concurrency)]
        reader = loop.create_task(self._read(shards, len(lanes)))
        self._tasks.update(lanes)
        self._tasks.add(reader)
        try:
            await asyncio.gather(reader, *lanes, return_exceptions=True)
            while self._commits:
                await asyncio.gather(*list(self._commits), return_exceptions=True)
        finally:
            if self._grace_task is not None:
                self._grace_task.cancel()
            self._flush_progress()

    async def _read(self, shards: list[_Shard], lanes: int) -> None:
        """Read and prepare the shards in order (off the loop), at most ``OPEN_SHARDS`` ahead of the
        answers, and queue their requests; then tell each lane there is no more."""
        open_shards = asyncio.Semaphore(self.OPEN_SHARDS)
        reader = _Reader(self.dataset, self.shard_rows, shards)
        try:
            while not self.stopping:
                await open_shards.acquire()
                if self.stopping:
                    break
                work = await asyncio.to_thread(self._load, reader)
                if work is None or self.stopping:
                    break
                work.slot = _Slot(open_shards)
                if work.errors:
                    self._progress(len(work.errors), len(work.errors))
                    self._count_failures(len(work.errors))
                    if not self._committing:
                        break
                if not work.batches:  # every row failed at the input stage
                    self._answered_all(work)
                for i in range(len(work.batches)):
                    self._queue.put_nowait((work, i))
        except BatchError as exc:  # the input changed under us: stop, keep what is committed
            self._stop_now("failed", exc)
        except Exception as exc:  # unreadable data past the first rows, a bug: stop, keep what is committed
            self._stop_now(
                "failed",
                BatchError(
                    f"stopped reading the input ({type(exc).__name__}: {exc}); {len(self.manifest.done)} "
                    "shards are finished: fix the input and run the same command again to resume"
                ),
            )
        finally:
            for _ in range(lanes):
                self._queue.put_nowait(None)

    def _load(self, reader: _Reader) -> _Work | None:
        shard = reader.next()
        if shard is None:
            return None
        prepared = prepare(shard.table, self.plans)
        shard.table = None  # the inputs are in ``prepared`` now
        errors: list[dict[str, Any]] = [
            {"row_id": shard.first_row + i, "stage": "input", "error": reason}
            for i, reason in sorted(prepared.bad.items())
        ]
        return _Work(shard, prepared, self.engine.batches(prepared.arrays), errors)

    async def _lane(self, index: int) -> None:
        """Send the queued requests one after the other until told there are no more."""
        queue, engine = self._queue, self.engine
        try:
            lane = engine.lane(index)
            while True:
                item = await queue.get()
                if item is None:
                    return
                work, i = item
                if self.first_request_s is None:
                    self.first_request_s = time.perf_counter()
                result = await engine.run(work.prepared.arrays, work.batches[i], lane)
                self._answered(work, i, result)
        except asyncio.CancelledError:
            return  # abandoned: the shards not committed are redone by the next run
        except ClientError as exc:
            self._stop_now(
                "failed",
                BatchError(
                    f"stopped: {exc.message}; {len(self.manifest.done)} shards are finished — run the "
                    "same command again to resume",
                    model=exc.model,
                    endpoint=exc.endpoint,
                ),
            )
        except Exception as exc:  # a bug: stop, keep what is committed, say what happened
            self._stop_now("failed", exc)

    def _answered(self, work: _Work, i: int, result: RowResult) -> None:
        work.results[i] = result
        work.left -= 1
        failed = len(result.failed)
        self._progress(len(result.rows) + failed, failed)
        if failed:
            self._count_failures(failed)
        if work.left == 0 and self._committing:
            self._answered_all(work)

    def _answered_all(self, work: _Work) -> None:
        assert work.slot is not None
        work.slot.release()  # the next shard may be read while this one is written
        task = asyncio.get_running_loop().create_task(self._commit(work))
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    async def _commit(self, work: _Work) -> None:
        shard = work.shard
        try:
            table, errors = await asyncio.to_thread(self._assemble, work)
            ok = 0 if table is None else table.num_rows
            await asyncio.to_thread(
                self.manifest.commit,
                shard.index,
                table,
                errors,
                {"first_row": shard.first_row, "rows": shard.rows, "rows_ok": ok, "rows_failed": len(errors)},
            )
        except Exception as exc:  # a disk error: stop, keep what is committed, say what happened
            self._stop_now("failed", exc)
            return
        self.rows_ok += ok
        self.rows_failed += len(errors)
        self._flush_progress()
        self.emit(
            "shard", {"index": shard.index, "rows": shard.rows, "rows_ok": ok, "rows_failed": len(errors)}
        )

    def _progress(self, rows: int, failed: int) -> None:
        self._progress_rows += rows
        self._progress_failed += failed
        now = time.perf_counter()
        if now - self._progress_at >= self.PROGRESS_EVERY_S:
            self._flush_progress(now)

    def _flush_progress(self, now: float | None = None) -> None:
        self._progress_at = time.perf_counter() if now is None else now
        if self._progress_rows:
            rows, failed = self._progress_rows, self._progress_failed
            self._progress_rows = self._progress_failed = 0
            self.emit("rows", {"rows": rows, "failed": failed})

    def _count_failures(self, count: int) -> None:
        if not count:
            return
        self._pending_failures += count
        if self.max_errors is not None and self.failed_before + self._pending_failures > self.max_errors:
            if self.status != "too many failures":
                self.emit("stopping", {"reason": "too many failures", "max_errors": self.max_errors})
            self._stop_now("too many failures")

    # -- a whole shard to a table (in a worker thread) -----------------------------------------------------

    def _assemble(self, work: _Work) -> tuple[Any, list[dict[str, Any]]]:
        """The shard's table (``row_id`` + outputs, by row id) and its failed rows, sorted."""
        first, pos = work.shard.first_row, work.prepared.rows
        errors = list(work.errors)
        positions: list[np.ndarray] = []
        outputs: list[dict[str, np.ndarray]] = []
        for result in work.results:
            assert result is not None
            for p, reason in sorted(result.failed.items()):
                errors.append({"row_id": first + int(pos[p]), "stage": "model", "error": reason})
            if len(result.rows):
                positions.append(result.rows)
                outputs.append(result.outputs)
        errors.sort(key=lambda e: e["row_id"])
        return self._table(first, pos, positions, outputs), errors

    def _table(
        self, first: int, pos: np.ndarray, positions: list[np.ndarray], parts: list[dict[str, np.ndarray]]
    ) -> Any:
        import pyarrow as pa

        if not parts:
            return None
        row_ids = first + pos[np.concatenate(positions)].astype(np.int64, copy=False)
        order = None
        if len(row_ids) > 1 and not bool((row_ids[1:] > row_ids[:-1]).all()):  # rows of several shapes
            order = np.argsort(row_ids, kind="stable")
            row_ids = row_ids[order]
        columns = {"row_id": pa.array(row_ids)}
        for name in self.engine.outputs or sorted(parts[0]):  # one column order for every shard
            if self.variable.get(name, False):  # padded per request: each its own list lengths
                column = pa.concat_arrays([outputs_to_arrow(name, p[name], True) for p in parts])
                columns[name] = column if order is None else column.take(pa.array(order))
            else:
                values = np.concatenate([p[name] for p in parts]) if len(parts) > 1 else parts[0][name]
                columns[name] = outputs_to_arrow(name, values if order is None else values[order], False)
        return pa.table(columns)


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
        # read no more than a shard at a time: memory follows the shard size, not the file's
        start = self.shards[0].first_row if self.shards else 0
        self._stream = dataset.read(start, rows=min(shard_rows, 65_536)) if self.shards else iter(())
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


def _streams(client: Any, urls: Sequence[str], timeout_s: float | None) -> Streams | None:
    """The lanes' streams, where the wire path can go: plain ``host:port`` endpoints without TLS, and a
    client not told to put tensors in shared memory."""
    if client.shared_memory.mode in ("system", "cuda"):
        return None
    plain = []
    for url in urls:
        url = url[len("grpc://") :] if url.startswith("grpc://") else url
        if client.tls is not None or "/" in url or ":" not in url:
            return None
        plain.append(url)
    limit = timeout_s if timeout_s is not None else client.deadline.total_s
    return Streams(plain, client._metadata("ModelStreamInfer") or (), limit)


async def _composing(client: Any, model: str, config: Any) -> list[str]:
    """The model and, for an ensemble, every model its steps run (recursively)."""
    walk = ComposingWalk(model)
    for name in walk:
        if name == model:
            walk.add(step.model_name for step in config.ensemble_scheduling.step)
            continue
        with contextlib.suppress(ClientError):
            walk.add(step.model_name for step in (await client.model_config(name)).ensemble_scheduling.step)
    return list(walk.found)


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
