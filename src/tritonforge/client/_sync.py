"""The blocking client: thread-safe, one gRPC channel per endpoint."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tritonforge.client._base import INFER_METHOD, BaseClient, PreparedCall, join_batches, split_batches
from tritonforge.client._codec import ModelMetadata, decode_response
from tritonforge.client._flow import Attempt
from tritonforge.client._mapping import map_grpc_errors
from tritonforge.client._pool import Endpoint
from tritonforge.client.policies import Shadow
from tritonforge.errors import ClientError

__all__ = ["Client"]


class _Transport:
    __slots__ = ("channel", "infer", "stub")

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        # Raw bytes in (we frame the request ourselves), a parsed response out.
        self.infer = channel.unary_unary(
            INFER_METHOD, request_serializer=None, response_deserializer=pb.ModelInferResponse.FromString
        )


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class Client(BaseClient):
    """A blocking Triton gRPC client over one or several servers: retries, fallbacks, routing, shadows.

    Example:
        >>> with Client(["localhost:8001", "localhost:8011"], deadline=5.0) as client:   # doctest: +SKIP
        ...     out = client.infer("clf", {"x": np.zeros((1, 8), np.float32)})
        ...     out["probs"].shape
        (1, 3)

    Args:
        urls: one ``host:port`` or a list of them (replicas serving the same models).
        deadline: a :class:`Deadline` or a number of seconds for a whole call (``timeout_s`` per call wins).
        retry: :class:`RetryPolicy` for transient errors (``RetryPolicy.none()`` to disable).
        breaker: :class:`CircuitBreaker` per endpoint. health_check: :class:`HealthCheck` in the background.
        routes: ``{model: TrafficSplit}`` (A/B, canary); fallbacks: ``{model: Fallback}``;
            shadows: ``{model: Shadow}``.
        shared_memory: :class:`SharedMemory` or its mode (``"auto"``, ``"system"``, ``"cuda"``, ``"off"``).
        headers: sent with every call (Triton's restricted protocols, auth proxies). tls: :class:`TLSConfig`.
        validate: check inputs against the model's metadata before sending (once per input signature).
        registry / metrics: prometheus registry for the client metrics; ``metrics=False`` to turn them off.
        hooks: callables given a :class:`ClientEvent` for each call, retry, fallback and shadow comparison.

    Raises (from calls): :class:`InvalidRequestError`, :class:`ModelNotFoundError`, :class:`InferenceFailed`,
    :class:`DeadlineExceeded`, :class:`Unavailable`, :class:`AllEndpointsFailed`,
    :class:`AuthenticationError`.
    """

    def __init__(self, urls: str | Sequence[str], **options: Any) -> None:
        super().__init__(urls, **options)
        credentials = self._credentials()
        for ep in self._pool.endpoints:
            channel = (
                grpc.insecure_channel(ep.url, options=self._channel_options)
                if credentials is None
                else grpc.secure_channel(ep.url, credentials, options=self._channel_options)
            )
            ep.handle = _Transport(channel)
        self._shadow_executor: ThreadPoolExecutor | None = None
        self._shadow_lock = threading.Lock()
        self._stop = threading.Event()
        self._health_thread: threading.Thread | None = None
        if self.health_check is not None:
            self._health_thread = threading.Thread(
                target=self._health_loop, name="tritonforge-health", daemon=True
            )
            self._health_thread.start()

    # -- lifecycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop health checks, finish shadow calls, unregister and remove shared memory, close channels."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._health_thread is not None:
            self._health_thread.join()
        if self._shadow_executor is not None:
            self._shadow_executor.shutdown(wait=True)
        if self._shm is not None:
            for region in self._shm.regions():
                method, request = self._unregister_request(region)
                for ep in self._pool.endpoints:
                    if ep.url in region.registered_on:
                        with contextlib.suppress(grpc.RpcError):
                            getattr(ep.handle.stub, method)(
                                request, timeout=2.0, metadata=self._grpc_metadata
                            )
            self._shm.close()
        for ep in self._pool.endpoints:
            ep.handle.channel.close()

    # -- the driver of the shared decisions --------------------------------------------------------------

    def _run(
        self,
        targets: Sequence[tuple[str, str | None]],
        timeout_s: float | None,
        send: Callable[[Attempt], Any],
        on_attempt: Callable[[Attempt], None] | None = None,
    ) -> Any:
        flow = self._flow(targets, timeout_s)
        try:
            step = next(flow)
            while True:
                if type(step) is Attempt:
                    if on_attempt is not None:
                        on_attempt(step)
                    try:
                        outcome = send(step)
                    except ClientError as exc:
                        self._on_attempt_error(step, exc)
                        outcome = exc
                else:
                    time.sleep(step.seconds)
                    outcome = None
                step = flow.send(outcome)
        except StopIteration as stop:
            return stop.value
        finally:
            flow.close()

    # -- inference ---------------------------------------------------------------------------------------

    def infer(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        key: str | bytes | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` and return ``{output name: ndarray}``.

        Example:
            >>> client.infer("mlp", {"x": np.ones((2, 8), np.float32)})["probs"].shape   # doctest: +SKIP
            (2, 3)

        Args:
            model: the model's name (routes and fallbacks configured for it apply).
            inputs: ``{input name: array}``; strings as object arrays of ``bytes`` (Triton's BYTES).
            version: a version; ``None`` lets a route choose, or the server's policy.
            outputs: the outputs to return (all when ``None``).
            timeout_s: this call's deadline, retries and fallbacks included.
            key: the stickiness key for routes with ``sticky=True`` (a user or session id).

        Raises:
            InvalidRequestError: a wrong input name, dtype or shape (checked before sending).
            ModelNotFoundError / InferenceFailed: no such model / the model failed, and no fallback answered.
            DeadlineExceeded: no answer within the deadline. AllEndpointsFailed: no server is usable.
        """
        started = time.perf_counter()
        call = self._prepare(model, inputs, outputs)
        targets = self._targets(model, version, key)
        last: list[Attempt] = []

        def on_attempt(attempt: Attempt) -> None:
            last[:] = (attempt,)
            self._on_attempt(model, attempt)

        try:
            result = self._run(targets, timeout_s, lambda a: self._send_infer(call, a), on_attempt)
        except ClientError as exc:
            self._on_done(model, targets[0][1], started, exc, last[0] if last else None)
            raise
        self._on_done(model, targets[0][1], started, None, last[0] if last else None)
        if self.shadows:
            shadow = self._shadow_for(model)
            if shadow is not None:
                self._start_shadow(model, shadow, call, result, timeout_s)
        return result

    def _send_infer(self, call: PreparedCall, attempt: Attempt) -> dict[str, np.ndarray]:
        ep = attempt.endpoint
        if self._needs_metadata(attempt.model, attempt.version):
            self._fetch_metadata(attempt.model, attempt.version, ep, attempt.timeout_s)
        with map_grpc_errors(model=attempt.model, version=attempt.version, endpoint=ep.url):
            if not self._use_shm(call, ep.url):
                response = ep.handle.infer(
                    self._encode(call, attempt), timeout=attempt.timeout_s, metadata=self._grpc_metadata
                )
                return decode_response(response)
            self._check_for_shm(call, attempt)
            assert self._shm is not None
            body, region = self._shm_request(call, attempt.model, attempt.version)
            try:
                if ep.url not in region.registered_on:
                    method, request = self._register_request(region)
                    getattr(ep.handle.stub, method)(
                        request, timeout=attempt.timeout_s, metadata=self._grpc_metadata
                    )
                    region.registered_on.add(ep.url)
                response = ep.handle.infer(body, timeout=attempt.timeout_s, metadata=self._grpc_metadata)
            finally:
                self._shm.release(region)
            return decode_response(response)

    def _fetch_metadata(self, model: str, version: str | None, ep: Endpoint, timeout_s: float | None) -> None:
        with map_grpc_errors(model=model, version=version, endpoint=ep.url):
            response = ep.handle.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=model, version=version or ""),
                timeout=timeout_s,
                metadata=self._grpc_metadata,
            )
        self._model_metadata[(model, version)] = ModelMetadata.from_proto(response)

    def infer_many(
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
            >>> outs = client.infer_many("mlp", [{"x": x} for x in batches], concurrency=8)  # doctest: +SKIP

        Raises:
            The first error of any request (the others are still run to completion).
        """
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(requests)))) as pool:
            futures = [pool.submit(self.infer, model, r, version, outputs, timeout_s) for r in requests]
            return [f.result() for f in futures]

    def infer_batched(
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
        """Split ``inputs`` along axis 0 into ``batch_size`` batches, run them concurrently, join the answers.

        Example:
            >>> x = np.ones((1000, 8), np.float32)
            >>> client.infer_batched("mlp", {"x": x}, batch_size=32)  # doctest: +SKIP
        """
        answers = self.infer_many(
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
        # Own copies: the caller may reuse its arrays as soon as we return.
        mirror = call.mirror()
        with self._shadow_lock:
            if self._closed:
                return
            if self._shadow_executor is None:
                self._shadow_executor = ThreadPoolExecutor(
                    max_workers=2, thread_name_prefix="tritonforge-shadow"
                )
            self._shadow_executor.submit(self._run_shadow, model, shadow, mirror, primary, timeout_s)

    def _run_shadow(
        self,
        model: str,
        shadow: Shadow,
        call: PreparedCall,
        primary: dict[str, np.ndarray],
        timeout_s: float | None,
    ) -> None:
        started = time.perf_counter()
        try:
            result = self._run(
                [(shadow.model, shadow.version)], timeout_s, lambda a: self._send_infer(call, a)
            )
        except ClientError as exc:
            self._record_shadow(model, shadow, primary, None, exc, time.perf_counter() - started)
        else:
            self._record_shadow(model, shadow, primary, result, None, time.perf_counter() - started)

    def wait_shadows(self) -> None:
        """Wait until every shadow call started so far has been compared."""
        with self._shadow_lock:
            executor, self._shadow_executor = self._shadow_executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    # -- health ------------------------------------------------------------------------------------------

    def _health_loop(self) -> None:
        assert self.health_check is not None
        while not self._stop.wait(self.health_check.interval_s):
            for ep in self._pool.endpoints:
                if self._stop.is_set():
                    return
                self._pool.mark_health(ep, self._ping(ep), time.monotonic())

    def _ping(self, ep: Endpoint) -> bool:
        assert self.health_check is not None
        try:
            return bool(
                ep.handle.stub.ServerReady(
                    pb.ServerReadyRequest(), timeout=self.health_check.timeout_s, metadata=self._grpc_metadata
                ).ready
            )
        except grpc.RpcError:
            return False

    # -- health, metadata, config, statistics, model control ---------------------------------------------

    def _control(
        self,
        method: str,
        request: Any,
        *,
        model: str = "",
        version: str | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        def send(attempt: Attempt) -> Any:
            with map_grpc_errors(model=model or None, version=version, endpoint=attempt.endpoint.url):
                return getattr(attempt.endpoint.handle.stub, method)(
                    request, timeout=attempt.timeout_s, metadata=self._grpc_metadata
                )

        return self._run([(model, version)], timeout_s, send)

    def endpoint_health(self) -> dict[str, bool]:
        """``{url: ready}`` for every endpoint, asked now (and fed to the pool)."""
        result = {}
        for ep in self._pool.endpoints:
            ready = self._ping(ep) if self.health_check else _ping_once(ep, self._grpc_metadata)
            self._pool.mark_health(ep, ready, time.monotonic())
            result[ep.url] = ready
        return result

    def is_server_live(self) -> bool:
        """Whether a server answers as live (any endpoint)."""
        try:
            return bool(self._control("ServerLive", pb.ServerLiveRequest()).live)
        except ClientError:
            return False

    def is_server_ready(self) -> bool:
        """Whether a server is ready (any endpoint)."""
        try:
            return bool(self._control("ServerReady", pb.ServerReadyRequest()).ready)
        except ClientError:
            return False

    def is_model_ready(self, model: str, version: str | int | None = None) -> bool:
        """Whether ``model`` (``version``) is ready to serve on a server."""
        v = None if version is None else str(version)
        try:
            return bool(
                self._control(
                    "ModelReady", pb.ModelReadyRequest(name=model, version=v or ""), model=model, version=v
                ).ready
            )
        except ClientError:
            return False

    def server_metadata(self) -> dict[str, Any]:
        """The server's name, version and extensions."""
        return _as_dict(self._control("ServerMetadata", pb.ServerMetadataRequest()))

    def model_metadata(self, model: str, version: str | int | None = None) -> ModelMetadata:
        """A model's inputs and outputs (names, datatypes, shapes with ``-1`` for variable dims).

        Raises:
            ModelNotFoundError: no such model or version is loaded.
        """
        v = None if version is None else str(version)
        response = self._control(
            "ModelMetadata", pb.ModelMetadataRequest(name=model, version=v or ""), model=model, version=v
        )
        meta = ModelMetadata.from_proto(response)
        self._model_metadata[(model, v)] = meta
        return meta

    def model_config(self, model: str, version: str | int | None = None) -> Any:
        """The model's config as the server runs it (``model_config_pb2.ModelConfig``, autofilled fields too).

        Turn it into a :class:`tritonforge.config.ModelConfig` with ``ModelConfig.from_proto`` when its fields
        are ones we model.
        """
        v = None if version is None else str(version)
        return self._control(
            "ModelConfig", pb.ModelConfigRequest(name=model, version=v or ""), model=model, version=v
        ).config

    def model_statistics(self, model: str = "", version: str | int | None = None) -> dict[str, Any]:
        """Triton's statistics for ``model`` (all models when empty): counts, queue and compute times."""
        v = None if version is None else str(version)
        return _as_dict(
            self._control(
                "ModelStatistics",
                pb.ModelStatisticsRequest(name=model, version=v or ""),
                model=model,
                version=v,
            )
        )

    def repository_index(self) -> list[dict[str, Any]]:
        """Every model in the repository with its state (ready, unavailable) and reason."""
        return _as_dict(self._control("RepositoryIndex", pb.RepositoryIndexRequest())).get("models", [])

    def load_model(self, model: str, config: str | None = None) -> None:
        """Load (or reload) ``model`` on every endpoint (servers in explicit model-control mode).

        Raises:
            ClientError: the first endpoint's error, after every endpoint was asked.
        """
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if config is not None:
            request.parameters["config"].string_param = config
        self._on_every_endpoint("RepositoryModelLoad", request, model)

    def unload_model(self, model: str) -> None:
        """Unload ``model`` on every endpoint."""
        self._on_every_endpoint(
            "RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=model), model
        )

    def _on_every_endpoint(self, method: str, request: Any, model: str) -> None:
        errors: list[ClientError] = []
        for ep in self._pool.endpoints:
            try:
                with map_grpc_errors(model=model, endpoint=ep.url):
                    getattr(ep.handle.stub, method)(request, metadata=self._grpc_metadata)
            except ClientError as exc:
                errors.append(exc)
        self._model_metadata = {k: v for k, v in self._model_metadata.items() if k[0] != model}
        self._headers.clear()
        if errors:
            raise errors[0]


def _ping_once(ep: Endpoint, metadata: Any) -> bool:
    try:
        return bool(ep.handle.stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0, metadata=metadata).ready)
    except grpc.RpcError:
        return False
