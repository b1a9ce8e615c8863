"""The client's core, none of it I/O: options, the endpoint pool, what each endpoint offers, targets (routing
and fallbacks), input checks, request encoding with its caches, every public call as a flow of operations,
shadow decisions and comparisons, metrics and hooks.

Every public method of :class:`Client` and :class:`AsyncClient` is one line: it drives the matching
``_<name>_flow`` generator here, which yields the I/O to do (:class:`~tritonforge.client._flow.Rpc`,
``Each``, ``Sleep``, ``Spawn``) and is sent the answers. So a decision, a request or a response is shaped
in one place, and the two faces cannot drift apart.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import re
import threading
import time
import warnings
from collections.abc import Callable, Collection, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar, cast

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tritonforge.client._coalesce import Batchable, batch_rows
from tritonforge.client._codec import (
    ModelMetadata,
    decode_response,
    frame,
    numpy_dtype,
    request_header,
)
from tritonforge.client._discovery import Discovery, EndpointSources, diff_endpoints
from tritonforge.client._flow import Attempt, BudgetState, Each, Op, Rpc, Sleep, Spawn, call_flow, one
from tritonforge.client._inputs import (
    MAX_REQUEST_ID_BYTES,
    NonFinitePolicy,
    PreparedCall,
    as_version,
    check_model_name,
    check_name,
    join_batches,
    prepare,
    smaller_limit,
)
from tritonforge.client._inputs import batches as split_under
from tritonforge.client._mapping import too_large
from tritonforge.client._pool import Capabilities, Endpoint, EndpointPool, EndpointStatus
from tritonforge.client.observe import ClientEvent, ClientMetrics, Hook, ShadowStats
from tritonforge.client.policies import (
    DEFAULT_DEADLINE,
    DEFAULT_RETRY,
    PROTOCOL_GROUPS,
    Auth,
    CircuitBreaker,
    Coalesce,
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
from tritonforge.errors import (
    AuthenticationError,
    ClientError,
    InvalidRequestError,
    NotOffered,
    RequestTooLarge,
    TransportError,
)

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb2

__all__ = [
    "DEFAULT_CONTROL_TIMEOUT_S",
    "INFER_METHOD",
    "BaseClient",
    "FastCall",
    "Flow",
    "InferOptions",
    "ManyOptions",
    "Outputs",
    "PreparedCall",
    "Transport",
]

T = TypeVar("T")
Flow = Generator[Op, Any, T]
Outputs = dict[str, np.ndarray]


class InferOptions(TypedDict, total=False):
    """The keyword options of ``infer`` (all optional).

    Attributes:
        version: a version; ``None`` lets a route choose, or the server's policy.
        outputs: the outputs to return (all when ``None``).
        timeout_s: this call's deadline, retries and fallbacks included.
        key: the stickiness key for routes with ``sticky=True`` (a user or session id).
        request_id: the call's id, sent to Triton as the request's ``id`` (its logs and traces show it) and
            put on the call's events; by default the client makes one (``<client prefix>-<counter>``).
    """

    version: str | int | None
    outputs: Sequence[str] | None
    timeout_s: float | None
    key: str | bytes | None
    request_id: str | None


class ManyOptions(TypedDict, total=False):
    """The keyword options of ``infer_many`` and ``infer_batched`` (all optional).

    Attributes:
        concurrency: requests in flight at once (``infer_many``: 16, ``infer_batched``: 4).
        version / outputs / timeout_s: as :class:`InferOptions`, for every request.
        request_id: a prefix: request ``i`` is sent with the id ``<request_id>-<i>`` (by default each
            request gets one of the client's own ids).
    """

    concurrency: int
    version: str | int | None
    outputs: Sequence[str] | None
    timeout_s: float | None
    request_id: str | None


_INFER_OPTIONS = frozenset(InferOptions.__annotations__)


@dataclass(slots=True)
class FastCall:
    """A call on the fast path (:meth:`BaseClient._fast_infer`): its first attempt, ready to send."""

    model: str
    call: PreparedCall
    targets: list[tuple[str, str | None]]
    timeout_s: float | None
    attempt: Attempt
    rpc: Rpc
    started: float  # perf_counter: the call's latency
    start: float  # monotonic: the deadline's start


INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
DEFAULT_CONTROL_TIMEOUT_S = 300.0  # load/unload: long enough for a big model, never forever
_HEADER_CACHE_LIMIT = 4096
_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_retries", 0),  # we retry, with a budget, across endpoints
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# What a server that is not Triton may lack, and what to use instead.
_NOT_OFFERED_HINT = {
    "model_config": "ModelConfig is Triton's own call; client.model_metadata() works on every v2 server",
    "statistics": "ModelStatistics is Triton's own call; read the server's own metrics instead",
    "shared_memory": "tensors go in the message instead",
    "streaming": "use infer()",
}
_ROW_MARGIN = 0.9  # of a message limit, left for the request's header when splitting batches


def _pem(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _url(url: str) -> str:
    if not isinstance(url, str) or not url:
        raise ValueError(f"an endpoint URL is a 'host:port' string, not {url!r}")
    for scheme in ("grpc://", "grpcs://"):
        if url.startswith(scheme):
            return url[len(scheme) :]
    return url


def _as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class Transport:
    """One endpoint's channel and the inference service's calls on it (sync or grpc.aio alike)."""

    __slots__ = ("channel", "methods")

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.methods: dict[str, Any] = {
            name: value for name, value in vars(stub).items() if not name.startswith("_")
        }
        # Raw bytes in (the codec frames the request), a parsed response out; registered with the channel
        # once, as the generated stub does, so gRPC does not look the method up again for every call.
        self.methods["ModelInfer"] = channel.unary_unary(
            INFER_METHOD,
            request_serializer=None,
            response_deserializer=pb.ModelInferResponse.FromString,
            _registered_method=True,
        )


class BaseClient:
    """Options and decisions shared by :class:`Client` and :class:`AsyncClient` (see their docs).

    Args:
        urls: one ``host:port`` or a list of them (replicas serving the same models); a
            ``dns:///name:port`` URL stands for every address of ``name``, re-resolved in the background.
        discovery: :class:`Discovery`, how ``dns:///`` URLs are re-resolved (every 2 s by default).
        deadline: a :class:`Deadline` or a number of seconds for a whole call (``timeout_s`` per call wins).
        retry: :class:`RetryPolicy` for transient errors (``RetryPolicy.none()`` to disable).
        breaker: :class:`CircuitBreaker` per endpoint.
        health_check: :class:`HealthCheck` run in the background.
        routes: ``{model: TrafficSplit}`` (A/B, canary).
        fallbacks: ``{model: Fallback}``.
        shadows: ``{model: Shadow}``.
        shared_memory: :class:`SharedMemory` or its mode (``"auto"``, ``"system"``, ``"cuda"``, ``"off"``);
            a server that does not take a region gets the bytes in the message.
        headers: sent with every call (auth proxies; for Triton's restricted protocols prefer ``auth``).
        tls: :class:`TLSConfig`.
        auth: :class:`Auth`: each call sends only its protocol group's key (inference, model-repository,
            ...); its ``tls`` is the channel's when ``tls`` is not given.
        validate: check inputs against the model's metadata before sending (once per input signature).
        allow_non_finite: NaN and ±inf inputs are refused by default; ``True`` sends them for every input,
            a collection of input names (``"x"``, or ``"model/x"`` for one model's) for those inputs only.
        coalesce: client-side batching (:class:`Coalesce`); :class:`AsyncClient` only, on by default there.
        streams: inference requests as messages of long-lived streams instead of one gRPC call each;
            :class:`AsyncClient` only, off by default (plain-text gRPC only; see its doc).
        registry: prometheus registry for the client metrics.
        metrics: ``False`` turns the client metrics off.
        hooks: callables given a :class:`ClientEvent` for each call, retry, fallback and shadow comparison;
            a hook that raises never fails the call (counted in ``hook_errors``, warned about once per hook).
        channel_options: extra gRPC channel options.
        seed: seeds the client's randomness (routing, jitter) for reproducible runs.
    """

    _coalesce_default = False
    _streams_default = False
    _streams_supported = False

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
        auth: Auth | None = None,
        validate: bool = True,
        allow_non_finite: bool | Collection[str] = False,
        coalesce: Coalesce | bool | None = None,
        streams: bool | None = None,
        registry: CollectorRegistry | None = None,
        metrics: bool = True,
        hooks: Iterable[Hook] = (),
        channel_options: Sequence[tuple[str, Any]] = (),
        seed: int | None = None,
        discovery: Discovery | None = None,
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
        self.headers = _checked_headers(headers)
        if auth is not None and not isinstance(auth, Auth):
            raise TypeError(f"auth must be an Auth, not {type(auth).__name__}")
        if tls is not None and auth is not None and auth.tls is not None and auth.tls != tls:
            raise ValueError("give TLS once: either tls=... or Auth(..., tls=...)")
        self.auth = auth
        self.tls = tls if tls is not None else (auth.tls if auth is not None else None)
        self.validate = validate
        if isinstance(allow_non_finite, str):
            allow_non_finite = (allow_non_finite,)
        self.allow_non_finite: NonFinitePolicy = (
            allow_non_finite if isinstance(allow_non_finite, bool) else frozenset(allow_non_finite)
        )
        if coalesce is None or isinstance(coalesce, bool):
            coalesce = Coalesce(enabled=self._coalesce_default if coalesce is None else coalesce)
        if coalesce.enabled and not self._coalesce_default:
            raise ValueError(
                f"client-side batching (coalesce) needs AsyncClient; {type(self).__name__} sends each call "
                "as its own request (the server's dynamic batcher still merges them)"
            )
        self.coalesce = coalesce
        self._coalescing = coalesce.enabled
        if streams and not self._streams_supported:
            raise ValueError(
                f"streams need AsyncClient; {type(self).__name__} sends each call as its own gRPC call"
            )
        self.streams = self._streams_default if streams is None else bool(streams)
        self.hooks: list[Hook] = list(hooks)
        self.hook_errors = 0
        self._hooks_warned: set[int] = set()
        self._hook_lock = threading.Lock()
        # Request ids: a random prefix per client and a counter (next() on a count is atomic in CPython),
        # ~0.1 us a call where uuid4() costs ~1.5 us; unique across clients with 2^32 prefixes in practice.
        self._id_prefix = os.urandom(4).hex() + "-"
        self._id_counter = itertools.count(1)
        self._rng = random.Random(seed)
        self._sources = EndpointSources(self.urls, discovery or Discovery())
        self._pool = EndpointPool(self._sources.first(), self.breaker, random.Random(seed))
        self._budget = BudgetState(retry.budget, time.monotonic())
        self._metrics = ClientMetrics(registry) if metrics else None
        self._grpc_metadata: tuple[tuple[str, str], ...] | None = tuple(self.headers.items()) or None
        self._metadata_of = self._metadata_by_method()
        # what a connection closed during the handshake means (see _mapping): None, "tls" or "mutual"
        self._tls_mode = None if self.tls is None else ("mutual" if self.tls.private_key else "tls")
        self._streams_on = self.streams and self.tls is None  # the streams' connection speaks no TLS
        self._channel_options = list(_CHANNEL_OPTIONS) + list(channel_options)
        if self.tls is not None and self.tls.server_name:
            self._channel_options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        self._model_metadata: dict[tuple[str, str | None], ModelMetadata] = {}
        self._batchable: dict[tuple[str, str | None], Batchable] = {}
        self._probing: set[tuple[str, str | None]] = set()
        self._headers: dict[Any, bytes] = {}
        self._shm = self._make_shm_pool()
        self._shm_auto = self.shared_memory.mode == "auto"
        self._shm_threshold = self.shared_memory.threshold_bytes
        self.shadow_stats: dict[tuple[str, str], ShadowStats] = {}
        self._closed = False
        self._setup()

    def _metadata_by_method(self) -> dict[str, tuple[tuple[str, str], ...] | None]:
        """Each RPC's gRPC metadata: the client's headers and its protocol group's key (computed once)."""
        auth = self.auth
        table: dict[str, tuple[tuple[str, str], ...] | None] = {}
        for method in PROTOCOL_GROUPS:
            pair = auth.grpc_metadata(method) if auth is not None else None
            table[method] = (*self.headers.items(), pair) if pair is not None else self._grpc_metadata
            size = sum(len(k) + len(v) + 32 for k, v in table[method] or ())  # HPACK's count per field
            if size > _METADATA_LIMIT_BYTES:
                raise ValueError(
                    f"the headers sent with {method} come to {size} bytes, over gRPC's metadata limit of "
                    f"{_METADATA_LIMIT_BYTES} (servers refuse such calls, at random up to 16 KiB, always "
                    "beyond); send less in headers= (or a shorter auth key)"
                )
        return table

    def _metadata(self, method: str) -> tuple[tuple[str, str], ...] | None:
        """The metadata to send with ``method`` (the drivers ask this for every RPC)."""
        return self._metadata_of.get(method, self._grpc_metadata)

    def _setup(self) -> None:
        """The face's own state (channels, threads or tasks), made at the end of ``__init__``."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.urls}{' closed' if self._closed else ''}>"

    def _check_open(self, model: str | None = None) -> None:
        if self._closed:
            raise ClientError(f"the {type(self).__name__} is closed; make a new one", model=model)

    # -- channels ----------------------------------------------------------------------------------------

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.tls.root_certificates),
            private_key=_pem(self.tls.private_key),
            certificate_chain=_pem(self.tls.certificate_chain),
        )

    def _connect(self, grpc_module: Any) -> None:
        """A channel per endpoint from ``grpc`` or ``grpc.aio`` (they share these two functions)."""
        self._grpc_module = grpc_module
        self._credentials_cache = self._credentials()
        for ep in self._pool.endpoints:
            self._attach(ep)

    def _attach(self, ep: Endpoint) -> None:
        """Give one endpoint its channel (also for an endpoint that joins the pool later)."""
        channel = (
            self._grpc_module.insecure_channel(ep.url, options=self._channel_options)
            if self._credentials_cache is None
            else self._grpc_module.secure_channel(
                ep.url, self._credentials_cache, options=self._channel_options
            )
        )
        ep.handle = Transport(channel)

    def _rediscover(self) -> list[Endpoint]:
        """Bring the pool in line with the last resolution; the drained endpoints whose channels to close."""
        change = diff_endpoints([e.url for e in self._pool.endpoints], self._sources.current())
        return self._pool.apply(change.added, change.removed, self._attach)

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

    def _use_shm(self, call: PreparedCall, ep: Endpoint) -> bool:
        pool = self._shm
        if pool is None or (self._shm_auto and call.nbytes < self._shm_threshold):
            return False
        if ep.capabilities.shared_memory is False:
            return False
        return pool.kind != "system" or is_local(ep.url)

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
        header = request_header(model, version, call.signature, call.outputs, shm)
        return frame(header, (), call.request_id), region

    def _register_request(self, region: SystemRegion | CudaRegion) -> tuple[str, Message]:
        if isinstance(region, SystemRegion):
            return "SystemSharedMemoryRegister", pb.SystemSharedMemoryRegisterRequest(
                name=region.name, key=region.key, offset=0, byte_size=region.size
            )
        return "CudaSharedMemoryRegister", pb.CudaSharedMemoryRegisterRequest(  # pragma: no cover - GPU
            name=region.name, raw_handle=region.raw_handle(), device_id=region.device, byte_size=region.size
        )

    def _unregister_request(self, region: SystemRegion | CudaRegion) -> tuple[str, Message]:
        if isinstance(region, SystemRegion):
            return "SystemSharedMemoryUnregister", pb.SystemSharedMemoryUnregisterRequest(name=region.name)
        return "CudaSharedMemoryUnregister", pb.CudaSharedMemoryUnregisterRequest(  # pragma: no cover - GPU
            name=region.name
        )

    @property
    def shm_regions(self) -> list[str]:
        """Names of the shared-memory regions this client holds (all removed by close)."""
        return [] if self._shm is None else [r.name for r in self._shm.regions()]

    # -- input checks ------------------------------------------------------------------------------------

    def _prepare(
        self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None, timeout_s: float | None
    ) -> PreparedCall:
        self._check_open(model if isinstance(model, str) else None)
        return prepare(model, inputs, outputs, timeout_s, self.allow_non_finite)

    def _check_inputs(self, call: PreparedCall, attempt: Attempt) -> None:
        if self.validate:
            meta = self._model_metadata.get((attempt.model, attempt.version))
            # A server may declare no inputs at all (MLServer without them in model-settings.json):
            # nothing to check against, the server checks.
            if meta is not None and meta.inputs:
                meta.check_inputs(call.signature, attempt.version, attempt.endpoint.url)

    def _encode(self, call: PreparedCall, attempt: Attempt) -> bytes:
        """The request's bytes (header from cache; inputs checked against the metadata the first time)."""
        key = (attempt.model, attempt.version, call.outputs, call.signature)
        header = self._headers.get(key)
        if header is None:
            self._check_inputs(call, attempt)
            header = request_header(attempt.model, attempt.version, call.signature, call.outputs)
            if len(self._headers) >= _HEADER_CACHE_LIMIT:
                self._headers.clear()
            self._headers[key] = header
        return frame(header, call.raws, call.request_id)

    # -- routing -----------------------------------------------------------------------------------------

    def _targets(
        self, model: str, version: str | int | None, key: str | bytes | None
    ) -> list[tuple[str, str | None]]:
        first: tuple[str, str | None]
        split = self.routes.get(model) if version is None else None
        if split is not None:
            variant = split.choose(key, self._rng)
            first = (variant.model, variant.version)
        else:
            first = (model, as_version(version))
        fallback = self.fallbacks.get(model)
        if fallback is None:
            return [first]
        return [first, *(t for t in fallback.chain if t != first)]

    # -- flows: one call across endpoints, retries and fallbacks -------------------------------------------

    def _call_flow(
        self,
        targets: Sequence[tuple[str, str | None]],
        timeout_s: float | None,
        send: Callable[[Attempt], Flow[Any]],
        on_attempt: Callable[[Attempt], None] | None = None,
        resumed: tuple[float, Endpoint, ClientError] | None = None,
    ) -> Flow[Any]:
        """Run ``send`` (a flow per attempt) under the call's retry, fallback and deadline decisions
        (``resumed``: a first attempt already made and failed, see :func:`call_flow`)."""
        self._check_open(targets[0][0] or None)
        flow = call_flow(
            targets,
            pool=self._pool,
            retry=self.retry,
            budget=self._budget,
            deadline=self.deadline,
            timeout_s=timeout_s,
            clock=time.monotonic,
            rng=self._rng,
            resumed=resumed,
        )
        try:
            step = next(flow)
            while True:
                if type(step) is Attempt:
                    if on_attempt is not None:
                        on_attempt(step)
                    try:
                        outcome = yield from send(step)
                    except ClientError as exc:
                        self._on_attempt_error(step, exc)
                        outcome = exc
                else:
                    yield cast(Sleep, step)
                    outcome = None
                step = flow.send(outcome)
        except StopIteration as stop:
            return stop.value
        finally:
            flow.close()

    def _infer_flow(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        key: str | bytes | None = None,
        request_id: str | None = None,
    ) -> Flow[dict[str, np.ndarray]]:
        started = time.perf_counter()
        call = self._prepare(model, inputs, outputs, timeout_s)
        call.request_id = self._request_id(model, request_id)
        targets = self._targets(model, version, key)
        return (yield from self._prepared_infer_flow(model, call, targets, timeout_s, started))

    def _prepared_infer_flow(
        self,
        model: str,
        call: PreparedCall,
        targets: list[tuple[str, str | None]],
        timeout_s: float | None,
        started: float,
        first: tuple[Attempt, float, ClientError] | None = None,
    ) -> Flow[dict[str, np.ndarray]]:
        """A call whose inputs are checked and targets chosen (``first``: its first attempt, made on the
        fast path, failed: ``(attempt, start, error)``)."""
        rid = call.request_id
        last: list[Attempt] = [first[0]] if first is not None else []

        def on_attempt(attempt: Attempt) -> None:
            last[:] = (attempt,)
            self._on_attempt(model, attempt, rid)

        resumed = None if first is None else (first[1], first[0].endpoint, first[2])
        try:
            result = yield from self._call_flow(
                targets, timeout_s, partial(self._attempt_flow, call), on_attempt, resumed
            )
        except ClientError as exc:
            self._on_done(model, targets[0][1], started, exc, last[0] if last else None, call, None)
            raise
        self._on_done(model, targets[0][1], started, None, last[0] if last else None, call, result)
        if self.shadows and not self._closed:
            shadow = self._shadow_for(model)
            if shadow is not None:
                # Own copies: the caller may reuse its arrays as soon as we return.
                yield Spawn(self._shadow_flow(model, shadow, call.mirror(rid + ".shadow"), result, timeout_s))
        return result

    # -- the fast path: infer's first attempt without the flow machinery -------------------------------

    def _fast_infer(
        self, model: str, inputs: Mapping[str, Any], options: InferOptions
    ) -> FastCall | Flow[Outputs]:
        """``infer``'s call as a :class:`FastCall` when its first attempt needs no decision the flows make
        (one target, one usable endpoint, inputs already validated, no shared memory, no shadow, nothing
        client-side batching could merge it with); otherwise the call's flow, to drive as usual.

        The face sends ``FastCall.rpc`` itself, then hands the answer to :meth:`_fast_done`, or its error to
        :meth:`_fast_failed` (which returns the flow that carries on with retries and fallbacks exactly as
        if it had made the attempt), or calls :meth:`_fast_abandoned` when the call is cancelled. The
        generator layers of the flows cost tens of microseconds a call, a sizeable share of a ~100 us
        request; this path does what they do for a first attempt, in one place.

        Raises:
            InvalidRequestError: as ``infer``, for bad inputs, options or request ids.
        """
        if not _INFER_OPTIONS.issuperset(options):
            return self._infer_flow(model, inputs, **options)  # TypeError names the unknown option
        started = time.perf_counter()
        timeout_s = options.get("timeout_s")
        call = self._prepare(model, inputs, options.get("outputs"), timeout_s)
        call.request_id = self._request_id(model, options.get("request_id"))
        targets = self._targets(model, options.get("version"), options.get("key"))
        ep = self._pool.only()
        if ep is None or len(targets) > 1 or model in self.shadows or self._may_merge(call, targets[0]):
            return self._prepared_infer_flow(model, call, targets, timeout_s, started)
        target_model, target_version = targets[0]
        header = self._headers.get((target_model, target_version, call.outputs, call.signature))
        total_s = self.deadline.total_s if timeout_s is None else timeout_s
        if (
            header is None  # the first call of this signature: checked against the metadata in the flow
            or (total_s is not None and total_s <= 0)
            or self._use_shm(call, ep)
        ):
            return self._prepared_infer_flow(model, call, targets, timeout_s, started)
        body = frame(header, call.raws, call.request_id)
        limit_bytes = ep.capabilities.max_message_bytes
        start = time.monotonic()
        if (limit_bytes is not None and len(body) > limit_bytes) or self._pool.acquire(start) is not ep:
            return self._prepared_infer_flow(model, call, targets, timeout_s, started)
        self._budget.deposit()
        attempt = Attempt(
            ep, target_model, target_version, self.deadline.attempt_timeout_s(total_s), 1, False, False
        )
        self._on_attempt(model, attempt, call.request_id)
        rpc = Rpc(
            ep,
            "ModelInfer",
            body,
            attempt.timeout_s,
            target_model,
            target_version,
            request_id=call.request_id,
        )
        return FastCall(model, call, targets, timeout_s, attempt, rpc, started, start)

    def _fast_done(self, fast: FastCall, response: Any) -> Outputs:
        """The fast call's answer: the endpoint released, the outputs decoded, the call recorded."""
        self._pool.release(fast.attempt.endpoint, time.monotonic(), transport_failure=False)
        result = decode_response(response)
        self._on_done(fast.model, fast.targets[0][1], fast.started, None, fast.attempt, fast.call, result)
        return result

    def _fast_failed(self, fast: FastCall, error: ClientError) -> Flow[Outputs]:
        """The flow that carries on after the fast call's first attempt failed with ``error``."""
        attempt = fast.attempt
        if isinstance(error, RequestTooLarge) and error.limit_bytes:
            attempt.endpoint.capabilities.max_message_bytes = error.limit_bytes
        self._on_attempt_error(attempt, error)
        return self._prepared_infer_flow(
            fast.model, fast.call, fast.targets, fast.timeout_s, fast.started, (attempt, fast.start, error)
        )

    def _fast_abandoned(self, fast: FastCall) -> None:
        """The fast call was cancelled mid-attempt: its endpoint is no longer in use."""
        self._pool.release(fast.attempt.endpoint, time.monotonic(), transport_failure=False)

    def _request_id(self, model: str, given: str | None) -> str:
        """The caller's request id (checked), or a new one of the client's.

        Raises:
            InvalidRequestError: a ``request_id`` that is not a non-empty string of printable characters
                of at most :data:`MAX_REQUEST_ID_BYTES` bytes.
        """
        if given is None:
            return self._id_prefix + format(next(self._id_counter), "x")
        try:
            return check_name(given, what=f"request_id for model {model!r}", limit=MAX_REQUEST_ID_BYTES)
        except InvalidRequestError as exc:
            raise InvalidRequestError(exc.message, model=model) from None

    def _infer_many_flow(
        self,
        model: str,
        requests: Sequence[Mapping[str, Any]],
        concurrency: int = 16,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Flow[list[dict[str, np.ndarray]]]:
        """Every request as its own call, ``concurrency`` at a time; the first error raised after all ran.

        ``request_id``: a prefix; request ``i`` gets the id ``<request_id>-<i>``.
        """
        if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Sequence):
            raise InvalidRequestError(
                f"requests for model {model!r} must be a list of {{input name: array}} mappings, not "
                f"{type(requests).__name__}",
                model=model,
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, not {concurrency!r}")
        if request_id is not None:
            self._request_id(model, request_id)  # checked once, here
        if not requests:
            return []
        ids = (
            [None] * len(requests)
            if request_id is None
            else [f"{request_id}-{i}" for i in range(len(requests))]
        )
        flows = [
            self._infer_flow(model, r, version, outputs, timeout_s, request_id=rid)
            for r, rid in zip(requests, ids, strict=True)
        ]
        answers = yield Each(flows, concurrency)
        for answer in answers:
            if isinstance(answer, ClientError):
                raise answer
        return answers

    def _infer_batched_flow(
        self,
        model: str,
        inputs: Mapping[str, Any],
        batch_size: int,
        concurrency: int = 4,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Flow[dict[str, np.ndarray]]:
        """Batches of ``batch_size`` rows, fewer under a message limit (learnt from a refusal if need be).

        ``request_id``: a prefix; batch ``i`` gets the id ``<request_id>-<i>``.
        """
        limit = self._known_limit()
        while True:
            batches = split_under(model, inputs, batch_size, limit)
            if not batches:
                return (yield from self._no_rows_flow(model, inputs, version, outputs, timeout_s))
            try:
                answers = yield from self._infer_many_flow(
                    model, batches, concurrency, version, outputs, timeout_s, request_id
                )
            except RequestTooLarge as exc:
                limit = smaller_limit(exc, limit)
            else:
                return join_batches(answers)

    def _no_rows_flow(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | int | None,
        outputs: Sequence[str] | None,
        timeout_s: float | None,
    ) -> Flow[dict[str, np.ndarray]]:
        """``infer_batched``'s answer to 0 rows: each output empty, of the shape and dtype the model's
        metadata gives it (no inference is sent; the inputs are checked against the metadata all the same).

        Raises:
            InvalidRequestError: inputs that don't fit the model, outputs it lacks, or a model whose
                metadata can't shape an empty answer (no batch dimension, no outputs declared).
        """
        call = self._prepare(model, inputs, outputs, timeout_s)
        target, target_version = self._targets(model, version, None)[0]
        meta = self._model_metadata.get((target, target_version))
        if meta is None:
            meta = yield from self._model_metadata_flow(target, target_version)
        if meta.inputs:
            meta.check_inputs(call.signature, target_version, None)
        wanted = list(call.outputs) if call.outputs is not None else [t.name for t in meta.outputs]
        declared = {t.name: t for t in meta.outputs}
        unknown = sorted(set(wanted) - set(declared))
        if declared and unknown:
            raise InvalidRequestError(
                f"model {model!r} has no output {unknown}; it has {sorted(declared)}", model=model
            )
        why = None
        if not declared:
            why = "its metadata declares no outputs"
        elif any(not declared[name].shape or declared[name].shape[0] != -1 for name in wanted):
            why = "its outputs have no batch dimension (max_batch_size 0)"
        if why is not None:
            raise InvalidRequestError(
                f"infer_batched on 0 rows of model {model!r}: an empty answer can't be shaped, {why}; "
                "skip the call when there are no rows",
                model=model,
            )
        return {name: _empty_output(declared[name]) for name in wanted}

    def _attempt_flow(self, call: PreparedCall, attempt: Attempt) -> Flow[dict[str, np.ndarray]]:
        """One attempt of a call at one endpoint: metadata first (once), then shared memory or bytes."""
        ep = attempt.endpoint
        model, version = attempt.model, attempt.version
        if self.validate and (model, version) not in self._model_metadata:
            response = yield Rpc(
                ep,
                "ModelMetadata",
                pb.ModelMetadataRequest(name=model, version=version or ""),
                attempt.timeout_s,
                model,
                version,
            )
            self._model_metadata[(model, version)] = ModelMetadata.from_proto(response)
        if self._use_shm(call, ep):
            answer = yield from self._shm_attempt_flow(call, attempt)
            if answer is not None:
                return answer
        merge = None
        if self._coalescing and call.nbytes <= self.coalesce.max_call_bytes:
            limit = yield from self._merge_limit_flow(attempt)
            rows = _merge_rows(call, limit)
            if rows is not None:
                merge = (call, attempt, rows, limit)
        body = self._encode(call, attempt)
        limit_bytes = ep.capabilities.max_message_bytes
        if limit_bytes is not None and len(body) > limit_bytes:
            where = f"model {model!r}" + (f" version {version}" if version else "") + f" at {ep.url}"
            raise too_large(
                where,
                f"message larger than max ({len(body)} vs. {limit_bytes})",
                model=model,
                version=version,
                endpoint=ep.url,
            )
        try:
            answer = yield Rpc(
                ep, "ModelInfer", body, attempt.timeout_s, model, version, merge, request_id=call.request_id
            )
        except RequestTooLarge as exc:
            if exc.limit_bytes:
                ep.capabilities.max_message_bytes = exc.limit_bytes
            raise
        # A merged call (AsyncClient) comes back already decoded: its rows of the merged answer.
        return answer if type(answer) is dict else decode_response(answer)

    def _shm_attempt_flow(self, call: PreparedCall, attempt: Attempt) -> Flow[dict[str, np.ndarray] | None]:
        """Send the inputs through a shared-memory region; ``None`` when the endpoint won't take one."""
        ep = attempt.endpoint
        self._check_inputs(call, attempt)
        pool = self._shm
        assert pool is not None
        body, taken = self._shm_request(call, attempt.model, attempt.version)
        region: SystemRegion | CudaRegion | None = taken
        try:
            if ep.url not in taken.registered_on:
                method, request = self._register_request(taken)
                try:
                    yield Rpc(ep, method, request, attempt.timeout_s, attempt.model, attempt.version)
                except TransportError:
                    raise
                except ClientError:
                    # Not offered (not Triton), or the server can't open it (another host, a container
                    # without our /dev/shm): never ask this endpoint again, send bytes.
                    ep.capabilities.shared_memory = False
                    pool.discard(taken)
                    region = None
                    return None
                taken.registered_on.add(ep.url)
                ep.capabilities.shared_memory = True
            response = yield Rpc(ep, "ModelInfer", body, attempt.timeout_s, attempt.model, attempt.version)
        finally:
            if region is not None:
                pool.release(region)
        return decode_response(response)

    def _merge_limit_flow(self, attempt: Attempt) -> Flow[int]:
        """The most rows a merged request for the attempt's model may carry (0: don't merge).

        Asks for the model's config once; a server without configs (not Triton) is never asked again,
        and while the question is out other calls go alone instead of asking too.
        """
        key = (attempt.model, attempt.version)
        batchable = self._batchable.get(key)
        if batchable is None:
            ep = attempt.endpoint
            if ep.capabilities.model_config is False or key in self._probing:
                return 0
            self._probing.add(key)
            try:
                response = yield Rpc(
                    ep,
                    "ModelConfig",
                    pb.ModelConfigRequest(name=attempt.model, version=attempt.version or ""),
                    attempt.timeout_s,
                    attempt.model,
                    attempt.version,
                )
            except (NotOffered, AuthenticationError):  # not offered, or not to us (restricted protocol)
                ep.capabilities.model_config = False
                return 0
            finally:
                self._probing.discard(key)
            ep.capabilities.model_config = True
            batchable = Batchable.from_config(response.config)
            self._batchable[key] = batchable
        return self._merge_limit(batchable)

    def _merge_limit(self, batchable: Batchable) -> int:
        cap = self.coalesce.max_rows
        return batchable.max_rows if cap is None else min(cap, batchable.max_rows)

    def _may_merge(self, call: PreparedCall, target: tuple[str, str | None]) -> bool:
        """Whether client-side batching may merge ``call`` (``True`` while the model's config is unknown:
        the flow asks for it)."""
        if not self._coalescing or call.nbytes > self.coalesce.max_call_bytes:
            return False
        batchable = self._batchable.get(target)
        return batchable is None or _merge_rows(call, self._merge_limit(batchable)) is not None

    # -- flows: shadows ----------------------------------------------------------------------------------

    def _shadow_flow(
        self,
        model: str,
        shadow: Shadow,
        call: PreparedCall,
        primary: dict[str, np.ndarray],
        timeout_s: float | None,
    ) -> Flow[None]:
        started = time.perf_counter()
        try:
            result = yield from self._call_flow(
                [(shadow.model, shadow.version)], timeout_s, partial(self._attempt_flow, call)
            )
        except ClientError as exc:
            self._record_shadow(
                model, shadow, primary, None, exc, time.perf_counter() - started, call.request_id
            )
        else:
            self._record_shadow(
                model, shadow, primary, result, None, time.perf_counter() - started, call.request_id
            )

    # -- flows: health, metadata, config, statistics, model control --------------------------------------

    def _control_flow(
        self,
        method: str,
        request: Message,
        *,
        model: str = "",
        version: str | None = None,
        timeout_s: float | None = None,
        feature: str | None = None,
    ) -> Flow[Any]:
        """One control-plane call on one endpoint (retried elsewhere like an inference).

        ``feature``: the :class:`Capabilities` field the call needs; an endpoint known not to offer it
        raises :class:`NotOffered` at once, and an UNIMPLEMENTED answer is remembered.
        """

        if model or not isinstance(model, str):
            check_model_name(model)

        def send(attempt: Attempt) -> Flow[Any]:
            caps = attempt.endpoint.capabilities
            if feature is not None and getattr(caps, feature) is False:
                raise self._not_offered(feature, attempt.endpoint, model or None)
            try:
                response = yield Rpc(
                    attempt.endpoint, method, request, attempt.timeout_s, model or None, version
                )
            except NotOffered:
                if feature is None:
                    raise
                setattr(caps, feature, False)
                raise self._not_offered(feature, attempt.endpoint, model or None) from None
            if feature is not None:
                setattr(caps, feature, True)
            return response

        return (yield from self._call_flow([(model, version)], timeout_s, send))

    @staticmethod
    def _not_offered(feature: str, ep: Endpoint, model: str | None) -> NotOffered:
        return NotOffered(
            f"the server at {ep.url} does not offer {feature.replace('_', ' ')} (it answered UNIMPLEMENTED: "
            f"likely not Triton); {_NOT_OFFERED_HINT[feature]}",
            model=model,
            endpoint=ep.url,
        )

    def _flag_flow(
        self, method: str, request: Message, field: str, model: str = "", version: str | None = None
    ) -> Flow[bool]:
        try:
            response = yield from self._control_flow(method, request, model=model, version=version)
        except AuthenticationError:
            raise  # "not ready" would hide that we lack the key
        except ClientError:
            if self._closed:
                raise
            return False
        return bool(getattr(response, field))

    def _is_server_live_flow(self) -> Flow[bool]:
        return self._flag_flow("ServerLive", pb.ServerLiveRequest(), "live")

    def _is_server_ready_flow(self) -> Flow[bool]:
        return self._flag_flow("ServerReady", pb.ServerReadyRequest(), "ready")

    def _is_model_ready_flow(self, model: str, version: str | int | None) -> Flow[bool]:
        check_model_name(model)  # a name that can't be sent is an error, not "not ready"
        v = as_version(version)
        return self._flag_flow(
            "ModelReady", pb.ModelReadyRequest(name=model, version=v or ""), "ready", model, v
        )

    def _server_metadata_flow(self) -> Flow[dict[str, Any]]:
        return _as_dict((yield from self._control_flow("ServerMetadata", pb.ServerMetadataRequest())))

    def _model_metadata_flow(self, model: str, version: str | int | None) -> Flow[ModelMetadata]:
        check_model_name(model)
        v = as_version(version)
        request = pb.ModelMetadataRequest(name=model, version=v or "")
        response = yield from self._control_flow("ModelMetadata", request, model=model, version=v)
        meta = ModelMetadata.from_proto(response)
        self._model_metadata[(model, v)] = meta
        return meta

    def _model_config_flow(self, model: str, version: str | int | None) -> Flow[pb2.ModelConfig]:
        check_model_name(model)
        v = as_version(version)
        request = pb.ModelConfigRequest(name=model, version=v or "")
        response = yield from self._control_flow(
            "ModelConfig", request, model=model, version=v, feature="model_config"
        )
        return response.config

    def _model_statistics_flow(self, model: str, version: str | int | None) -> Flow[dict[str, Any]]:
        if model != "":  # "": every model's
            check_model_name(model)
        v = as_version(version)
        request = pb.ModelStatisticsRequest(name=model, version=v or "")
        return _as_dict(
            (
                yield from self._control_flow(
                    "ModelStatistics", request, model=model, version=v, feature="statistics"
                )
            )
        )

    def _repository_index_flow(self) -> Flow[list[dict[str, Any]]]:
        response = yield from self._control_flow("RepositoryIndex", pb.RepositoryIndexRequest())
        return _as_dict(response).get("models", [])

    def _health_flow(self) -> Flow[dict[str, bool]]:
        """Ask every endpoint at once whether it is ready, and feed the answers to the pool."""
        self._check_open()
        timeout_s = self.health_check.timeout_s if self.health_check is not None else 1.0
        endpoints = list(self._pool.endpoints)
        answers = yield Each(
            [one(Rpc(ep, "ServerReady", pb.ServerReadyRequest(), timeout_s)) for ep in endpoints]
        )
        now = time.monotonic()
        result = {}
        for ep, answer in zip(endpoints, answers, strict=True):
            ready = not isinstance(answer, ClientError) and bool(answer.ready)
            if not isinstance(answer, AuthenticationError):  # refused us: the server is up, we lack a key
                self._pool.mark_health(ep, ready, now)
            result[ep.url] = ready
        return result

    def _load_model_flow(self, model: str, config: str | None, timeout_s: float | None) -> Flow[None]:
        check_model_name(model)
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if config is not None:
            request.parameters["config"].string_param = config
        return self._every_endpoint_flow("RepositoryModelLoad", request, model, timeout_s)

    def _unload_model_flow(self, model: str, timeout_s: float | None) -> Flow[None]:
        check_model_name(model)
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        return self._every_endpoint_flow("RepositoryModelUnload", request, model, timeout_s)

    def _every_endpoint_flow(
        self, method: str, request: Message, model: str, timeout_s: float | None
    ) -> Flow[None]:
        """One control call to every endpoint at once, each under ``timeout_s``; raises the first error."""
        self._check_open(model if isinstance(model, str) else None)
        check_model_name(model)
        timeout = DEFAULT_CONTROL_TIMEOUT_S if timeout_s is None else timeout_s
        endpoints = list(self._pool.endpoints)
        answers = yield Each([one(Rpc(ep, method, request, timeout, model)) for ep in endpoints])
        self._model_metadata = {k: v for k, v in self._model_metadata.items() if k[0] != model}
        self._batchable = {k: v for k, v in self._batchable.items() if k[0] != model}
        self._headers.clear()
        errors = [a for a in answers if isinstance(a, ClientError)]
        if errors:
            raise errors[0]

    def _capabilities_flow(self) -> Flow[dict[str, Capabilities]]:
        """Probe what each endpoint offers that is not known yet; ``{url: Capabilities}`` (copies)."""
        self._check_open()
        probes: list[tuple[Endpoint, str]] = []
        rpcs: list[Rpc] = []
        asks = {
            "model_config": ("ModelConfig", pb.ModelConfigRequest(name="")),
            "statistics": ("ModelStatistics", pb.ModelStatisticsRequest(name="")),
            "shared_memory": ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest()),
            "streaming": ("ModelStreamInfer", ()),
        }
        for ep in self._pool.endpoints:
            for feature, (method, request) in asks.items():
                if getattr(ep.capabilities, feature) is None:
                    probes.append((ep, feature))
                    rpcs.append(Rpc(ep, method, request, 5.0))
        answers = (yield Each([one(r) for r in rpcs])) if rpcs else []
        for (ep, feature), answer in zip(probes, answers, strict=True):
            if isinstance(answer, NotOffered):
                setattr(ep.capabilities, feature, False)
            elif not isinstance(answer, TransportError):  # any other answer: the call exists
                setattr(ep.capabilities, feature, True)
        return {ep.url: replace(ep.capabilities) for ep in self._pool.endpoints}

    def _close_flow(self) -> Flow[None]:
        """Unregister our shared-memory regions from the servers that know them, then remove them."""
        pool = self._shm
        if pool is None:
            return
        rpcs = []
        for region in pool.regions():
            method, request = self._unregister_request(region)
            rpcs += [
                Rpc(ep, method, request, 2.0) for ep in self._pool.endpoints if ep.url in region.registered_on
            ]
        if rpcs:
            yield Each([one(r) for r in rpcs])
        pool.close()

    def _known_limit(self) -> int | None:
        """The smallest message limit an endpoint has named (``None``: none known yet)."""
        known = [ep.capabilities.max_message_bytes for ep in self._pool.endpoints]
        return min((k for k in known if k), default=None)

    # -- metrics and hooks -------------------------------------------------------------------------------

    def _on_attempt(self, call_model: str, attempt: Attempt, request_id: str | None = None) -> None:
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
                    request_id=request_id,
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
        call: PreparedCall,
        result: dict[str, np.ndarray] | None,
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
                    request_id=call.request_id,
                    inputs=call.arrays,
                    outputs=result,
                )
            )

    def _fire(self, event: ClientEvent) -> None:
        """Give ``event`` to every hook; a hook's exception never reaches the call (counted, warned once)."""
        for hook in self.hooks:
            try:
                hook(event)
            except Exception as exc:
                self._hook_failed(hook, exc)

    def _hook_failed(self, hook: Hook, exc: Exception) -> None:
        with self._hook_lock:
            self.hook_errors += 1
            first = id(hook) not in self._hooks_warned
            self._hooks_warned.add(id(hook))
        if first:
            # a warnings filter set to "error" must not turn the report into the call's failure
            with contextlib.suppress(Exception):
                warnings.warn(
                    f"client hook {getattr(hook, '__qualname__', None) or type(hook).__qualname__} raised "
                    f"{type(exc).__name__}: {exc} (on a {self.__class__.__name__} call; the call went on; "
                    "this hook's further errors are only counted in client.hook_errors)",
                    RuntimeWarning,
                    stacklevel=2,
                )

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
        request_id: str | None = None,
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
                ClientEvent(
                    "shadow",
                    shadow.model,
                    shadow.version,
                    None,
                    latency_s,
                    error,
                    mismatch=mismatch,
                    request_id=request_id,
                    outputs=candidate,
                )
            )

    # -- introspection -----------------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[EndpointStatus]:
        """Each endpoint's state: circuit (closed/open/half-open), health, outstanding requests."""
        return self._pool.status()

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook(event)`` for every finished call, retry, fallback and shadow comparison."""
        self.hooks.append(hook)


_METADATA_LIMIT_BYTES = 8192  # gRPC's default soft limit on a call's metadata, Triton's server included
_HEADER_KEY = re.compile(r"^[0-9a-z_.-]+$")


def _checked_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """``headers`` as gRPC metadata (keys lower-cased), once sure gRPC will send them.

    Raises:
        TypeError: not a mapping of str to str.
        ValueError: a key gRPC refuses (only ``0-9 a-z _ . -``, not ``grpc-...``) or a value that isn't
            printable ASCII (gRPC fails every call with "Invalid metadata" otherwise).
    """
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise TypeError(f"headers must be a mapping {{name: value}}, not {type(headers).__name__}")
    out: dict[str, str] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"headers are str: str, not {repr(key)[:40]}: {type(value).__name__}")
        name = key.lower()
        if not _HEADER_KEY.match(name) or name.startswith("grpc-") or name.endswith("-bin"):
            raise ValueError(
                f"header name {key[:40]!r} can't be sent: gRPC takes 0-9, a-z, '_', '.' and '-', reserves "
                "'grpc-' names, and '-bin' ones carry bytes, which headers= doesn't take"
            )
        if not all(" " <= c <= "~" for c in value):
            raise ValueError(f"header {name!r}: its value must be printable ASCII (gRPC refuses the call)")
        out[name] = value
    return out


def _empty_output(tensor: Any) -> np.ndarray:
    """0 rows of an output (``TensorMetadata``): its dims after the batch one, a variable dim as 0."""
    dtype = np.dtype(numpy_dtype(tensor.datatype))
    return np.empty((0, *(max(0, int(d)) for d in tensor.shape[1:])), dtype=dtype)


def _merge_rows(call: PreparedCall, limit: int) -> int | None:
    """The call's rows when a merged request of at most ``limit`` rows has room for others (else ``None``)."""
    rows = batch_rows(call.signature) if limit else None
    return rows if rows is not None and 0 < rows < limit else None


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
