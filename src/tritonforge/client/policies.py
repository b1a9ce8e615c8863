"""Client policies as small frozen value objects: deadlines, retries, fallbacks, routing, shadowing.

Each policy only *decides* (no I/O, no clock of its own, randomness passed in), so the sync and async
clients share them and tests drive them without a server::

    from tritonforge.client import AsyncClient, Fallback, RetryPolicy, Shadow, TrafficSplit

    client = AsyncClient(
        ["10.0.0.5:8001", "10.0.0.6:8001"],
        retry=RetryPolicy(max_attempts=4),
        routes={"clf": TrafficSplit.canary("clf", stable="1", candidate="2", share=0.1, sticky=True)},
        fallbacks={"clf": Fallback("clf_small")},
        shadows={"clf": Shadow("clf_next", share=0.05)},
    )
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from tritonforge.errors import (
    AllEndpointsFailed,
    ClientError,
    InferenceFailed,
    ModelNotFoundError,
    Unavailable,
)

__all__ = [
    "DEFAULT_DEADLINE",
    "DEFAULT_RETRY",
    "GRPC_HEADER_PREFIX",
    "PROTOCOL_GROUPS",
    "Auth",
    "CircuitBreaker",
    "Coalesce",
    "Deadline",
    "Fallback",
    "HealthCheck",
    "Placement",
    "RetryBudget",
    "RetryPolicy",
    "Shadow",
    "SharedMemory",
    "TLSConfig",
    "TrafficSplit",
    "Variant",
]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class Deadline:
    """How long a call may take in all, retries and fallbacks included, and how long each attempt may take.

    Example:
        >>> Deadline(5.0, attempt_s=1.0).attempt_timeout_s(remaining_s=3.2)
        1.0

    Args:
        total_s: the whole call's budget (``None``: no deadline; a per-call ``timeout_s`` overrides it).
        attempt_s: one attempt's cap, so a hung server is left for another endpoint in time.
    """

    total_s: float | None = 30.0
    attempt_s: float | None = None

    def __post_init__(self) -> None:
        _check(self.total_s is None or self.total_s >= 0, f"total_s must be >= 0, not {self.total_s}")
        _check(self.attempt_s is None or self.attempt_s > 0, f"attempt_s must be > 0, not {self.attempt_s}")

    def attempt_timeout_s(self, remaining_s: float | None) -> float | None:
        """The timeout for the next attempt, given what is left of the call's deadline."""
        if remaining_s is None:
            return self.attempt_s
        return remaining_s if self.attempt_s is None else min(remaining_s, self.attempt_s)


@dataclass(frozen=True)
class RetryBudget:
    """A cap on retries so they can't multiply load during an outage (like Finagle's retry budget).

    Every first attempt deposits ``ratio`` of a token, time deposits ``min_retries_per_s`` tokens a second,
    and every retry withdraws one; the balance never exceeds ``max_tokens``. Under a full outage the retry
    rate is held near ``ratio`` x the request rate (+ the floor), not ``max_attempts`` x.

    Example:
        >>> RetryBudget(ratio=0.2, min_retries_per_s=10.0, max_tokens=100.0)
        RetryBudget(ratio=0.2, min_retries_per_s=10.0, max_tokens=100.0)
    """

    ratio: float = 0.2
    min_retries_per_s: float = 10.0
    max_tokens: float = 100.0

    def __post_init__(self) -> None:
        _check(self.ratio >= 0, f"ratio must be >= 0, not {self.ratio}")
        _check(self.min_retries_per_s >= 0, f"min_retries_per_s must be >= 0, not {self.min_retries_per_s}")
        _check(self.max_tokens >= 1, f"max_tokens must be >= 1, not {self.max_tokens}")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures only, with exponential backoff and full jitter, under a budget.

    Only :class:`~tritonforge.errors.Unavailable` (server unreachable, overloaded, connection lost) and an
    attempt's own timeout (when the call's deadline still has time) are retried; a bad request, an unknown
    model or a failing model never are. A retry goes to another endpoint when there is one.

    Example:
        >>> policy = RetryPolicy(max_attempts=4, backoff_initial_s=0.05)
        >>> policy.backoff_s(retry=1, rng=random.Random(0)) <= 0.05
        True

    Args:
        max_attempts: attempts per model, the first one included (1 disables retries).
        backoff_initial_s: the wait before the first retry; the n-th retry waits up to
            ``min(backoff_max_s, backoff_initial_s * backoff_multiplier ** (n - 1))``.
        backoff_multiplier: the growth of that wait per retry.
        backoff_max_s: the longest wait.
        jitter: the share of that wait drawn at random (1.0 is "full jitter").
        budget: the shared retry budget; ``None`` for none.
    """

    max_attempts: int = 3
    backoff_initial_s: float = 0.02
    backoff_multiplier: float = 2.0
    backoff_max_s: float = 1.0
    jitter: float = 1.0
    budget: RetryBudget | None = field(default_factory=RetryBudget)

    def __post_init__(self) -> None:
        _check(self.max_attempts >= 1, f"max_attempts must be >= 1, not {self.max_attempts}")
        _check(self.backoff_initial_s >= 0, f"backoff_initial_s must be >= 0, not {self.backoff_initial_s}")
        _check(
            self.backoff_multiplier >= 1, f"backoff_multiplier must be >= 1, not {self.backoff_multiplier}"
        )
        _check(0 <= self.jitter <= 1, f"jitter must be in [0, 1], not {self.jitter}")

    @classmethod
    def none(cls) -> RetryPolicy:
        """No retries at all."""
        return cls(max_attempts=1, budget=None)

    def is_retryable(self, error: ClientError) -> bool:
        """Whether ``error`` is transient (never a bad request, a missing model or a failing model)."""
        return isinstance(error, Unavailable)

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number ``retry`` (1-based)."""
        cap = min(self.backoff_max_s, self.backoff_initial_s * self.backoff_multiplier ** max(0, retry - 1))
        return cap * (1.0 - self.jitter) + cap * self.jitter * rng.random()


