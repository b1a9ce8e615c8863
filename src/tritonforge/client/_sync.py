"""The blocking client: a driver of the core's flows (``_base``); thread-safe, a gRPC channel per endpoint."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from tritonforge.client._base import BaseClient, Flow, InferOptions, ManyOptions, Outputs
from tritonforge.client._codec import ModelMetadata
from tritonforge.client._flow import Each, Rpc, Run, Sleep
from tritonforge.client._mapping import map_grpc_errors
from tritonforge.client._pool import Capabilities
from tritonforge.errors import ClientError

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb2
    from typing_extensions import Unpack

__all__ = ["Client"]

T = TypeVar("T")


class Client(BaseClient):
    """A blocking Triton gRPC client over one or several servers: retries, fallbacks, routing, shadows.

    Example:
        >>> with Client(["localhost:8001", "localhost:8011"], deadline=5.0) as client:   # doctest: +SKIP
        ...     out = client.infer("clf", {"x": np.zeros((1, 8), np.float32)})
        ...     out["probs"].shape
        (1, 3)

    The options (all keyword-only after ``urls``) are those of :class:`BaseClient`: ``deadline``, ``retry``,
    ``breaker``, ``placement``, ``health_check``, ``routes``, ``fallbacks``, ``shadows``, ``shared_memory``,
    ``headers``, ``tls``, ``validate``, ``allow_non_finite``, ``registry``, ``metrics``, ``hooks``,
    ``channel_options``, ``seed`` (``coalesce`` is :class:`AsyncClient`'s).

    Raises (from calls): :class:`InvalidRequestError` (and its :class:`RequestTooLarge`, :class:`NotOffered`),
    :class:`ModelNotFoundError`, :class:`InferenceFailed`, :class:`DeadlineExceeded`, :class:`Unavailable`,
    :class:`AllEndpointsFailed`, :class:`AuthenticationError`; :class:`ClientError` once closed.
    """

    def _setup(self) -> None:
        self._connect(grpc)
        self._background: ThreadPoolExecutor | None = None
        self._background_lock = threading.Lock()
        self._stop = threading.Event()
        self._health_thread: threading.Thread | None = None
        if self.health_check is not None:
            self._health_thread = threading.Thread(
                target=self._health_loop, name="tritonforge-health", daemon=True
            )
            self._health_thread.start()
        self._discovery_thread: threading.Thread | None = None
        if self._sources.dynamic:
            self._discovery_thread = threading.Thread(
                target=self._discovery_loop, name="tritonforge-dns", daemon=True
            )
            self._discovery_thread.start()

    # -- the driver --------------------------------------------------------------------------------------

    def _drive(self, flow: Flow[T]) -> T:
        run = Run(flow)
        try:
            while not run.done:
                run.step(self._do)
        finally:
            flow.close()
        return run.result

    def _do(self, op: Any) -> Any:
        kind = type(op)
        if kind is Rpc:
            with map_grpc_errors(
                model=op.model,
                version=op.version,
                endpoint=op.endpoint.url,
                method=op.method,
                tls=self._tls_mode,
            ):
                if op.method == "ModelStreamInfer":  # a probe: an empty stream, answered or refused
                    stream = op.endpoint.handle.methods[op.method]
                    return list(stream(iter(()), timeout=op.timeout_s, metadata=self._metadata(op.method)))
                call = op.endpoint.handle.methods[op.method]
                return call(op.request, timeout=op.timeout_s, metadata=self._metadata(op.method))
        if kind is Sleep:
            time.sleep(op.seconds)
            return None
        if kind is Each:
            if len(op.flows) < 2:
                return [self._settle(f) for f in op.flows]
            workers = min(len(op.flows), op.concurrency or len(op.flows))
            with ThreadPoolExecutor(workers, thread_name_prefix="tritonforge-each") as threads:
                return list(threads.map(self._settle, op.flows))
        with self._background_lock:  # Spawn
            if not self._closed:
                if self._background is None:
                    self._background = ThreadPoolExecutor(2, thread_name_prefix="tritonforge-shadow")
                self._background.submit(self._drive, op.flow)
        return None

    def _settle(self, flow: Flow[Any]) -> Any:
        """The flow's result, or the error it raised."""
        try:
            return self._drive(flow)
        except ClientError as exc:
            return exc

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
        for thread in (self._health_thread, self._discovery_thread):
            if thread is not None:
                thread.join()
        self.wait_shadows()
        self._drive(self._close_flow())
        for ep in self._pool.every_endpoint():
            ep.handle.channel.close()

    def _health_loop(self) -> None:
        assert self.health_check is not None
        while not self._stop.wait(self.health_check.interval_s):
            try:
                self._drive(self._health_flow())
            except ClientError:
                return  # closed meanwhile

    def _discovery_loop(self) -> None:
        """Re-resolve the ``dns:///`` URLs every ``refresh_s``; close the channels of drained replicas."""
        while not self._stop.wait(self._sources.refresh_s):
            self._sources.refresh()
            if self._stop.is_set():
                return  # closed during the look-up: close() owns the channels now
            for ep in self._rediscover():
                ep.handle.channel.close()

    def wait_shadows(self) -> None:
        """Wait until every shadow call started so far has been compared."""
        with self._background_lock:
            executor, self._background = self._background, None
        if executor is not None:
            executor.shutdown(wait=True)

    # -- inference ---------------------------------------------------------------------------------------

    def infer(self, model: str, inputs: Mapping[str, Any], **options: Unpack[InferOptions]) -> Outputs:
        """Run ``model`` on ``inputs`` and return ``{output name: ndarray}``.

        Example:
            >>> client.infer("mlp", {"x": np.ones((2, 8), np.float32)})["probs"].shape   # doctest: +SKIP
            (2, 3)

        Args:
            model: the model's name (routes and fallbacks configured for it apply).
            inputs: ``{input name: array}``; strings as object arrays of ``bytes`` (Triton's BYTES).
            options: ``version``, ``outputs``, ``timeout_s``, ``key``, ``request_id`` (the id Triton's
                request carries and the call's events show; the client makes one by default), see
                :class:`InferOptions`.

        Raises:
            InvalidRequestError: inputs that are not a mapping of arrays, a wrong input name, dtype or shape
                (checked before sending), NaN/±inf where not allowed, a ``request_id`` that is not a
                non-empty string; RequestTooLarge over the server's
                message limit (never retried, the endpoint stays healthy).
            ModelNotFoundError / InferenceFailed: no such model / the model failed, and no fallback answered.
            DeadlineExceeded: no answer within the deadline. AllEndpointsFailed: no server is usable.
        """
        return self._drive(self._infer_flow(model, inputs, **options))

    def infer_many(
        self, model: str, requests: Sequence[Mapping[str, Any]], **options: Unpack[ManyOptions]
    ) -> list[Outputs]:
        """Run many requests, ``concurrency`` at a time (16); the answers in the order of ``requests``.

        Example:
            >>> outs = client.infer_many("mlp", [{"x": x} for x in batches], concurrency=8)  # doctest: +SKIP

        Raises:
            TritonForgeError: the first error of any request (the others are still run to completion).
        """
        return self._drive(self._infer_many_flow(model, requests, **options))

    def infer_batched(
        self, model: str, inputs: Mapping[str, Any], batch_size: int, **options: Unpack[ManyOptions]
    ) -> Outputs:
        """Split ``inputs`` along axis 0 into batches of at most ``batch_size`` rows, run them ``concurrency``
        (4) at a time, join the answers. Batches are made smaller where a server's message limit requires.

        Example:
            >>> x = np.ones((1000, 8), np.float32)
            >>> client.infer_batched("mlp", {"x": x}, batch_size=32)  # doctest: +SKIP

        Raises:
            RequestTooLarge: a single row is over the message limit. Otherwise as :meth:`infer`.
        """
        return self._drive(self._infer_batched_flow(model, inputs, batch_size, **options))

    # -- health, metadata, config, statistics, capabilities, model control --------------------------------

    def endpoint_health(self) -> dict[str, bool]:
        """``{url: ready}`` for every endpoint, asked now (and fed to the pool)."""
        return self._drive(self._health_flow())

    def capabilities(self) -> dict[str, Capabilities]:
        """``{url: Capabilities}``: what each server offers beyond the core protocol (probed once)."""
        return self._drive(self._capabilities_flow())

    def is_server_live(self) -> bool:
        """Whether a server answers as live (any endpoint)."""
        return self._drive(self._is_server_live_flow())

    def is_server_ready(self) -> bool:
        """Whether a server is ready (any endpoint)."""
        return self._drive(self._is_server_ready_flow())

    def is_model_ready(self, model: str, version: str | int | None = None) -> bool:
        """Whether ``model`` (``version``) is ready to serve on a server."""
        return self._drive(self._is_model_ready_flow(model, version))

    def server_metadata(self) -> dict[str, Any]:
        """The server's name, version and extensions."""
        return self._drive(self._server_metadata_flow())

    def model_metadata(self, model: str, version: str | int | None = None) -> ModelMetadata:
        """A model's inputs and outputs (names, datatypes, shapes with ``-1`` for variable dims).

        Raises:
            ModelNotFoundError: no such model or version is loaded.
        """
        return self._drive(self._model_metadata_flow(model, version))

    def model_config(self, model: str, version: str | int | None = None) -> pb2.ModelConfig:
        """The model's config as the server runs it (``model_config_pb2.ModelConfig``, autofilled fields too).

        Turn it into a :class:`tritonforge.config.ModelConfig` with ``ModelConfig.from_proto`` when its fields
        are ones we model.

        Raises:
            NotOffered: the server has no model configs (not Triton); use :meth:`model_metadata`.
            ModelNotFoundError: no such model or version is loaded.
        """
        return self._drive(self._model_config_flow(model, version))

    def model_statistics(self, model: str = "", version: str | int | None = None) -> dict[str, Any]:
        """Triton's statistics for ``model`` (all models when empty): counts, queue and compute times.

        Raises:
            NotOffered: the server keeps no statistics (not Triton).
        """
        return self._drive(self._model_statistics_flow(model, version))

    def repository_index(self) -> list[dict[str, Any]]:
        """Every model in the repository with its state (ready, unavailable) and reason."""
        return self._drive(self._repository_index_flow())

    def load_model(self, model: str, config: str | None = None, *, timeout_s: float | None = None) -> None:
        """Load (or reload) ``model`` on every endpoint at once (servers in explicit model-control mode).

        Args:
            model: the model's name in the servers' repository.
            config: a JSON model config to load it with instead of its ``config.pbtxt``.
            timeout_s: each endpoint's time to answer (default :data:`DEFAULT_CONTROL_TIMEOUT_S`, 300 s):
                a hung server never blocks the call for longer.

        Raises:
            ClientError: the first endpoint's error (e.g. :class:`DeadlineExceeded`,
                :class:`InvalidRequestError` for a model that fails to load), after every endpoint answered.
        """
        self._drive(self._load_model_flow(model, config, timeout_s))

    def unload_model(self, model: str, *, timeout_s: float | None = None) -> None:
        """Unload ``model`` on every endpoint at once.

        Raises:
            ClientError: the first endpoint's error, after every endpoint answered or timed out.
        """
        self._drive(self._unload_model_flow(model, timeout_s))
