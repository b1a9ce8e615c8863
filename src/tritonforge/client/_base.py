"""What the sync and async clients share, none of it I/O: options, the endpoint pool, targets (routing and
fallbacks), request encoding with its caches, shadow decisions and comparisons, metrics and hooks."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb

from tritonforge.client._codec import (
    ModelMetadata,
    as_array,
    frame,
    request_header,
    tensor_bytes,
    triton_dtype,
)
from tritonforge.client._flow import Attempt, BudgetState, call_flow
from tritonforge.client._pool import EndpointPool, EndpointStatus
from tritonforge.client.observe import ClientEvent, ClientMetrics, Hook, ShadowStats
from tritonforge.client.policies import (
    DEFAULT_DEADLINE,
    DEFAULT_RETRY,
    CircuitBreaker,
    Deadline,
    Fallback,
    HealthCheck,
    RetryPolicy,
    Shadow,
    SharedMemory,
    TLSConfig,
    TrafficSplit,
    as_deadline,
)
from tritonforge.client.shm import (
    CudaRegion,
    ShmPool,
    SystemRegion,
    cuda_available,
    is_local,
    system_shm_available,
)
from tritonforge.errors import ClientError, InvalidRequestError

__all__ = ["INFER_METHOD", "BaseClient", "PreparedCall", "join_batches", "split_batches"]

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
_HEADER_CACHE_LIMIT = 4096
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_retries", 0),  # we retry, with a budget, across endpoints
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


def _pem(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _url(url: str) -> str:
    for scheme in ("grpc://", "grpcs://"):
        if url.startswith(scheme):
            return url[len(scheme) :]
    return url


@dataclass(slots=True)
class PreparedCall:
    """One call's inputs, encoded once whatever the number of attempts."""

    model: str
    signature: tuple[tuple[str, str, tuple[int, ...]], ...]
    raws: list[Any]
    outputs: tuple[str, ...] | None
    nbytes: int
    arrays: Mapping[str, np.ndarray]

    def mirror(self) -> PreparedCall:
        """A copy for a shadow call: owns its bytes (the caller may reuse its buffers), no arrays."""
        return PreparedCall(
            self.model, self.signature, [bytes(r) for r in self.raws], self.outputs, self.nbytes, {}
        )


