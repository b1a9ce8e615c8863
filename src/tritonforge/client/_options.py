"""The client's options and state: the keyword options of its calls, what the constructor takes and
checks (headers, TLS, auth, shared memory, batching, streams), and the small decisions every layer
above asks (the gRPC metadata of a method, request ids, the targets of a call, a request's bytes, a
shared-memory request and its region's registration).

No network I/O: the channels are :mod:`tritonforge.client._channels`'. The one thing done outside the
process's memory is a shared-memory request's: its region is taken from the client's
:class:`~tritonforge.client.shm.ShmPool` (a ``/dev/shm`` region, made when no free one fits and reused
after) and the tensors are copied into it.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import threading
import time
from collections.abc import Collection, Generator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import numpy as np
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb

from tritonforge.client._coalesce import Batchable
from tritonforge.client._codec import (
    ModelMetadata,
    frame,
    request_header,
)
from tritonforge.client._discovery import Discovery, EndpointSources
from tritonforge.client._flow import Attempt, BudgetState, Op
from tritonforge.client._inputs import (
    MAX_REQUEST_ID_BYTES,
    NonFinitePolicy,
    PreparedCall,
    as_version,
    check_name,
    prepare,
)
from tritonforge.client._pool import Endpoint, EndpointPool, EndpointStatus
from tritonforge.client.observe import ClientMetrics, Hook, ShadowStats
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
    Placement,
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
    ClientError,
    InvalidRequestError,
)

if TYPE_CHECKING:
    pass

__all__ = ["DEFAULT_CONTROL_TIMEOUT_S", "ClientCore", "Flow", "InferOptions", "ManyOptions", "Outputs"]


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


DEFAULT_CONTROL_TIMEOUT_S = 300.0  # load/unload: long enough for a big model, never forever


_HEADER_CACHE_LIMIT = 4096


_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.enable_retries", 0),  # we retry, with a budget, across endpoints
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


_METADATA_LIMIT_BYTES = 8192  # gRPC's default soft limit on a call's metadata, Triton's server included


_HEADER_KEY = re.compile(r"^[0-9a-z_.-]+$")


def _url(url: str) -> str:
    if not isinstance(url, str) or not url:
        raise ValueError(f"an endpoint URL is a 'host:port' string, not {url!r}")
    for scheme in ("grpc://", "grpcs://"):
        if url.startswith(scheme):
            return url[len(scheme) :]
    return url


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


class ClientCore:
    """The client's options and state (the arguments are :class:`~tritonforge.client._base.BaseClient`'s)."""

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
        placement: Placement | None = None,
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
        if placement is not None and not isinstance(placement, Placement):
            raise TypeError(f"placement must be a Placement, e.g. Placement(replicas=2), not {placement!r}")
        self.placement = placement
        self._pool = EndpointPool(self._sources.first(), self.breaker, random.Random(seed), placement)
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

    def _known_limit(self) -> int | None:
        """The smallest message limit an endpoint has named (``None``: none known yet)."""
        known = [ep.capabilities.max_message_bytes for ep in self._pool.endpoints]
        return min((k for k in known if k), default=None)

    @property
    def endpoints(self) -> list[EndpointStatus]:
        """Each endpoint's state: circuit (closed/open/half-open), health, outstanding requests."""
        return self._pool.status()

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook(event)`` for every finished call, retry, fallback and shadow comparison."""
        self.hooks.append(hook)
