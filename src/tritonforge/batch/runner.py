"""The event-loop side of a batch run: lanes sending the shards' requests, the shards committed as they
finish, progress events, the stop on too many failures, and SIGTERM / SIGINT handling (no new shard; the
shards under way finish within ``grace_s`` or are abandoned, to be redone by the next run).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from tritonforge.batch.columns import InputPlan, Prepared, outputs_to_arrow, prepare
from tritonforge.batch.engine import Engine, RowResult
from tritonforge.batch.plan import Shard
from tritonforge.batch.reader import ShardReader
from tritonforge.batch.sources import Dataset
from tritonforge.batch.store import Manifest
from tritonforge.errors import BatchError, ClientError

__all__ = ["Event", "Runner", "signals"]

Event = Callable[[str, Mapping[str, Any]], None]


class _Work:
    """A shard under way: its rows as inputs, its requests (row positions), their answers as they come."""

    __slots__ = ("batches", "errors", "left", "prepared", "results", "shard", "slot")

    def __init__(
        self, shard: Shard, prepared: Prepared, batches: list[np.ndarray], errors: list[dict[str, Any]]
    ) -> None:
        self.shard = shard
        self.prepared = prepared
        self.batches = batches
        self.results: list[RowResult | None] = [None] * len(batches)
        self.left = len(batches)
        self.errors = errors  # the rows that failed at the input stage
        self.slot: _Slot | None = None


class Runner:
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

    async def run(self, shards: list[Shard]) -> None:
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

    async def _read(self, shards: list[Shard], lanes: int) -> None:
        """Read and prepare the shards in order (off the loop), at most ``OPEN_SHARDS`` ahead of the
        answers, and queue their requests; then tell each lane there is no more."""
        open_shards = asyncio.Semaphore(self.OPEN_SHARDS)
        reader = ShardReader(self.dataset, self.shard_rows, shards)
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

    def _load(self, reader: ShardReader) -> _Work | None:
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


@contextlib.contextmanager
def signals(runner: Runner, enabled: bool) -> Any:
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
