"""Endpoint choice without I/O: least outstanding requests, a circuit breaker per endpoint, health marks,
endpoints that come and go (DNS discovery): added ones join the pick set, removed ones drain; and, with a
:class:`Placement`, each model kept on a few endpoints chosen by rendezvous hashing."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tritonforge.client.policies import CircuitBreaker, Placement

__all__ = ["Capabilities", "Endpoint", "EndpointPool", "EndpointStatus", "rendezvous_score"]

State = Literal["closed", "open", "half-open"]
#: models whose ranking is kept (a ranking is the pick set's endpoints in one model's order)
_RANKINGS_KEPT = 4096


@dataclass
class Capabilities:
    """What one server offers beyond the Open Inference Protocol's core, learnt lazily and kept.

    ``None``: not asked yet; ``False``: the server answered UNIMPLEMENTED (not offered, not an error).
    ``max_message_bytes``: the message limit the server named when it refused a request as too large.
    ``model_cache``: whether the server runs a model cache (asked on its first missing model).
    """

    model_config: bool | None = None
    statistics: bool | None = None
    shared_memory: bool | None = None
    streaming: bool | None = None
    max_message_bytes: int | None = None
    model_cache: bool | None = None


def rendezvous_score(model: str, url: str) -> int:
    """The weight of ``url`` for ``model`` in rendezvous (highest random weight) hashing: the endpoints of a
    model are those with the highest scores. BLAKE2b, not ``hash()``: every process must agree."""
    digest = hashlib.blake2b(f"{model}\x00{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Endpoint:
    """One server: its address, the transport the client hangs on it, and the pool's bookkeeping."""

    __slots__ = (
        "capabilities",
        "consecutive_failures",
        "handle",
        "healthy",
        "opened_at",
        "outstanding",
        "probing",
        "state",
        "url",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.handle: Any = None  # the client's transport (channel + callables) for this endpoint
        self.outstanding = 0
        self.consecutive_failures = 0
        self.state: State = "closed"
        self.opened_at = 0.0
        self.probing = False
        self.healthy = True
        self.capabilities = Capabilities()

    def __repr__(self) -> str:
        return f"<Endpoint {self.url} {self.state} outstanding={self.outstanding}>"


@dataclass(frozen=True)
class EndpointStatus:
    """A snapshot of one endpoint as the client sees it."""

    url: str
    state: State
    healthy: bool
    outstanding: int
    consecutive_failures: int


class EndpointPool:
    """Chooses an endpoint per attempt and learns from outcomes; the clock is passed in (``now``).

    A lock keeps the counts right when the sync client is used from many threads; it is never held across
    I/O, so the async client takes it too at no risk.

    ``endpoints`` is the pick set. :meth:`apply` changes it (DNS discovery): it is replaced, never mutated
    in place, so a flow iterating over it meanwhile sees a consistent list. A removed endpoint is
    *draining*: never picked again, its calls in flight finish (``release`` still counts them), and once
    none has been left for a whole turn (two calls of :meth:`apply` or :meth:`take_idle` in a row find it
    idle) it is handed back for its channel to be closed. The extra turn spares the calls the pool does not
    count (a health check, ``load_model`` on every endpoint) that took the endpoint just before it left.
    """

    def __init__(
        self,
        urls: Sequence[str],
        breaker: CircuitBreaker,
        rng: random.Random | None = None,
        placement: Placement | None = None,
    ) -> None:
        if not urls:
            raise ValueError("a client needs at least one endpoint URL")
        self.endpoints = [Endpoint(u) for u in dict.fromkeys(urls)]
        self.breaker = breaker
        self.placement = placement
        # model -> its endpoints by rendezvous score (highest first), for the pick set it was computed on
        self._rankings: dict[str, list[Endpoint]] = {}
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._single = self.endpoints[0] if len(self.endpoints) == 1 else None
        self.draining: list[Endpoint] = []
        self._quiet: list[Endpoint] = []  # draining endpoints found idle last turn

    def _available(self, ep: Endpoint, now: float) -> bool:
        if ep.state == "closed":
            return ep.healthy
        # open: usable again for one half-open probe once reset_timeout_s has passed
        return ep.state == "open" and now - ep.opened_at >= self.breaker.reset_timeout_s

    def only(self) -> Endpoint | None:
        """The pool's one endpoint when it has just one and it is usable (closed circuit, healthy)."""
        single = self._single
        return single if single is not None and single.state == "closed" and single.healthy else None

    def acquire(
        self,
        now: float,
        exclude: Collection[Endpoint] = (),
        model: str = "",
        prefer: Endpoint | None = None,
    ) -> Endpoint | None:
        """The endpoint for the next attempt (counted as outstanding), or ``None`` when none is usable.

        ``prefer`` is chosen whenever it is still in the pick set and usable (the endpoint whose model cache
        has just loaded the call's model). Otherwise endpoints in ``exclude`` (already tried by this call)
        are chosen only when nothing else is usable, and with a placement and a ``model`` the choice is
        among the model's replicas (see :meth:`candidates`).
        """
        with self._lock:
            single = self._single
            if single is not None and single.state == "closed" and single.healthy:
                single.outstanding += 1
                return single
            choices: Sequence[Endpoint] = self.endpoints
            if prefer is not None and prefer in self.endpoints and self._available(prefer, now):
                choices = (prefer,)
            elif model and self.placement:
                choices = self._candidates(model, now, exclude)
            best: Endpoint | None = None
            best_key: tuple[int, int, float] | None = None
            for ep in choices:
                if not self._available(ep, now):
                    continue
                key = (ep in exclude, ep.outstanding, self._rng.random())
                if best_key is None or key < best_key:
                    best, best_key = ep, key
            if best is None:
                return None
            if best.state == "open":
                best.state = "half-open"
                best.probing = True
            best.outstanding += 1
            return best

    def ranking(self, model: str) -> list[Endpoint]:
        """The pick set ordered for ``model`` by rendezvous score, highest first (cached per pick set)."""
        with self._lock:
            return list(self._ranking(model))

    def _ranking(self, model: str) -> list[Endpoint]:
        ranked = self._rankings.get(model)
        if ranked is None:
            ranked = sorted(self.endpoints, key=lambda e: rendezvous_score(model, e.url), reverse=True)
            if len(self._rankings) >= _RANKINGS_KEPT:  # a bound for clients that see endless model names
                self._rankings.clear()
            self._rankings[model] = ranked
        return ranked

    def candidates(self, model: str, now: float, exclude: Collection[Endpoint] = ()) -> list[Endpoint]:
        """The endpoints :meth:`acquire` chooses among for ``model`` under the placement: the first
        ``replicas`` usable endpoints of its ranking (a down or ejected replica's place goes to the next
        one), less those in ``exclude``; when all of them are excluded, the next usable endpoint of the
        ranking not excluded; when none is left, the excluded ones."""
        with self._lock:
            return self._candidates(model, now, exclude)

    def _candidates(self, model: str, now: float, exclude: Collection[Endpoint]) -> list[Endpoint]:
        replicas = self.placement.replicas if self.placement else len(self.endpoints)
        usable = [e for e in self._ranking(model) if self._available(e, now)]
        home = usable[:replicas]
        chosen = [e for e in home if e not in exclude]
        if chosen:
            return chosen
        beyond = [e for e in usable[replicas:] if e not in exclude]
        return beyond[:1] or home

    def release(self, ep: Endpoint, now: float, *, transport_failure: bool) -> None:
        """Record an attempt's outcome: only transport failures count against the endpoint."""
        with self._lock:
            ep.outstanding -= 1
            if transport_failure:
                ep.consecutive_failures += 1
                if ep.state == "half-open" or ep.consecutive_failures >= self.breaker.failure_threshold:
                    ep.state = "open"
                    ep.opened_at = now
                ep.probing = False
            else:
                ep.consecutive_failures = 0
                ep.state = "closed"
                ep.probing = False
                ep.healthy = True

    def mark_health(self, ep: Endpoint, healthy: bool, now: float) -> None:
        """A health check's verdict: a failed one takes the endpoint out, a good one brings it back."""
        with self._lock:
            ep.healthy = healthy
            if healthy:
                if ep.state != "closed":
                    ep.state = "closed"
                    ep.consecutive_failures = 0
            elif ep.state == "closed":
                ep.state = "open"
                ep.opened_at = now

    def apply(
        self, added: Iterable[str], removed: Iterable[str], attach: Callable[[Endpoint], None]
    ) -> list[Endpoint]:
        """Add the endpoints at ``added``, drain those at ``removed``; the drained endpoints now idle.

        A new endpoint is given its transport by ``attach`` (outside the lock) before it can be picked; an
        address that comes back while still draining is picked again on its old transport. Calls in flight
        are never cancelled: a removed endpoint keeps its transport until its last call is released.

        Returns:
            Draining endpoints idle since the last turn, taken out of the pool: close their transports.
        """
        added, removed = list(dict.fromkeys(added)), set(removed)
        with self._lock:
            known = {e.url for e in self.endpoints} | {e.url for e in self.draining}
        fresh = [Endpoint(url) for url in added if url not in known]
        for ep in fresh:
            attach(ep)
        with self._lock:
            wanted = set(added)
            revived = [e for e in self.draining if e.url in wanted]
            draining = [e for e in self.draining if e.url not in wanted]
            active = [e for e in self.endpoints if e.url not in removed]
            draining += [e for e in self.endpoints if e.url in removed]
            active_urls = {e.url for e in active}
            active += [e for e in revived + fresh if e.url not in active_urls]
            self.endpoints = active
            self._rankings = {}
            self._single = active[0] if len(active) == 1 else None
            self.draining = draining
            self._quiet = [e for e in self._quiet if e in draining]
            return self._take_idle()

    def take_idle(self) -> list[Endpoint]:
        """Draining endpoints idle since the last turn, taken out of the pool: close their transports."""
        with self._lock:
            return self._take_idle()

    def _take_idle(self) -> list[Endpoint]:
        idle = [e for e in self.draining if e.outstanding <= 0]
        done = [e for e in idle if e in self._quiet]
        self._quiet = [e for e in idle if e not in done]
        if done:
            self.draining = [e for e in self.draining if e not in done]
        return done

    def every_endpoint(self) -> list[Endpoint]:
        """The pick set and the draining endpoints (every transport the client holds)."""
        with self._lock:
            return self.endpoints + self.draining

    def status(self) -> list[EndpointStatus]:
        with self._lock:
            return [
                EndpointStatus(e.url, e.state, e.healthy, e.outstanding, e.consecutive_failures)
                for e in self.endpoints
            ]
