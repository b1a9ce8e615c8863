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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tritonforge.batch.engine import Engine
from tritonforge.batch.plan import (
    ShardPlan,
    check_options,
    check_output,
    parse_shard,
    plan_model,
    plan_shards,
)
from tritonforge.batch.result import (
    EXIT_FAILED_ROWS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TOO_MANY_FAILURES,
    BatchResult,
    ServerSplit,
    latency_summary,
)
from tritonforge.batch.runner import Event, Runner, signals
from tritonforge.batch.server_stats import composing, splits, statistics, statistics_after
from tritonforge.batch.sources import Dataset, open_dataset
from tritonforge.client.wire import streams_for
from tritonforge.errors import BatchError

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
            (:func:`tritonforge.client.wire.streams_for`; not with TLS, ``dns:///`` URLs or shared memory
            asked for), the client taking over any request that can't go that way or fails; ``False``:
            every request a grpc.aio call of the client (``AsyncClient(streams=False)``).

    Raises:
        BatchError: bad input, mapping or output folder; a model that isn't there; the servers unreachable
            mid-run (the finished shards are kept: run again to resume).
    """
    from tritonforge.client import AsyncClient

    check_options(shard_rows, concurrency, batch_size, timeout_s, grace_s, max_errors)
    root = Path(output)
    check_output(root)
    k, n = shard
    if n < 1 or not 0 <= k < n:
        raise ValueError(f"shard {shard}: K must be in 0..N-1")
    emit = on_event or (lambda kind, data: None)
    started = time.perf_counter()
    url_list = [urls] if isinstance(urls, str) else list(urls)
    if not url_list:
        raise BatchError("no Triton endpoint given (--url HOST:PORT)")
    dataset, columns = await _open_input(input)
    v = None if version is None else str(version)
    options = dict(client_options or {})
    # no streams at all: the client's own (for the requests it sends) off too, unless told otherwise
    client_kwargs = options if streams else {"streams": False, **options}
    async with AsyncClient(url_list, **client_kwargs) as client:
        plan = await plan_model(client, model, v, columns, mapping, outputs, batch_size)
        shards = plan_shards(root, model, v, dataset, plan, shard_rows, (k, n))
        lanes = streams_for(client, url_list, timeout_s) if streams else None
        engine = Engine(
            client,
            model,
            version=v,
            batched=int(plan.config.max_batch_size) > 0,
            batch_size=plan.batch_size,
            outputs=plan.outputs,
            timeout_s=timeout_s,
            streams=lanes,
        )
        stats_models = await composing(client, model, plan.config)
        before = await statistics(url_list, stats_models, options)
        runner = Runner(
            engine=engine,
            manifest=shards.manifest,
            dataset=dataset,
            plans=plan.plans,
            variable=plan.variable,
            shard_rows=shard_rows,
            concurrency=concurrency,
            max_errors=max_errors,
            failed_before=shards.failed_before,
            grace_s=grace_s,
            emit=emit,
        )
        emit("start", _start_event(model, shards, plan.batch_size, concurrency))
        try:
            with signals(runner, handle_signals):
                await runner.run(shards.shards_to_do())
        finally:
            if lanes is not None:
                await lanes.aclose()
        after = await statistics_after(url_list, stats_models, options, before, engine.requests)
    result = _result(root, runner, engine, shards, started, splits(before, after))
    emit("done", {"result": result})
    if runner.fatal is not None:
        raise runner.fatal
    return result


async def _open_input(input: Any) -> tuple[Dataset, Any]:
    """The dataset at ``input`` and its columns, read off the event loop.

    Raises:
        BatchError: an input that can't be read, or has no rows.
    """
    dataset = await asyncio.to_thread(open_dataset, input)
    if dataset.rows == 0:
        raise BatchError(f"{input}: the input has no rows")
    return dataset, await asyncio.to_thread(dataset.columns)


def _start_event(model: str, shards: ShardPlan, batch_size: int, concurrency: int) -> dict[str, Any]:
    return {
        "model": model,
        "rows_total": shards.rows_total,
        "rows_skipped": shards.rows_skipped,
        "shards_total": len(shards.mine),
        "shards_todo": len(shards.todo),
        "batch_size": batch_size,
        "concurrency": concurrency,
        "failed_before": shards.failed_before,
    }


def _result(
    root: Path, runner: Runner, engine: Engine, shards: ShardPlan, started: float, server: list[ServerSplit]
) -> BatchResult:
    return BatchResult(
        status=runner.status,
        output=root,
        rows_total=shards.rows_total,
        rows_skipped=shards.rows_skipped,
        rows_ok=runner.rows_ok,
        rows_failed=runner.rows_failed,
        shards_total=len(shards.mine),
        shards_done=len(shards.manifest.done & set(shards.mine)),
        elapsed_s=time.perf_counter() - started,
        requests=engine.requests,
        latencies_ms=latency_summary(engine.latencies_s),
        server=server,
        failed_before=shards.failed_before,
        startup_s=(runner.first_request_s or time.perf_counter()) - started,
        requests_streamed=engine.streamed,
    )