class BaseClient:
    """Options and decisions shared by :class:`Client` and :class:`AsyncClient` (see their docs)."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        deadline: Deadline | float | None = DEFAULT_DEADLINE,
        retry: RetryPolicy = DEFAULT_RETRY,
        breaker: CircuitBreaker | None = None,
        health_check: HealthCheck | None = None,
        routes: Mapping[str, TrafficSplit] | None = None,
        fallbacks: Mapping[str, Fallback] | None = None,
        shadows: Mapping[str, Shadow] | None = None,
        shared_memory: SharedMemory | str = "auto",
        headers: Mapping[str, str] | None = None,
        tls: TLSConfig | None = None,
        validate: bool = True,
        registry: CollectorRegistry | None = None,
        metrics: bool = True,
        hooks: Iterable[Hook] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
        seed: int | None = None,
    ) -> None:
        url_list = [urls] if isinstance(urls, str) else list(urls)
        self.urls = [_url(u) for u in url_list]
        self.deadline = as_deadline(deadline)
        self.retry = retry
        self.breaker = breaker or CircuitBreaker()
        self.health_check = health_check
        self.routes = dict(routes or {})
        self.fallbacks = dict(fallbacks or {})
        self.shadows = dict(shadows or {})
        self.shared_memory = (
            SharedMemory(shared_memory) if isinstance(shared_memory, str) else shared_memory  # type: ignore[arg-type]
        )
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.tls = tls
        self.validate = validate
        self.hooks: list[Hook] = list(hooks)
        self._rng = random.Random(seed)
        self._pool = EndpointPool(self.urls, self.breaker, random.Random(seed))
        self._budget = BudgetState(retry.budget, time.monotonic())
        self._metrics = ClientMetrics(registry) if metrics else None
        self._grpc_metadata: tuple[tuple[str, str], ...] | None = tuple(self.headers.items()) or None
        self._channel_options = list(_CHANNEL_OPTIONS) + list(channel_options)
        if tls is not None and tls.server_name:
            self._channel_options.append(("grpc.ssl_target_name_override", tls.server_name))
        self._model_metadata: dict[tuple[str, str | None], ModelMetadata] = {}
        self._headers: dict[Any, bytes] = {}
        self._shm = self._make_shm_pool()
        self._shm_auto = self.shared_memory.mode == "auto"
        self._shm_threshold = self.shared_memory.threshold_bytes
        self.shadow_stats: dict[tuple[str, str], ShadowStats] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.urls}{' closed' if self._closed else ''}>"

    # -- channels ----------------------------------------------------------------------------------------

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.tls.root_certificates),
            private_key=_pem(self.tls.private_key),
            certificate_chain=_pem(self.tls.certificate_chain),
        )

    # -- shared memory -----------------------------------------------------------------------------------

    def _make_shm_pool(self) -> ShmPool | None:
        mode = self.shared_memory.mode
        if mode == "off":
            return None
        if mode == "cuda":
            if not cuda_available():
                raise ClientError(
                    "shared_memory='cuda' needs a GPU and the CUDA packages (cuda-python, "
                    "tritonclient[cuda]); use 'auto' or 'system'"
                )
            return ShmPool("cuda", self.shared_memory.cuda_device)  # pragma: no cover - needs a GPU
        return ShmPool("system") if system_shm_available() else None

    def _use_shm(self, call: PreparedCall, url: str) -> bool:
        pool = self._shm
        if pool is None or (self._shm_auto and call.nbytes < self._shm_threshold):
            return False
        return pool.kind != "system" or is_local(url)

    def _shm_request(
        self, call: PreparedCall, model: str, version: str | None
    ) -> tuple[bytes, SystemRegion | CudaRegion]:
        assert self._shm is not None
        sizes = [len(r) for r in call.raws]
        offsets, total = ShmPool.layout(sizes)
        region = self._shm.acquire(total)
        for raw, offset in zip(call.raws, offsets, strict=True):
            region.write(offset, raw)
        shm = [(region.name, off, size) for off, size in zip(offsets, sizes, strict=True)]
        return request_header(model, version, call.signature, call.outputs, shm), region

    def _register_request(self, region: SystemRegion | CudaRegion) -> tuple[str, Any]:
        if isinstance(region, SystemRegion):
            return "SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
                name=region.name, key=region.key, offset=0, byte_size=region.size
            )
        return "CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest(  # pragma: no cover - GPU
            name=region.name, raw_handle=region.raw_handle(), device_id=region.device, byte_size=region.size
        )

    def _unregister_request(self, region: SystemRegion | CudaRegion) -> tuple[str, Any]:
        if isinstance(region, SystemRegion):
            return "SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest(name=region.name)
        return "CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest(  # pragma: no cover - GPU
            name=region.name
        )

    @property
    def shm_regions(self) -> list[str]:
        """Names of the shared-memory regions this client holds (all removed by close)."""
        return [] if self._shm is None else [r.name for r in self._shm.regions()]

    # -- calls -------------------------------------------------------------------------------------------

    def _prepare(self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None) -> PreparedCall:
        if self._closed:
            raise ClientError("the client is closed", model=model)
        if not inputs:
            raise InvalidRequestError(f"no inputs given for model {model!r}", model=model)
        arrays: dict[str, np.ndarray] = {}
        signature = []
        raws = []
        nbytes = 0
        for name, value in inputs.items():
            array = value if type(value) is np.ndarray else as_array(name, value, model)
            datatype = triton_dtype(array.dtype)
            raw = tensor_bytes(array, datatype)
            arrays[name] = array
            signature.append((name, datatype, array.shape))
            raws.append(raw)
            nbytes += len(raw)
        return PreparedCall(
            model, tuple(signature), raws, None if outputs is None else tuple(outputs), nbytes, arrays
        )

    def _targets(
        self, model: str, version: str | int | None, key: str | bytes | None
    ) -> list[tuple[str, str | None]]:
        first: tuple[str, str | None]
        split = self.routes.get(model) if version is None else None
        if split is not None:
            variant = split.choose(key, self._rng)
            first = (variant.model, variant.version)
        else:
            first = (model, None if version is None else str(version))
        fallback = self.fallbacks.get(model)
        if fallback is None:
            return [first]
        return [first, *(t for t in fallback.chain if t != first)]

    def _flow(self, targets: Sequence[tuple[str, str | None]], timeout_s: float | None) -> Any:
        return call_flow(
            targets,
            pool=self._pool,
            retry=self.retry,
            budget=self._budget,
            deadline=self.deadline,
            timeout_s=timeout_s,
            clock=time.monotonic,
            rng=self._rng,
        )

    def _needs_metadata(self, model: str, version: str | None) -> bool:
        return self.validate and (model, version) not in self._model_metadata

    def _encode(self, call: PreparedCall, attempt: Attempt) -> bytes:
        """The request's bytes (header from cache; inputs checked against the metadata the first time)."""
        return frame(self._header(call, attempt), call.raws)

    def _header(self, call: PreparedCall, attempt: Attempt) -> bytes:
        key = (attempt.model, attempt.version, call.outputs, call.signature)
        header = self._headers.get(key)
        if header is None:
            if self.validate:
                meta = self._model_metadata[(attempt.model, attempt.version)]
                meta.check_inputs(call.signature, attempt.version, attempt.endpoint.url)
            header = request_header(attempt.model, attempt.version, call.signature, call.outputs)
            if len(self._headers) >= _HEADER_CACHE_LIMIT:
                self._headers.clear()
            self._headers[key] = header
        return header

    def _check_for_shm(self, call: PreparedCall, attempt: Attempt) -> None:
        if self.validate:
            meta = self._model_metadata[(attempt.model, attempt.version)]
            meta.check_inputs(call.signature, attempt.version, attempt.endpoint.url)

    def _on_attempt(self, call_model: str, attempt: Attempt) -> None:
        metrics = self._metrics
        if metrics is not None:
            metrics.attempt(attempt.endpoint.url)
            if attempt.retry:
                metrics.retry(call_model)
            if attempt.fallback:
                metrics.fallback(call_model, attempt.model)
        if self.hooks and (attempt.retry or attempt.fallback):
            self._fire(
                ClientEvent(
                    "retry" if attempt.retry else "fallback",
                    attempt.model,
                    attempt.version,
                    attempt.endpoint.url,
                    attempt=attempt.number,
                )
            )

    def _on_attempt_error(self, attempt: Attempt, error: ClientError) -> None:
        if self._metrics is not None:
            self._metrics.endpoint_failure(attempt.endpoint.url, error)

    def _on_done(
        self,
        model: str,
        version: str | None,
        started: float,
        error: ClientError | None,
        attempt: Attempt | None,
    ) -> None:
        latency_s = time.perf_counter() - started
        metrics = self._metrics
        if metrics is not None:
            metrics.call(model, latency_s)
            if error is not None:
                metrics.failure(model, error)
        if self.hooks:
            self._fire(
                ClientEvent(
                    "request",
                    model,
                    attempt.version if attempt else version,
                    attempt.endpoint.url if attempt else None,
                    latency_s,
                    error,
                    attempt.number if attempt else 0,
                )
            )

    def _fire(self, event: ClientEvent) -> None:
        for hook in self.hooks:
            hook(event)

    # -- shadows -----------------------------------------------------------------------------------------

    def _shadow_for(self, model: str) -> Shadow | None:
        shadow = self.shadows.get(model)
        if shadow is None or not shadow.should_mirror(self._rng):
            return None
        return shadow

    def _record_shadow(
        self,
        model: str,
        shadow: Shadow,
        primary: Mapping[str, np.ndarray],
        candidate: Mapping[str, np.ndarray] | None,
        error: ClientError | None,
        latency_s: float,
    ) -> None:
        stats = self.shadow_stats.setdefault((model, shadow.model), ShadowStats())
        stats.mirrored += 1
        if error is not None:
            stats.errors += 1
            mismatch = True
        else:
            assert candidate is not None
            stats.compared += 1
            mismatch, diff = compare_outputs(primary, candidate, shadow.rtol, shadow.atol)
            stats.max_abs_diff = max(stats.max_abs_diff, diff)
            stats.mismatches += mismatch
        if self._metrics is not None:
            self._metrics.shadow(model, shadow.model, mismatch)
        if self.hooks:
            self._fire(
                ClientEvent("shadow", shadow.model, shadow.version, None, latency_s, error, mismatch=mismatch)
            )

    # -- introspection -----------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[EndpointStatus]:
        """Each endpoint's state: circuit (closed/open/half-open), health, outstanding requests."""
        return self._pool.status()

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook(event)`` for every finished call, retry, fallback and shadow comparison."""
        self.hooks.append(hook)


def compare_outputs(
    primary: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], rtol: float, atol: float
) -> tuple[bool, float]:
    """Whether the candidate's outputs differ from the primary's, and the largest absolute difference."""
    mismatch = set(primary) != set(candidate)
    worst = 0.0
    for name, want in primary.items():
        got = candidate.get(name)
        if got is None or got.shape != want.shape:
            mismatch = True
            continue
        if want.dtype.kind in "fiub" and got.dtype.kind in "fiub":
            a, b = want.astype(np.float64), got.astype(np.float64)
            if a.size:
                worst = max(worst, float(np.max(np.abs(a - b))))
            if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
                mismatch = True
        elif not np.array_equal(want, got):
            mismatch = True
    return mismatch, worst


def split_batches(inputs: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    lengths = {len(np.asarray(a)) for a in inputs.values()}
    if len(lengths) != 1:
        raise ClientError(f"inputs must share their first dim to be batched, got lengths {sorted(lengths)}")
    (n,) = lengths
    return [
        {k: np.asarray(a)[i : i + batch_size] for k, a in inputs.items()} for i in range(0, n, batch_size)
    ]


def join_batches(answers: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not answers:
        return {}
    return {name: np.concatenate([a[name] for a in answers]) for name in answers[0]}