@dataclass(frozen=True)
class CircuitBreaker:
    """Per-endpoint circuit breaker: opens after ``failure_threshold`` consecutive transport failures, lets
    one probe through after ``reset_timeout_s`` (half-open), and closes again when the probe succeeds.

    Example:
        >>> CircuitBreaker(failure_threshold=3, reset_timeout_s=1.0)
        CircuitBreaker(failure_threshold=3, reset_timeout_s=1.0)
    """

    failure_threshold: int = 3
    reset_timeout_s: float = 1.0

    def __post_init__(self) -> None:
        _check(self.failure_threshold >= 1, f"failure_threshold must be >= 1, not {self.failure_threshold}")
        _check(self.reset_timeout_s >= 0, f"reset_timeout_s must be >= 0, not {self.reset_timeout_s}")


@dataclass(frozen=True)
class HealthCheck:
    """Background readiness checks of every endpoint: a failed check takes it out, a good one brings it back.

    Example:
        >>> HealthCheck(interval_s=0.5)
        HealthCheck(interval_s=0.5, timeout_s=1.0)
    """

    interval_s: float = 2.0
    timeout_s: float = 1.0

    def __post_init__(self) -> None:
        _check(self.interval_s > 0, f"interval_s must be > 0, not {self.interval_s}")
        _check(self.timeout_s > 0, f"timeout_s must be > 0, not {self.timeout_s}")


@dataclass(frozen=True)
class Placement:
    """Each model goes to ``replicas`` of the pool's endpoints, chosen by rendezvous hashing of the model's
    name and each endpoint's address, so a model stays loaded (hot) on few servers instead of all of them.

    Every client computes the same choice (the hash is stable across processes and machines) as long as they
    name the endpoints alike: the ``ip:port`` addresses a ``dns:///`` URL resolves to, or the same
    ``host:port`` strings (``pod-0:8001`` and ``10.0.0.5:8001`` hash differently); when an
    endpoint joins or leaves, only the models that rank it among their first ``replicas`` move (about
    ``replicas / N`` of them). Among a model's replicas the least loaded is picked; when one is down, its
    circuit open or it already failed this call, the next endpoint in the model's ranking stands in, so
    retries and failover work as without placement.

    Example:
        >>> Placement(replicas=2)
        Placement(replicas=2)
    """

    replicas: int = 2

    def __post_init__(self) -> None:
        _check(
            isinstance(self.replicas, int) and not isinstance(self.replicas, bool) and self.replicas >= 1,
            f"Placement(replicas=...) must be an int >= 1, not {self.replicas!r}",
        )


ModelRef = tuple[str, "str | None"]


