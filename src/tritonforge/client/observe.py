"""Client-side metrics (prometheus_client) and event hooks.

Metrics are labelled per model and per endpoint; every client on one registry shares the same metric
families (prometheus refuses duplicates), so pass ``registry=CollectorRegistry()`` to keep a client's own.

Hooks get a :class:`ClientEvent` for every finished call (``"request"``) and every retry, fallback and
shadow comparison; a locust ``User`` turns them into ``environment.events.request.fire(...)``::

    def report(event: ClientEvent) -> None:
        if event.kind == "request":
            print(event.model, event.endpoint, event.latency_s, event.error)

    client = Client("localhost:8001", hooks=[report])
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from tritonforge.errors import ClientError

__all__ = ["ClientEvent", "ClientMetrics", "Hook", "ShadowStats"]

EventKind = Literal["request", "retry", "fallback", "shadow"]


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """What happened: a finished call (``request``), a ``retry``, a ``fallback``, or a ``shadow`` comparison.

    ``latency_s`` is the whole call's (``request``) or the shadow call's; ``error`` is ``None`` on success;
    ``mismatch`` is set for ``shadow`` events.
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
        self.requests = Counter(
            f"{ns}_requests", "Calls made (one per infer, whatever its retries)", ["model"], registry=registry
        )
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
        self.latency = Histogram(
            f"{ns}_request_latency_seconds",
            "Whole-call latency, retries included",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=registry,
        )
        self.endpoint_requests = Counter(
            f"{ns}_endpoint_requests", "Attempts sent to an endpoint", ["endpoint"], registry=registry
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


_families: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def _families_for(registry: CollectorRegistry) -> _Families:
    with _families_lock:
        found = _families.get(registry)
        if found is None:
            found = _families[registry] = _Families(registry)
        return found


class ClientMetrics:
    """One client's view of the metric families, with label children cached (labels() costs microseconds)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.families = _families_for(REGISTRY if registry is None else registry)
        self._model: dict[str, tuple[Any, Any]] = {}
        self._endpoint: dict[str, Any] = {}

    def call(self, model: str, latency_s: float) -> None:
        children = self._model.get(model)
        if children is None:
            f = self.families
            children = self._model[model] = (f.requests.labels(model), f.latency.labels(model))
        children[0].inc()
        children[1].observe(latency_s)

    def attempt(self, endpoint: str) -> None:
        child = self._endpoint.get(endpoint)
        if child is None:
            child = self._endpoint[endpoint] = self.families.endpoint_requests.labels(endpoint)
        child.inc()

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
