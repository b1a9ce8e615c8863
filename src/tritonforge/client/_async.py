"""The asyncio client: a driver of the core's flows (``_base``) over grpc.aio channels, with client-side
batching (``_coalesce``), which only an event loop can do cheaply."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc.aio
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from tritonforge.client._base import (
    BaseClient,
    FastCall,
    Flow,
    InferOptions,
    ManyOptions,
    Outputs,
    PreparedCall,
)
from tritonforge.client._coalesce import Group, key_of, merge, split
from tritonforge.client._codec import ModelMetadata, decode_response
from tritonforge.client._flow import Attempt, Each, Rpc, Run, Sleep
from tritonforge.client._mapping import error_for_status, translate
from tritonforge.client._pool import Capabilities
from tritonforge.client._wire import AnswerLate, StreamBroken, StreamPool
from tritonforge.errors import ClientError, TransportError

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb2
    from typing_extensions import Unpack

__all__ = ["AsyncClient"]

_ADDRESS = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):\d+$")


def _plain_address(url: str) -> bool:
    """``host:port`` (no scheme such as ``dns:///`` or ``unix:``): what the streams' connection can dial."""
    return _ADDRESS.match(url) is not None


T = TypeVar("T")


class AsyncClient(BaseClient):
    """The asyncio twin of :class:`Client`: the same options and methods, awaited.

    Example:
        >>> async with AsyncClient(["10.0.0.5:8001", "10.0.0.6:8001"]) as client:        # doctest: +SKIP
        ...     out = await client.infer("clf", {"x": np.zeros((1, 8), np.float32)})

    Channels open on first use, inside the running event loop; use one client per loop. The options are
    :class:`Client`'s (see :class:`BaseClient`), and one of its own: ``coalesce``, client-side batching
    (:class:`Coalesce`, on by default): concurrent calls to a model with dynamic batching go out as one
    request, each call getting its own rows back; ``False`` sends every call alone (load generators want
    that). A server without model configs (not Triton) gets every call alone.

    ``streams`` (off by default; ``streams=True``): an inference request (a call, an attempt of one,
    a merged request; not one naming shared-memory regions) to a plain-text ``host:port`` endpoint goes
    as a message of a long-lived ``ModelStreamInfer`` stream (:mod:`tritonforge.client._wire`) instead
    of a grpc.aio call, once the model's config says it is neither decoupled nor a sequence model; an
    error answer, a broken stream or a server without streams sends it the usual way, so errors,
    retries and fallbacks are the same. Off by default because Triton 2.51's stream handler crashed the
    server here (SIGSEGV in ``TRITONSERVER_InferenceRequestDelete``, from a backend's request release)
    within seconds of short-lived clients at concurrency 64 (the tests and runs at concurrency 1-16 did
    not); turn it on only where a load test on streams has shown the server safe.

    Raises (from calls): as :class:`Client`.
    """

    _coalesce_default = True
    _streams_default = False  # opt-in: Triton 2.51 can crash under them (see the class doc)
    _streams_supported = True

    def _setup(self) -> None:
        self._groups: dict[Any, Group] = {}
        self._busy: dict[tuple[str, str, str | None], int] = {}  # calls in flight per endpoint and model
        self._opened = False
        self._health_task: asyncio.Task[None] | None = None
        self._discovery_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # shadows and merged requests in flight
        self._pools: dict[str, StreamPool] = {}  # each plain-text endpoint's streams (streams=True)
        self._streamable: dict[tuple[str | None, str | None], bool] = {}  # learnt from the model config
        self.requests_streamed = 0  # inference requests answered on streams (the rest: grpc.aio calls)

    # -- the driver --------------------------------------------------------------------------------------

    async def _drive(self, flow: Flow[T]) -> T:
        if not self._opened:
            self._open()
        run = Run(flow)
        try:
            while not run.done:
                run.feed(await self._settled(run.op))
        finally:
            flow.close()
        return run.result

    async def _settled(self, op: Any) -> Any:
        """What came of the op: its answer, or the :class:`ClientError` it raised."""
        try:
            return await self._do(op)
        except ClientError as exc:
            return exc

    async def _do(self, op: Any) -> Any:
        kind = type(op)
        if kind is Rpc:
            if op.merge is not None:
                return await self._send_merged(op, *op.merge)
            return await self._rpc(op)
        if kind is Sleep:
            await asyncio.sleep(op.seconds)
            return None
        if kind is Each:
            gate = asyncio.Semaphore(op.concurrency or len(op.flows) or 1)
            return list(await asyncio.gather(*(self._settle(f, gate) for f in op.flows)))
        if not self._closed:  # Spawn
            self._spawn(self._drive(op.flow))
        return None

    async def _rpc(self, op: Rpc) -> Any:
        if op.request_id is not None and self._streams_on:
            pool = self._stream_pool(op)
            if pool is not None:
                return await self._streamed(pool, op)
        return await self._grpc(op)

    async def _grpc(self, op: Rpc) -> Any:
        """``op`` as a grpc.aio call, its failure as our error."""
        # try/except rather than ``with map_grpc_errors(...)``: no object per request on the way that works
        method = op.method
        try:
            call = op.endpoint.handle.methods[method]
            if method != "ModelStreamInfer":
                return await call(op.request, timeout=op.timeout_s, metadata=self._metadata(method))
            # a probe: an empty stream, answered or refused
            stream = call(iter(()), timeout=op.timeout_s, metadata=self._metadata(method))
            return [answer async for answer in stream]
        except ClientError:
            raise
        except Exception as exc:
            mapped = translate(
                exc,
                model=op.model,
                version=op.version,
                endpoint=op.endpoint.url,
                method=method,
                tls=self._tls_mode,
            )
            if mapped is None:
                raise
            raise mapped from exc

    async def _settle(self, flow: Flow[Any], gate: asyncio.Semaphore) -> Any:
        """The flow's result, or the error it raised (driven once ``gate`` lets it in)."""
        async with gate:
            try:
                return await self._drive(flow)
            except ClientError as exc:
                return exc

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _open(self) -> None:
        if self._opened:
            return
        self._check_open()
        self._connect(grpc.aio)
        self._opened = True
        if self.health_check is not None:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())
        if self._sources.dynamic:
            self._discovery_task = asyncio.get_running_loop().create_task(self._discovery_loop())

    async def aclose(self) -> None:
        """Stop health checks, finish shadow calls, unregister and remove shared memory, close channels."""
        if self._closed:
            return
        self._closed = True
        for task in (self._health_task, self._discovery_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.wait_shadows()
        for pool in self._pools.values():
            pool.close()
        if self._opened:
            await self._drive(self._close_flow())
            for ep in self._pool.every_endpoint():
                await ep.handle.channel.close()
        elif self._shm is not None:
            self._shm.close()

    async def _health_loop(self) -> None:
        assert self.health_check is not None
        while not self._closed:
            await asyncio.sleep(self.health_check.interval_s)
            with contextlib.suppress(ClientError):
                await self._drive(self._health_flow())

    async def _discovery_loop(self) -> None:
        """Re-resolve the ``dns:///`` URLs every ``refresh_s`` (off the loop); close drained channels."""
        while not self._closed:
            await asyncio.sleep(self._sources.refresh_s)
            await asyncio.to_thread(self._sources.refresh)
            for ep in self._rediscover():
                self._spawn(ep.handle.channel.close())  # awaited by aclose() even if we are cancelled

    async def wait_shadows(self) -> None:
        """Wait until every shadow call (and merged request) started so far has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- client-side batching (see _coalesce) -------------------------------------------------------------

    async def _send_merged(
        self, op: Rpc, call: PreparedCall, attempt: Attempt, rows: int, limit: int
    ) -> dict[str, np.ndarray]:
        slot = (op.endpoint.url, attempt.model, attempt.version)
        busy = self._busy.get(slot, 0)
        self._busy[slot] = busy + 1
        try:
            if busy:  # calls in flight: company is likely, so wait one turn of the loop for it
                return await self._send_coalesced(call, attempt, rows, limit)
            return decode_response(await self._rpc(op))  # none: no wait, no extra work
        finally:
            left = self._busy[slot] - 1
            if left:
                self._busy[slot] = left
            else:
                del self._busy[slot]

    async def _send_coalesced(
        self, call: PreparedCall, attempt: Attempt, rows: int, limit: int
    ) -> dict[str, np.ndarray]:
        """Join the group of calls like this one, or start one and send it when the loop comes round."""
        key = key_of(attempt.endpoint.url, attempt.model, attempt.version, call.outputs, call.signature)
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        group = self._groups.get(key)
        if group is not None and group.rows + rows <= limit:
            group.add(call, attempt, future, rows)
            if group.rows >= limit:
                del self._groups[key]  # full: its leader sends it
            return await future
        group = self._groups[key] = Group(key)
        group.add(call, attempt, future, rows)
        try:
            await asyncio.sleep(0)  # the calls made before the loop comes round join the group
        except asyncio.CancelledError:
            self._close_group(group)
            group.remove(future)
            if group.members:
                self._spawn(self._deliver(group))
            raise
        self._close_group(group)
        if len(group.members) == 1:
            return await self._send_alone(call, attempt)
        self._spawn(self._deliver(group))  # a task of its own, so cancelling this call doesn't cancel others
        return await future

    def _close_group(self, group: Group) -> None:
        if self._groups.get(group.key) is group:
            del self._groups[group.key]

    async def _deliver(self, group: Group) -> None:
        """Send the group as one request and hand each call its rows; on a failure that isn't the
        transport's, send the calls one by one so that only a bad call fails."""
        call, attempt, _ = group.members[0]
        ep = attempt.endpoint
        signature, raws = merge(group)
        # One request, one id: the members' ids joined, so grepping Triton's log for any call's id finds it.
        ids = ",".join(member.request_id for member, _, _ in group.members)
        merged = PreparedCall(call.model, signature, raws, call.outputs, sum(map(len, raws)), {}, ids)
        try:
            body = self._encode(merged, attempt)
            response = await self._rpc(
                Rpc(ep, "ModelInfer", body, group.timeout_s(), attempt.model, attempt.version, request_id=ids)
            )
            try:
                parts = split(decode_response(response), group.counts)
            except ValueError as exc:
                raise ClientError(
                    f"model {attempt.model!r} answered {len(group.members)} merged calls with outputs "
                    f"that don't split by rows ({exc}); send its calls alone with "
                    "AsyncClient(..., coalesce=False)",
                    model=attempt.model,
                    version=attempt.version,
                    endpoint=ep.url,
                ) from exc
        except TransportError as exc:
            self._fail_all(group, exc)
            return
        except ClientError:  # RequestTooLarge for the merged bytes, a bad call among them, ...
            await asyncio.gather(*(self._deliver_alone(c, a, f) for c, a, f in group.members))
            return
        except asyncio.CancelledError:
            for _, _, future in group.members:
                future.cancel()
            raise
        except Exception as exc:  # never leave a caller waiting
            self._fail_all(group, exc)
            return
        for (_, _, future), part in zip(group.members, parts, strict=True):
            if not future.done():
                future.set_result(part)

    @staticmethod
    def _fail_all(group: Group, exc: BaseException) -> None:
        for _, _, future in group.members:
            if not future.done():
                future.set_exception(exc)

    async def _send_alone(self, call: PreparedCall, attempt: Attempt) -> dict[str, np.ndarray]:
        body = self._encode(call, attempt)
        op = Rpc(
            attempt.endpoint,
            "ModelInfer",
            body,
            attempt.timeout_s,
            attempt.model,
            attempt.version,
            request_id=call.request_id,
        )
        return decode_response(await self._rpc(op))

    async def _deliver_alone(self, call: PreparedCall, attempt: Attempt, future: asyncio.Future[Any]) -> None:
        if future.done():
            return
        try:
            result = await self._send_alone(call, attempt)
        except ClientError as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)

    # -- inference ---------------------------------------------------------------------------------------

    async def infer(self, model: str, inputs: Mapping[str, Any], **options: Unpack[InferOptions]) -> Outputs:
        """Run ``model`` on ``inputs`` and return ``{output name: ndarray}`` (see :meth:`Client.infer`).

        Example:
            >>> out = await client.infer("mlp", {"x": np.ones((2, 8), np.float32)})     # doctest: +SKIP

        Raises:
            InvalidRequestError: as :meth:`Client.infer` (``RequestTooLarge`` among them).
            ModelNotFoundError: as :meth:`Client.infer`.
            InferenceFailed: as :meth:`Client.infer`.
            DeadlineExceeded: as :meth:`Client.infer`.
            AllEndpointsFailed: as :meth:`Client.infer`.
        """
        if not self._opened:
            self._open()
        fast = self._fast_infer(model, inputs, options)
        if type(fast) is not FastCall:
            return await self._drive(fast)  # type: ignore[arg-type]
        try:
            response = await self._rpc(fast.rpc)
        except ClientError as exc:
            return await self._drive(self._fast_failed(fast, exc))
        except BaseException:
            self._fast_abandoned(fast)
            raise
        return self._fast_done(fast, response)

    def _stream_pool(self, rpc: Rpc) -> StreamPool | None:
        """The endpoint's streams if this call may go on one (see the class doc), else None."""
        ep = rpc.endpoint
        pool = self._pools.get(ep.url)
        if pool is None:
            if ep.capabilities.streaming is False or not _plain_address(ep.url):
                return None  # the endpoint can't take them: no need to ask for the model's config either
            pool = self._pools[ep.url] = StreamPool(ep.url, self._metadata("ModelInfer") or ())
        if pool.dead:
            return None
        key = (rpc.model, rpc.version)
        known = self._streamable.get(key)
        if known is None:
            self._streamable[key] = False  # until the model's config says otherwise
            self._spawn(self._learn_streamable(key))
            return None
        return pool if known else None

    async def _learn_streamable(self, key: tuple[str | None, str | None]) -> None:
        """Whether calls of a model may go on streams: Triton's config says it answers each request once
        (not decoupled) and keeps no state between them (no sequence batching)."""
        model, version = key
        if model is None:
            return
        with contextlib.suppress(ClientError):  # no config (not Triton, or not allowed): the usual way
            await self.model_config(model, version)

    async def _streamed(self, pool: StreamPool, rpc: Rpc) -> Any:
        """The call's ``ModelInferResponse`` over the pool's streams, or through grpc.aio when the stream
        can't answer it exactly (broken, an error to be given its exact kind, an answer not its own)."""
        try:
            answer = await pool.send(rpc.request, rpc.timeout_s)
        except StreamBroken:
            return await self._grpc(rpc)
        except AnswerLate:
            raise error_for_status(
                "DEADLINE_EXCEEDED",
                "Deadline Exceeded",
                model=rpc.model,
                version=rpc.version,
                endpoint=rpc.endpoint.url,
                method="ModelInfer",
                tls=self._tls_mode,
            ) from None
        response = pb.ModelStreamInferResponse.FromString(answer)
        if response.error_message:
            return await self._grpc(rpc)  # the usual call gives the error with its kind (retryable or not)
        if response.infer_response.id != rpc.request_id:
            pool.forget()  # not this call's answer: that stream can't be trusted
            return await self._grpc(rpc)
        self.requests_streamed += 1
        return response.infer_response

    async def infer_many(
        self, model: str, requests: Sequence[Mapping[str, Any]], **options: Unpack[ManyOptions]
    ) -> list[Outputs]:
        """Many requests, ``concurrency`` (16) at a time, answered in order (see :meth:`Client.infer_many`).

        Raises:
            TritonForgeError: the first error of any request (the others are still run to completion).
        """
        return await self._drive(self._infer_many_flow(model, requests, **options))

    async def infer_batched(
        self, model: str, inputs: Mapping[str, Any], batch_size: int, **options: Unpack[ManyOptions]
    ) -> Outputs:
        """``inputs`` in batches of at most ``batch_size`` rows (see :meth:`Client.infer_batched`).

        Raises:
            RequestTooLarge: a single row is over the message limit. Otherwise as :meth:`infer`.
        """
        return await self._drive(self._infer_batched_flow(model, inputs, batch_size, **options))

    # -- health, metadata, config, statistics, capabilities, model control --------------------------------

    async def endpoint_health(self) -> dict[str, bool]:
        """``{url: ready}`` for every endpoint, asked now (see :meth:`Client.endpoint_health`)."""
        return await self._drive(self._health_flow())

    async def capabilities(self) -> dict[str, Capabilities]:
        """What each server offers beyond the core protocol (see :meth:`Client.capabilities`)."""
        return await self._drive(self._capabilities_flow())

    async def is_server_live(self) -> bool:
        """Whether a server answers as live (any endpoint)."""
        return await self._drive(self._is_server_live_flow())

    async def is_server_ready(self) -> bool:
        """Whether a server is ready (any endpoint)."""
        return await self._drive(self._is_server_ready_flow())

    async def is_model_ready(self, model: str, version: str | int | None = None) -> bool:
        """Whether ``model`` (``version``) is ready to serve on a server."""
        return await self._drive(self._is_model_ready_flow(model, version))

    async def server_metadata(self) -> dict[str, Any]:
        """The server's name, version and extensions."""
        return await self._drive(self._server_metadata_flow())

    async def model_metadata(self, model: str, version: str | int | None = None) -> ModelMetadata:
        """A model's inputs and outputs (see :meth:`Client.model_metadata`).

        Raises:
            ModelNotFoundError: no such model or version is loaded.
        """
        return await self._drive(self._model_metadata_flow(model, version))

    async def model_config(self, model: str, version: str | int | None = None) -> pb2.ModelConfig:
        """The model's config as the server runs it (see :meth:`Client.model_config`).

        Raises:
            NotOffered: the server has no model configs (not Triton). ModelNotFoundError: no such model.
        """
        config = await self._drive(self._model_config_flow(model, version))
        # whether its requests may go on streams: answered once each (not decoupled), no state kept
        self._streamable[(model, None if version is None else str(version))] = not (
            config.model_transaction_policy.decoupled or config.HasField("sequence_batching")
        )
        return config

    async def model_statistics(self, model: str = "", version: str | int | None = None) -> dict[str, Any]:
        """Triton's statistics for ``model`` (all models when empty).

        Raises:
            NotOffered: the server keeps no statistics (not Triton).
        """
        return await self._drive(self._model_statistics_flow(model, version))

    async def repository_index(self) -> list[dict[str, Any]]:
        """Every model in the repository with its state and reason."""
        return await self._drive(self._repository_index_flow())

    async def load_model(
        self, model: str, config: str | None = None, *, timeout_s: float | None = None
    ) -> None:
        """Load (or reload) ``model`` on every endpoint at once (see :meth:`Client.load_model`).

        Raises:
            ClientError: the first endpoint's error (e.g. :class:`DeadlineExceeded` after ``timeout_s``,
                300 s by default; :class:`InvalidRequestError` for a model that fails to load), after every
                endpoint answered.
        """
        await self._drive(self._load_model_flow(model, config, timeout_s))

    async def unload_model(self, model: str, *, timeout_s: float | None = None) -> None:
        """Unload ``model`` on every endpoint at once.

        Raises:
            ClientError: the first endpoint's error, after every endpoint answered or timed out.
        """
        await self._drive(self._unload_model_flow(model, timeout_s))
