"""The asyncio client: the same methods as :class:`Client`, awaited, over grpc.aio channels."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tritonforge.client._base import INFER_METHOD, BaseClient, PreparedCall, join_batches, split_batches
from tritonforge.client._coalesce import Batchable, Group, batch_rows, key_of, merge, split
from tritonforge.client._codec import ModelMetadata, decode_response
from tritonforge.client._flow import Attempt
from tritonforge.client._mapping import map_grpc_errors
from tritonforge.client._pool import Endpoint
from tritonforge.client.policies import Coalesce, Shadow
from tritonforge.errors import ClientError, TransportError

__all__ = ["AsyncClient"]


class _Transport:
    __slots__ = ("channel", "infer", "stub")

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.infer = channel.unary_unary(
            INFER_METHOD, request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString
        )


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class AsyncClient(BaseClient):
    """The asyncio twin of :class:`Client`: the same options and methods, awaited.

    Example:
        >>> async with AsyncClient(["10.0.0.5:8001", "10.0.0.6:8001"]) as client:        # doctest: +SKIP
        ...     out = await client.infer("clf", {"x": np.zeros((1, 8), np.float32)})

    Channels open on first use, inside the running event loop; use one client per loop.
    See :class:`Client` for the options and the errors raised. One option is the async client's own:

    Args:
        coalesce: client-side batching (:class:`Coalesce`, on by default): concurrent calls to a model
            with dynamic batching go out as one request, each call getting its own rows back. ``False``
            sends every call as its own request (load generators want that).
    """

    def __init__(
        self, urls: str | Sequence[str], *, coalesce: Coalesce | bool = True, **options: Any
    ) -> None:
        super().__init__(urls, **options)
        if isinstance(coalesce, bool):
            coalesce = Coalesce(enabled=coalesce)
        self.coalesce = coalesce
        self._coalescing = coalesce.enabled
        self._batchable: dict[tuple[str, str | None], Batchable] = {}
        self._groups: dict[Any, Group] = {}
        self._busy: dict[tuple[str, str, str | None], int] = {}  # calls in flight per endpoint and model
        self._opened = False
        self._health_task: asyncio.Task[None] | None = None
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._group_tasks: set[asyncio.Task[None]] = set()

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
        if self._closed:
            raise ClientError("the client is closed")
        credentials = self._credentials()
        for ep in self._pool.endpoints:
            channel = (
                grpc.aio.insecure_channel(ep.url, options=self._channel_options)
                if credentials is None
                else grpc.aio.secure_channel(ep.url, credentials, options=self._channel_options)
            )
            ep.handle = _Transport(channel)
        self._opened = True
        if self.health_check is not None:
            self._health_task = asyncio.get_running_loop().create_task(self._health_loop())

    async def aclose(self) -> None:
        """Stop health checks, finish shadow calls, unregister and remove shared memory, close channels."""
        if self._closed:
            return
        self._closed = True
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)
        if self._group_tasks:
            await asyncio.gather(*self._group_tasks, return_exceptions=True)
        if self._opened:
            if self._shm is not None:
                for region in self._shm.regions():
                    method, request = self._unregister_request(region)
                    for ep in self._pool.endpoints:
                        if ep.url in region.registered_on:
                            with contextlib.suppress(grpc.RpcError):
                                await getattr(ep.handle.stub, method)(
                                    request, timeout=2.0, metadata=self._grpc_metadata
                                )
            for ep in self._pool.endpoints:
                await ep.handle.channel.close()
        if self._shm is not None:
            self._shm.close()

    # -- the driver of the shared decisions --------------------------------------------------------------

    async def _run(
        self,
        targets: Sequence[tuple[str, str | None]],
        timeout_s: float | None,
        send: Callable[[Attempt], Awaitable[Any]],
        on_attempt: Callable[[Attempt], None] | None = None,
    ) -> Any:
        if not self._opened:
            self._open()
        flow = self._flow(targets, timeout_s)
        try:
            step = next(flow)
            while True:
                if type(step) is Attempt:
                    if on_attempt is not None:
                        on_attempt(step)
                    try:
                        outcome = await send(step)
                    except ClientError as exc:
                        self._on_attempt_error(step, exc)
                        outcome = exc
                else:
                    await asyncio.sleep(step.seconds)
                    outcome = None
                step = flow.send(outcome)
        except StopIteration as stop:
            return stop.value
        finally:
            flow.close()

    # -- inference ---------------------------------------------------------------------------------------

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        key: str | bytes | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` and return ``{output name: ndarray}`` (see :meth:`Client.infer`).

        Example:
            >>> out = await client.infer("mlp", {"x": np.ones((2, 8), np.float32)})     # doctest: +SKIP
        """
        started = time.perf_counter()
        call = self._prepare(model, inputs, outputs)
        targets = self._targets(model, version, key)
        last: list[Attempt] = []

        def on_attempt(attempt: Attempt) -> None:
            last[:] = (attempt,)
            self._on_attempt(model, attempt)

        try:
            result = await self._run(targets, timeout_s, lambda a: self._send_infer(call, a), on_attempt)
        except ClientError as exc:
            self._on_done(model, targets[0][1], started, exc, last[0] if last else None)
            raise
        self._on_done(model, targets[0][1], started, None, last[0] if last else None)
        if self.shadows:
            shadow = self._shadow_for(model)
            if shadow is not None:
                self._start_shadow(model, shadow, call, result, timeout_s)
        return result

    async def _send_infer(self, call: PreparedCall, attempt: Attempt) -> dict[str, np.ndarray]:
        ep = attempt.endpoint
        if self._needs_metadata(attempt.model, attempt.version):
            await self._fetch_metadata(attempt.model, attempt.version, ep, attempt.timeout_s)
        if (
            self._coalescing
            and call.nbytes <= self.coalesce.max_call_bytes
            and not self._use_shm(call, ep.url)
        ):
            limit = await self._merge_limit(attempt)
            rows = batch_rows(call.signature) if limit else None
            if rows is not None and 0 < rows < limit:
                slot = (ep.url, attempt.model, attempt.version)
                busy = self._busy.get(slot, 0)
                self._busy[slot] = busy + 1
                try:
                    if busy:  # calls in flight: company is likely, so wait one turn of the loop for it
                        return await self._send_coalesced(call, attempt, rows, limit)
                    return await self._send_alone(call, attempt)  # none: no wait, no extra work
                finally:
                    left = self._busy[slot] - 1
                    if left:
                        self._busy[slot] = left
                    else:
                        del self._busy[slot]
        if not self._use_shm(call, ep.url):
            return await self._send_alone(call, attempt)
        with map_grpc_errors(model=attempt.model, version=attempt.version, endpoint=ep.url):
            self._check_for_shm(call, attempt)
            assert self._shm is not None
            body, region = self._shm_request(call, attempt.model, attempt.version)
            try:
                if ep.url not in region.registered_on:
                    method, request = self._register_request(region)
                    await getattr(ep.handle.stub, method)(
                        request, timeout=attempt.timeout_s, metadata=self._grpc_metadata
                    )
                    region.registered_on.add(ep.url)
                response = await ep.handle.infer(
                    body, timeout=attempt.timeout_s, metadata=self._grpc_metadata
                )
            finally:
                self._shm.release(region)
            return decode_response(response)

    # -- client-side batching (see _coalesce) -------------------------------------------------------------

    async def _merge_limit(self, attempt: Attempt) -> int:
        """The most rows a merged request for the attempt's model may carry (0: don't merge)."""
        batchable = self._batchable.get((attempt.model, attempt.version))
        if batchable is None:
            ep = attempt.endpoint
            with map_grpc_errors(model=attempt.model, version=attempt.version, endpoint=ep.url):
                response = await ep.handle.stub.ModelConfig(
                    pb.ModelConfigRequest(name=attempt.model, version=attempt.version or ""),
                    timeout=attempt.timeout_s,
                    metadata=self._grpc_metadata,
                )
            batchable = Batchable.from_config(response.config)
            self._batchable[(attempt.model, attempt.version)] = batchable
        cap = self.coalesce.max_rows
        return batchable.max_rows if cap is None else min(cap, batchable.max_rows)

    async def _send_coalesced(
        self, call: PreparedCall, attempt: Attempt, rows: int, limit: int
    ) -> dict[str, np.ndarray]:
        """Join the group of calls like this one, or start one and send it when the loop comes round."""
        ep = attempt.endpoint
        with map_grpc_errors(model=attempt.model, version=attempt.version, endpoint=ep.url):
            self._header(call, attempt)  # checks the inputs against the metadata (cached)
        key = key_of(ep.url, attempt.model, attempt.version, call.outputs, call.signature)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, np.ndarray]] = loop.create_future()
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
                self._spawn_delivery(group)
            raise
        self._close_group(group)
        if len(group.members) == 1:
            return await self._send_alone(call, attempt)
        self._spawn_delivery(group)  # a task of its own, so cancelling this call doesn't cancel the others'
        return await future

    def _close_group(self, group: Group) -> None:
        if self._groups.get(group.key) is group:
            del self._groups[group.key]

    def _spawn_delivery(self, group: Group) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(group))
        self._group_tasks.add(task)
        task.add_done_callback(self._group_tasks.discard)

    async def _deliver(self, group: Group) -> None:
        """Send the group as one request and hand each call its rows; on a failure that isn't the
        transport's, send the calls one by one so that only a bad call fails."""
        call, attempt, _ = group.members[0]
        ep = attempt.endpoint
        signature, raws = merge(group)
        merged = PreparedCall(call.model, signature, raws, call.outputs, sum(map(len, raws)), {})
        try:
            with map_grpc_errors(model=attempt.model, version=attempt.version, endpoint=ep.url):
                response = await ep.handle.infer(
                    self._encode(merged, attempt), timeout=group.timeout_s(), metadata=self._grpc_metadata
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
            for _, _, future in group.members:
                if not future.done():
                    future.set_exception(exc)
            return
        except ClientError:
            await asyncio.gather(*(self._deliver_alone(c, a, f) for c, a, f in group.members))
            return
        except asyncio.CancelledError:
            for _, _, future in group.members:
                future.cancel()
            raise
        except Exception as exc:  # never leave a caller waiting
            for _, _, future in group.members:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), part in zip(group.members, parts, strict=True):
            if not future.done():
                future.set_result(part)

    async def _send_alone(self, call: PreparedCall, attempt: Attempt) -> dict[str, np.ndarray]:
        ep = attempt.endpoint
        with map_grpc_errors(model=attempt.model, version=attempt.version, endpoint=ep.url):
            response = await ep.handle.infer(
                self._encode(call, attempt), timeout=attempt.timeout_s, metadata=self._grpc_metadata
            )
        return decode_response(response)

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

    async def _fetch_metadata(
        self, model: str, version: str | None, ep: Endpoint, timeout_s: float | None
    ) -> None:
        with map_grpc_errors(model=model, version=version, endpoint=ep.url):
            response = await ep.handle.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=model, version=version or ""),
                timeout=timeout_s,
                metadata=self._grpc_metadata,
            )
        self._model_metadata[(model, version)] = ModelMetadata.from_proto(response)

    async def infer_many(
        self,
        model: str,
        requests: Sequence[Mapping[str, Any]],
        *,
        concurrency: int = 16,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Run many requests, ``concurrency`` at a time; the answers in the order of ``requests``.

        Example:
            >>> outs = await client.infer_many("mlp", [{"x": x} for x in batches])       # doctest: +SKIP
        """
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(request: Mapping[str, Any]) -> dict[str, np.ndarray]:
            async with gate:
                return await self.infer(model, request, version, outputs, timeout_s)

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def infer_batched(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        batch_size: int,
        concurrency: int = 4,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Split ``inputs`` along axis 0 into ``batch_size`` batches, run them concurrently, join answers."""
        answers = await self.infer_many(
            model,
            split_batches(inputs, batch_size),
            concurrency=concurrency,
            version=version,
            outputs=outputs,
            timeout_s=timeout_s,
        )
        return join_batches(answers)

    # -- shadows -----------------------------------------------------------------------------------------

    def _start_shadow(
        self,
        model: str,
        shadow: Shadow,
        call: PreparedCall,
        primary: dict[str, np.ndarray],
        timeout_s: float | None,
    ) -> None:
        if self._closed:
            return
        mirror = call.mirror()
        task = asyncio.get_running_loop().create_task(
            self._run_shadow(model, shadow, mirror, primary, timeout_s)
        )
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _run_shadow(
        self,
        model: str,
        shadow: Shadow,
        call: PreparedCall,
        primary: dict[str, np.ndarray],
        timeout_s: float | None,
    ) -> None:
        started = time.perf_counter()
        try:
            result = await self._run(
                [(shadow.model, shadow.version)], timeout_s, lambda a: self._send_infer(call, a)
            )
        except ClientError as exc:
            self._record_shadow(model, shadow, primary, None, exc, time.perf_counter() - started)
        else:
            self._record_shadow(model, shadow, primary, result, None, time.perf_counter() - started)

    async def wait_shadows(self) -> None:
        """Wait until every shadow call started so far has been compared."""
        if self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)

    # -- health ------------------------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        assert self.health_check is not None
        while True:
            await asyncio.sleep(self.health_check.interval_s)
            for ep in self._pool.endpoints:
                self._pool.mark_health(ep, await self._ping(ep), time.monotonic())

    async def _ping(self, ep: Endpoint) -> bool:
        timeout_s = self.health_check.timeout_s if self.health_check else 1.0
        try:
            response = await ep.handle.stub.ServerReady(
                pb.ServerReadyRequest(), timeout=timeout_s, metadata=self._grpc_metadata
            )
            return bool(response.ready)
        except grpc.RpcError:
            return False

    # -- health, metadata, config, statistics, model control ---------------------------------------------

    async def _control(
        self,
        method: str,
        request: Any,
        *,
        model: str = "",
        version: str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        async def send(attempt: Attempt) -> Any:
            with map_grpc_errors(model=model or None, version=version, endpoint=attempt.endpoint.url):
                return await getattr(attempt.endpoint.handle.stub, method)(
                    request, timeout=attempt.timeout_s, metadata=self._grpc_metadata
                )

        return await self._run([(model, version)], timeout_s, send)

    async def endpoint_health(self) -> dict[str, bool]:
        """``{url: ready}`` for every endpoint, asked now (and fed to the pool)."""
        self._open()
        result = {}
        for ep in self._pool.endpoints:
            ready = await self._ping(ep)
            self._pool.mark_health(ep, ready, time.monotonic())
            result[ep.url] = ready
        return result

    async def is_server_live(self) -> bool:
        """Whether a server answers as live (any endpoint)."""
        try:
            return bool((await self._control("ServerLive", pb.ServerLiveRequest())).live)
        except ClientError:
            return False

    async def is_server_ready(self) -> bool:
        """Whether a server is ready (any endpoint)."""
        try:
            return bool((await self._control("ServerReady", pb.ServerReadyRequest())).ready)
        except ClientError:
            return False

    async def is_model_ready(self, model: str, version: str | int | None = None) -> bool:
        """Whether ``model`` (``version``) is ready to serve on a server."""
        v = None if version is None else str(version)
        try:
            response = await self._control(
                "ModelReady", pb.ModelReadyRequest(name=model, version=v or ""), model=model, version=v
            )
            return bool(response.ready)
        except ClientError:
            return False

    async def server_metadata(self) -> dict[str, Any]:
        """The server's name, version and extensions."""
        return _as_dict(await self._control("ServerMetadata", pb.ServerMetadataRequest()))

    async def model_metadata(self, model: str, version: str | int | None = None) -> ModelMetadata:
        """A model's inputs and outputs (see :meth:`Client.model_metadata`)."""
        v = None if version is None else str(version)
        response = await self._control(
            "ModelMetadata", pb.ModelMetadataRequest(name=model, version=v or ""), model=model, version=v
        )
        meta = ModelMetadata.from_proto(response)
        self._model_metadata[(model, v)] = meta
        return meta

    async def model_config(self, model: str, version: str | int | None = None) -> Any:
        """The model's config as the server runs it (see :meth:`Client.model_config`)."""
        v = None if version is None else str(version)
        response = await self._control(
            "ModelConfig", pb.ModelConfigRequest(name=model, version=v or ""), model=model, version=v
        )
        return response.config

    async def model_statistics(self, model: str = "", version: str | int | None = None) -> dict[str, Any]:
        """Triton's statistics for ``model`` (all models when empty)."""
        v = None if version is None else str(version)
        return _as_dict(
            await self._control(
                "ModelStatistics",
                pb.ModelStatisticsRequest(name=model, version=v or ""),
                model=model,
                version=v,
            )
        )

    async def repository_index(self) -> list[dict[str, Any]]:
        """Every model in the repository with its state and reason."""
        return _as_dict(await self._control("RepositoryIndex", pb.RepositoryIndexRequest())).get("models", [])

    async def load_model(self, model: str, config: str | None = None) -> None:
        """Load (or reload) ``model`` on every endpoint (servers in explicit model-control mode)."""
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if config is not None:
            request.parameters["config"].string_param = config
        await self._on_every_endpoint("RepositoryModelLoad", request, model)

    async def unload_model(self, model: str) -> None:
        """Unload ``model`` on every endpoint."""
        await self._on_every_endpoint(
            "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model), model
        )

    async def _on_every_endpoint(self, method: str, request: Any, model: str) -> None:
        self._open()
        errors: list[ClientError] = []
        for ep in self._pool.endpoints:
            try:
                with map_grpc_errors(model=model, endpoint=ep.url):
                    await getattr(ep.handle.stub, method)(request, metadata=self._grpc_metadata)
            except ClientError as exc:
                errors.append(exc)
        self._model_metadata = {k: v for k, v in self._model_metadata.items() if k[0] != model}
        self._headers.clear()
        if errors:
            raise errors[0]
