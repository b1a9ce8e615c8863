"""Client-side metrics (prometheus_client) and event hooks.

Metrics are labelled per model and per endpoint; every client on one registry shares the same metric
families (prometheus refuses duplicates), so pass ``registry=CollectorRegistry()`` to keep a client's own.

Hooks get a :class:`ClientEvent` for every finished call (``"request"``) and every retry, fallback and
shadow comparison; a locust ``User`` turns them into ``environment.events.request.fire(...)``::

    def report(event: ClientEvent) -> None:
        if event.kind == "request":
            print(event.request_id, event.model, event.endpoint, event.latency_s, event.error)

    client = Client("localhost:8001", hooks=[report])

Hooks run on the caller's thread (the event loop for :class:`AsyncClient`) right after the call finished,
so a hook must be quick; one that raises never fails the call: its error is counted in
``client.hook_errors`` and reported once per hook as a :class:`RuntimeWarning`.
"""

from __future__ import annotations

import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tritonforge.errors import ClientError

__all__ = ["ClientEvent", "ClientMetrics", "Hook", "ShadowStats"]

EventKind = Literal["request", "retry", "fallback", "shadow"]


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """What happened: a finished call (``request``), a ``retry``, a ``fallback``, or a ``shadow`` comparison.

    ``latency_s`` is the whole call's (``request``) or the shadow call's; ``error`` is ``None`` on success;
    ``mismatch`` is set for ``shadow`` events.

    ``request_id`` is the call's id, the one sent to Triton as the request's ``id`` (every attempt, retries
    and fallbacks included; a shadow call sends ``<id>.shadow``). ``inputs`` / ``outputs`` are the call's
    tensors, on ``request`` events (``outputs`` also on ``shadow`` ones): references to the caller's arrays
    and to the answer, not copies, so a hook that keeps them must copy them; ``None`` where they don't apply
    (no outputs for a failed call, no tensors on ``retry`` / ``fallback`` events).
    """

    kind: EventKind
    model: str
    version: str | None
    endpoint: str | None
    latency_s: float = 0.0
    error: ClientError | None = None
    attempt: int = 1
    response_bytes: int = 0
    mismatch: bool | None = None
    request_id: str | None = None
    # Left out of ==, hash and repr: arrays don't compare to a bool, aren't hashable and print at length.
    inputs: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)
    outputs: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)


Hook = Callable[[ClientEvent], None]

_LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class _Families:
    def __init__(self, registry: CollectorRegistry) -> None:
        ns = "tritonforge_client"
        self.hot = _HotMetrics()
        registry.register(self.hot)
        self.failures = Counter(
            f"{ns}_failures", "Calls that failed, by error class", ["model", "error"], registry=registry
        )
        self.retries = Counter(f"{ns}_retries", "Retries of a model's calls", ["model"], registry=registry)
        self.fallbacks = Counter(
            f"{ns}_fallbacks",
            "Calls answered by trying a fallback model",
            ["model", "fallback"],
            registry=registry,
        )
        self.endpoint_failures = Counter(
            f"{ns}_endpoint_failures",
            "Attempts to an endpoint that failed",
            ["endpoint", "error"],
            registry=registry,
        )
        self.shadow_requests = Counter(
            f"{ns}_shadow_requests",
            "Calls mirrored to a shadow model",
            ["model", "shadow"],
            registry=registry,
        )
        self.shadow_mismatches = Counter(
            f"{ns}_shadow_mismatches",
            "Shadow calls whose outputs differed from the primary's (or failed)",
            ["model", "shadow"],
            registry=registry,
        )


class _HotMetrics(Collector):
    """The per-call metrics (requests, latency, attempts per endpoint), kept as plain numbers under one lock
    and turned into metric families only when scraped: prometheus_client's own objects cost several
    microseconds and four locks per call, a visible share of a ~100 us request."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, list[Any]] = {}  # model -> [count, sum_s, per-bucket counts]
        self.attempts: dict[str, int] = {}

    def record(self, model: str, latency_s: float) -> None:
        with self.lock:
            entry = self.calls.get(model)
            if entry is None:
                entry = self.calls[model] = [0, 0.0, [0] * (len(_LATENCY_BUCKETS_S) + 1)]
            entry[0] += 1
            entry[1] += latency_s
            entry[2][bisect_left(_LATENCY_BUCKETS_S, latency_s)] += 1

    def attempt(self, endpoint: str) -> None:
        with self.lock:
            self.attempts[endpoint] = self.attempts.get(endpoint, 0) + 1

    def collect(self) -> Iterator[Metric]:
        ns = "tritonforge_client"
        with self.lock:
            calls = {m: (e[0], e[1], list(e[2])) for m, e in self.calls.items()}
            attempts = dict(self.attempts)
        requests = CounterMetricFamily(
            f"{ns}_requests", "Calls made (one per infer, whatever its retries)", labels=["model"]
        )
        latency = HistogramMetricFamily(
            f"{ns}_request_latency_seconds", "Whole-call latency, retries included", labels=["model"]
        )
        for model, (count, total_s, per_bucket) in sorted(calls.items()):
            requests.add_metric([model], count)
            cumulative, buckets = 0, []
            for bound, n in zip((*map(str, _LATENCY_BUCKETS_S), "+Inf"), per_bucket, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            latency.add_metric([model], buckets, total_s)
        endpoints = CounterMetricFamily(
            f"{ns}_endpoint_requests", "Attempts sent to an endpoint", labels=["endpoint"]
        )
        for endpoint, n in sorted(attempts.items()):
            endpoints.add_metric([endpoint], n)
        yield requests
        yield latency
        yield endpoints


_families: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def _families_for(registry: CollectorRegistry) -> _Families:
    with _families_lock:
        found = _families.get(registry)
        if found is None:
            found = _families[registry] = _Families(registry)
        return found


class ClientMetrics:
    """One client's handle on its registry's metric families."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.families = _families_for(REGISTRY if registry is None else registry)
        hot = self.families.hot
        self.call = hot.record
        self.attempt = hot.attempt

    def failure(self, model: str, error: ClientError) -> None:
        self.families.failures.labels(model, type(error).__name__).inc()

    def endpoint_failure(self, endpoint: str, error: ClientError) -> None:
        self.families.endpoint_failures.labels(endpoint, type(error).__name__).inc()

    def retry(self, model: str) -> None:
        self.families.retries.labels(model).inc()

    def fallback(self, model: str, fallback: str) -> None:
        self.families.fallbacks.labels(model, fallback).inc()

    def shadow(self, model: str, shadow: str, mismatch: bool) -> None:
        self.families.shadow_requests.labels(model, shadow).inc()
        if mismatch:
            self.families.shadow_mismatches.labels(model, shadow).inc()


@dataclass
class ShadowStats:
    """Counts for one primary/shadow pair: mirrored calls, mismatching outputs, failed shadow calls."""

    mirrored: int = 0
    compared: int = 0
    mismatches: int = 0
    errors: int = 0
    max_abs_diff: float = 0.0