def _ref(target: str | tuple[str, str | int | None] | Variant) -> tuple[str, str | None]:
    if isinstance(target, Variant):
        return (target.model, target.version)
    if isinstance(target, str):
        return (target, None)
    model, version = target
    return (model, None if version is None else str(version))


@dataclass(frozen=True, init=False)
class Fallback:
    """Models to try, in order, when the requested one fails (not found, failing, or unreachable).

    A bad request (wrong input) and a passed deadline never fall back: the next model can't do better.

    Example:
        >>> Fallback("clf_small", ("clf", 1))
        Fallback('clf_small', ('clf', '1'))
    """

    chain: tuple[tuple[str, str | None], ...]

    def __init__(self, *targets: str | tuple[str, str | int | None] | Variant) -> None:
        _check(bool(targets), "Fallback needs at least one model to fall back to")
        object.__setattr__(self, "chain", tuple(_ref(t) for t in targets))

    def __repr__(self) -> str:
        parts = [repr(m) if v is None else repr((m, v)) for m, v in self.chain]
        return f"Fallback({', '.join(parts)})"

    @staticmethod
    def should_fall_back(error: ClientError) -> bool:
        """Whether another model could answer where this one failed with ``error``."""
        return isinstance(error, (ModelNotFoundError, InferenceFailed, Unavailable, AllEndpointsFailed))


@dataclass(frozen=True)
class Variant:
    """One side of a traffic split: a model (and version) and its weight."""

    model: str
    version: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.version is not None and not isinstance(self.version, str):
            object.__setattr__(self, "version", str(self.version))
        _check(
            self.weight >= 0 and math.isfinite(self.weight),
            f"weight must be finite and >= 0, not {self.weight}",
        )


def _key_point(key: str | bytes) -> float:
    """A stable point in [0, 1) for a key: the same on every process and machine (not ``hash()``)."""
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") / 2.0**64


@dataclass(frozen=True)
class TrafficSplit:
    """Weighted routing between model versions or models, for A/B tests and canaries.

    With ``sticky=True`` a call's ``key`` (a user or session id) always lands on the same variant, on any
    client process; without a key (or with ``sticky=False``) each call draws at random.

    Example:
        >>> split = TrafficSplit.canary("clf", stable="1", candidate="2", share=0.1, sticky=True)
        >>> side = split.choose(key="user-42", rng=random.Random())
        >>> all(split.choose(key="user-42", rng=random.Random()) == side for _ in range(10))
        True
    """

    variants: tuple[Variant, ...]
    sticky: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        _check(bool(self.variants), "TrafficSplit needs at least one variant")
        _check(sum(v.weight for v in self.variants) > 0, "TrafficSplit needs a variant with weight > 0")

    @classmethod
    def canary(
        cls,
        model: str,
        *,
        stable: str | int | None,
        candidate: str | int,
        share: float,
        sticky: bool = False,
        candidate_model: str | None = None,
    ) -> TrafficSplit:
        """``share`` of the traffic to ``candidate`` (a version of ``model``, or of ``candidate_model``)."""
        _check(0 <= share <= 1, f"share must be in [0, 1], not {share}")
        return cls(
            (
                Variant(model, None if stable is None else str(stable), 1.0 - share),
                Variant(candidate_model or model, str(candidate), share),
            ),
            sticky=sticky,
        )

    def choose(self, key: str | bytes | None, rng: random.Random) -> Variant:
        """The variant for one call."""
        point = _key_point(key) if (self.sticky and key is not None) else rng.random()
        total = sum(v.weight for v in self.variants)
        edge = 0.0
        for variant in self.variants:
            edge += variant.weight / total
            if point < edge:
                return variant
        return next(v for v in reversed(self.variants) if v.weight > 0)


@dataclass(frozen=True)
class Shadow:
    """Mirror a share of a model's calls to a candidate, off the response path, and compare its outputs.

    The caller always gets the primary's answer; the candidate's outputs are compared (``rtol``/``atol``
    for numbers, equality otherwise) and the differences counted (``client.shadow_stats``, metrics).

    Example:
        >>> Shadow("clf_next", share=0.05)
        Shadow(model='clf_next', version=None, share=0.05, rtol=1e-05, atol=1e-06)
    """

    model: str
    version: str | None = None
    share: float = 1.0
    rtol: float = 1e-5
    atol: float = 1e-6

    def __post_init__(self) -> None:
        if self.version is not None and not isinstance(self.version, str):
            object.__setattr__(self, "version", str(self.version))
        _check(0 <= self.share <= 1, f"share must be in [0, 1], not {self.share}")

    def should_mirror(self, rng: random.Random) -> bool:
        return self.share >= 1.0 or rng.random() < self.share


@dataclass(frozen=True)
class SharedMemory:
    """When tensors travel through shared memory instead of the gRPC message.

    ``"auto"``: system shared memory for requests of at least ``threshold_bytes`` to an endpoint on this host
    (loopback); ``"system"``: always for same-host endpoints; ``"cuda"``: CUDA shared memory on
    ``cuda_device`` (needs a GPU and ``cuda-python``); ``"off"``: never.

    Example:
        >>> SharedMemory("auto", threshold_bytes=1 << 20)
        SharedMemory(mode='auto', threshold_bytes=1048576, cuda_device=0)
    """

    mode: Literal["auto", "system", "cuda", "off"] = "auto"
    threshold_bytes: int = 1 << 20
    cuda_device: int = 0

    def __post_init__(self) -> None:
        _check(self.mode in ("auto", "system", "cuda", "off"), f"unknown shared memory mode {self.mode!r}")
        _check(self.threshold_bytes >= 0, f"threshold_bytes must be >= 0, not {self.threshold_bytes}")


@dataclass(frozen=True)
class Coalesce:
    """Client-side batching (:class:`AsyncClient`): concurrent calls to one model go out as one request.

    Calls queued for the same endpoint, model and version with the same outputs and the same inputs but
    for the batch dim, by the time the event loop comes round again, are joined along the batch dim into
    one request (at most ``max_rows`` rows, and never more than the model's ``max_batch_size``); each
    call gets its own rows of the answer. Only models whose config enables dynamic batching are merged
    (the server would merge those calls anyway, after a gRPC call each); a merged request that fails for
    a reason other than the transport is re-sent call by call, so a bad call fails alone. No call waits
    for company: a lone call goes out on the next turn of the loop. Calls above ``max_call_bytes`` (which
    joining would copy) and shared-memory calls are sent alone.

    Example:
        >>> Coalesce(max_rows=32)
        Coalesce(enabled=True, max_rows=32, max_call_bytes=65536)
    """

    enabled: bool = True
    max_rows: int | None = None
    max_call_bytes: int = 1 << 16

    def __post_init__(self) -> None:
        _check(self.max_rows is None or self.max_rows >= 1, f"max_rows must be >= 1, not {self.max_rows}")
        _check(self.max_call_bytes >= 0, f"max_call_bytes must be >= 0, not {self.max_call_bytes}")


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the gRPC channels: PEM bytes (or paths) for the root CA and, for mutual TLS, a client pair.

    Example:
        >>> TLSConfig(root_certificates="ca.pem", server_name="triton.internal")      # doctest: +SKIP
    """

    root_certificates: bytes | str | None = None
    private_key: bytes | str | None = None
    certificate_chain: bytes | str | None = None
    server_name: str | None = None

    def __repr__(self) -> str:  # never print key material
        return f"TLSConfig(server_name={self.server_name!r}, mutual={self.private_key is not None})"


#: Triton's gRPC protocol groups (``--grpc-restricted-protocol``): which group each RPC belongs to.
PROTOCOL_GROUPS: Mapping[str, str] = {
    "ServerLive": "health",
    "ServerReady": "health",
    "ModelReady": "health",
    "ServerMetadata": "metadata",
    "ModelMetadata": "metadata",
    "ModelInfer": "inference",
    "ModelStreamInfer": "inference",
    "ModelConfig": "model-config",
    "ModelStatistics": "statistics",
    "RepositoryIndex": "model-repository",
    "RepositoryModelLoad": "model-repository",
    "RepositoryModelUnload": "model-repository",
    "SystemSharedMemoryStatus": "shared-memory",
    "SystemSharedMemoryRegister": "shared-memory",
    "SystemSharedMemoryUnregister": "shared-memory",
    "CudaSharedMemoryStatus": "shared-memory",
    "CudaSharedMemoryRegister": "shared-memory",
    "CudaSharedMemoryUnregister": "shared-memory",
    "TraceSetting": "trace",
    "LogSettings": "logging",
}
_GROUPS = frozenset(PROTOCOL_GROUPS.values())
#: gRPC sends a restricted protocol's header under this prefix (Triton strips it before comparing).
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"


class Auth:
    """Who the client is: a header per Triton protocol group, and TLS (mutual TLS with a client pair).

    Triton restricts a group of calls to callers that send its header
    (``--grpc-restricted-protocol=model-repository:admin-key=...``); the client sends each call the header
    of its group only, so an inference key is never sent with a load, and the operator key only with
    model-repository calls. Groups: ``health``, ``metadata``, ``inference``, ``model-config``,
    ``statistics``, ``model-repository``, ``shared-memory``, ``trace``, ``logging``.

    Example:
        >>> Auth({"inference": ("infer-key", os.environ["INFER_KEY"]),                   # doctest: +SKIP
        ...       "model-repository,statistics": ("admin-key", os.environ["ADMIN_KEY"])},
        ...      tls=TLSConfig(root_certificates="ca.pem", private_key="me.key", certificate_chain="me.pem"))
        >>> Auth.from_specs(["model-repository:admin-key=env:ADMIN_KEY"])              # doctest: +SKIP

    Raises:
        ValueError: an unknown group, or an empty header name or value.
    """

    __slots__ = ("keys", "tls")

    def __init__(
        self, keys: Mapping[str, tuple[str, str]] | None = None, *, tls: TLSConfig | None = None
    ) -> None:
        resolved: dict[str, tuple[str, str]] = {}
        for groups, pair in (keys or {}).items():
            if not isinstance(pair, tuple) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ValueError(f"Auth: group {groups!r} needs a (header, value) pair of strings")
            header, value = pair
            if not header or not value:
                raise ValueError(f"Auth: group {groups!r} has an empty header name or value")
            for group in groups.split(","):
                if group not in _GROUPS:
                    raise ValueError(
                        f"Auth: unknown protocol group {group!r}; Triton's groups are "
                        f"{', '.join(sorted(_GROUPS))}"
                    )
                resolved[group] = (header.lower(), value)
        self.keys: Mapping[str, tuple[str, str]] = resolved
        self.tls = tls

    @classmethod
    def from_specs(cls, specs: Iterable[str], *, tls: TLSConfig | None = None) -> Auth:
        """From Triton's own ``"<groups>:<header>=<ref>"`` specs, each value a secret reference
        (``env:NAME`` or ``@PATH`` of a 0600 file; see :mod:`tritonforge.client.secrets`), never the
        secret itself.

        Raises:
            SecretError: a malformed spec, an unset variable, or a file others can read.
        """
        from tritonforge.client.secrets import resolve_restricted_spec

        keys: dict[str, tuple[str, str]] = {}
        for spec in specs:
            resolved = resolve_restricted_spec(spec, what="auth")
            groups, _, pair = resolved.partition(":")
            header, _, value = pair.partition("=")
            keys[groups] = (header, value)
        return cls(keys, tls=tls)

    def group_of(self, method: str) -> str | None:
        """The protocol group of an RPC (``"RepositoryModelLoad"`` → ``"model-repository"``)."""
        return PROTOCOL_GROUPS.get(method)

    def grpc_metadata(self, method: str) -> tuple[str, str] | None:
        """The ``(header, value)`` pair to send with ``method`` over gRPC, if its group has one."""
        pair = self.keys.get(PROTOCOL_GROUPS.get(method, ""))
        return None if pair is None else (GRPC_HEADER_PREFIX + pair[0], pair[1])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Auth) and dict(self.keys) == dict(other.keys) and self.tls == other.tls

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.keys.items())), self.tls))

    def __repr__(self) -> str:  # never print a secret
        groups = ", ".join(f"{g}: {h}=***" for g, (h, _) in sorted(self.keys.items()))
        return f"Auth({{{groups}}}, tls={self.tls!r})"


DEFAULT_DEADLINE = Deadline()
DEFAULT_RETRY = RetryPolicy()


def as_deadline(value: Deadline | float | None) -> Deadline:
    if isinstance(value, Deadline):
        return value
    return Deadline(total_s=value)


def as_refs(
    targets: Iterable[str | tuple[str, str | int | None] | Variant],
) -> tuple[tuple[str, str | None], ...]:
    return tuple(_ref(t) for t in targets)
