"""DNS discovery of every replica behind a name: ``dns:///triton-headless.ns.svc.cluster.local:8001``.

The pure part, with no pool in it: parse the target, resolve all its addresses, re-resolve when due, and
say which endpoints came and went. The endpoint pool applies a :class:`EndpointChange` by adding the new
endpoints and draining the removed ones (no new calls; calls in flight finish).

Example:
    >>> target = parse_dns_target("dns:///localhost:8001")
    >>> target.host, target.port
    ('localhost', 8001)
    >>> discovery = DnsDiscovery(target, refresh_s=30.0)
    >>> change = discovery.refresh()          # first look: everything is added  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from tritonforge.errors import Unavailable

__all__ = [
    "DEFAULT_GRPC_PORT",
    "DEFAULT_REFRESH_S",
    "Discovery",
    "DnsDiscovery",
    "DnsTarget",
    "EndpointChange",
    "EndpointSources",
    "diff_endpoints",
    "parse_dns_target",
    "resolve",
    "watch",
]

DEFAULT_GRPC_PORT = 8001
# Short: a terminating pod keeps serving only for its preStop sleep (5 s in the generated Deployment) before
# Triton unloads its models and answers NOT_FOUND; a look-up is one cheap getaddrinfo.
DEFAULT_REFRESH_S = 2.0
SCHEME = "dns://"


@dataclasses.dataclass(frozen=True)
class DnsTarget:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"dns:///{host}:{self.port}"


def parse_dns_target(url: str) -> DnsTarget:
    """``dns:///host:port`` (port defaults to 8001, Triton's gRPC port; IPv6 as ``[addr]:port``).

    Raises:
        ValueError: not a ``dns:///`` URL, a DNS-server authority (``dns://8.8.8.8/...``, not supported:
            the system resolver is used), no host, or a bad port.
    """
    if not url.startswith(SCHEME):
        raise ValueError(f"{url!r} is not a DNS target: write dns:///host:port")
    authority, sep, rest = url[len(SCHEME) :].partition("/")
    if not sep or authority:
        raise ValueError(
            f"{url!r}: a DNS server in the URL ({authority or 'none'}) is not supported; "
            "write dns:///host:port (three slashes) to use the system resolver"
        )
    host, port_text = rest, ""
    if rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else tail
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    if not host:
        raise ValueError(f"{url!r} names no host")
    if not port_text:
        return DnsTarget(host, DEFAULT_GRPC_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{url!r}: port {port_text!r} is not a TCP port (1-65535)")
    return DnsTarget(host, int(port_text))


def resolve(target: DnsTarget) -> frozenset[str]:
    """Every address of ``target`` as an endpoint (``ip:port``, ``[ipv6]:port``), via ``getaddrinfo``.

    Raises:
        Unavailable: the name does not resolve (the endpoint names the target).
    """
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Unavailable(f"could not resolve {target.host}: {exc}", endpoint=str(target)) from exc
    endpoints = set()
    for family, _, _, _, address in infos:
        ip = str(address[0])
        endpoints.add(f"[{ip}]:{target.port}" if family == socket.AF_INET6 else f"{ip}:{target.port}")
    return frozenset(endpoints)


@dataclasses.dataclass(frozen=True)
class EndpointChange:
    """What the pool must do: add ``added``, drain ``removed`` (sorted, for stable logs)."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def diff_endpoints(old: Iterable[str], new: Iterable[str]) -> EndpointChange:
    before, after = set(old), set(new)
    return EndpointChange(added=tuple(sorted(after - before)), removed=tuple(sorted(before - after)))


class DnsDiscovery:
    """The endpoints behind a DNS target, re-resolved every ``refresh_s``.

    A failed re-resolution keeps the last endpoints (a DNS blip must not empty the pool); only a first
    resolution that fails raises. ``resolver`` and ``clock`` are seams for tests.
    """

    def __init__(
        self,
        target: DnsTarget | str,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        resolver: Callable[[DnsTarget], Iterable[str]] = resolve,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_s <= 0:
            raise ValueError(f"refresh_s must be > 0, got {refresh_s}")
        self.target = parse_dns_target(target) if isinstance(target, str) else target
        self.refresh_s = refresh_s
        self._resolver = resolver
        self._clock = clock
        self._endpoints: frozenset[str] = frozenset()
        self._next_at: float | None = None
        self.last_error: Unavailable | None = None

    def __repr__(self) -> str:
        return f"DnsDiscovery({self.target}, refresh_s={self.refresh_s}, endpoints={sorted(self._endpoints)})"

    @property
    def endpoints(self) -> frozenset[str]:
        return self._endpoints

    def due(self) -> bool:
        return self._next_at is None or self._clock() >= self._next_at

    def refresh(self) -> EndpointChange:
        """Resolve now; the change since the last resolution.

        Raises:
            Unavailable: the very first resolution failed (later failures keep the last endpoints and are
                kept in ``last_error``).
        """
        first = self._next_at is None
        self._next_at = self._clock() + self.refresh_s
        try:
            found = frozenset(self._resolver(self.target))
            if not found:  # an empty answer is a blip like a failure, never a reason to empty the pool
                raise Unavailable(f"{self.target.host} resolved to no address", endpoint=str(self.target))
        except Unavailable as exc:
            self.last_error = exc
            if first:
                raise
            return EndpointChange()
        self.last_error = None
        change = diff_endpoints(self._endpoints, found)
        self._endpoints = found
        return change

    def refresh_if_due(self) -> EndpointChange:
        return self.refresh() if self.due() else EndpointChange()


@dataclasses.dataclass(frozen=True)
class Discovery:
    """How a client finds the replicas behind its ``dns:///`` URLs.

    Example:
        >>> name = "dns:///triton-headless.ns.svc.cluster.local:8001"
        >>> client = Client(name, discovery=Discovery(refresh_s=1.0))  # doctest: +SKIP

    Attributes:
        refresh_s: re-resolve every ``refresh_s`` seconds (2). Replicas that appear are used from then on;
            those that vanish get no new calls, and their calls in flight finish.
        resolver: ``resolver(target) -> {"ip:port", ...}``; the system resolver (``getaddrinfo``) by
            default. Another one (a service registry, a test) raises :class:`Unavailable` when it fails.

    Raises:
        ValueError: ``refresh_s`` is not a positive number of seconds.
    """

    refresh_s: float = DEFAULT_REFRESH_S
    resolver: Callable[[DnsTarget], Iterable[str]] = resolve

    def __post_init__(self) -> None:
        if not self.refresh_s > 0:
            raise ValueError(f"Discovery(refresh_s=...) must be > 0 seconds, not {self.refresh_s!r}")


class EndpointSources:
    """The endpoints a client's URLs stand for: plain ``host:port`` ones as given, ``dns:///`` ones resolved.

    Raises:
        ValueError: a malformed ``dns:///`` URL (see :func:`parse_dns_target`).
    """

    def __init__(self, urls: Sequence[str], discovery: Discovery) -> None:
        self.refresh_s = discovery.refresh_s
        self._order = list(urls)
        self._lookups = {
            url: DnsDiscovery(url, refresh_s=discovery.refresh_s, resolver=discovery.resolver)
            for url in dict.fromkeys(urls)
            if url.startswith(SCHEME)
        }

    @property
    def dynamic(self) -> bool:
        """Whether any URL is resolved (so the client must re-resolve in the background)."""
        return bool(self._lookups)

    def first(self) -> list[str]:
        """Resolve every ``dns:///`` URL for the first time; every endpoint, in the order of the URLs.

        Raises:
            Unavailable: a name does not resolve (``endpoint`` names the ``dns:///`` URL).
        """
        for lookup in self._lookups.values():
            lookup.refresh()
        return self.current()

    def refresh(self) -> None:
        """Re-resolve every name (blocking I/O); a failed look-up keeps that name's last endpoints."""
        for lookup in self._lookups.values():
            try:
                lookup.refresh()
            except Exception as exc:  # a foreign resolver's own error: kept like a failed look-up
                lookup.last_error = Unavailable(f"resolving {lookup.target} failed: {exc!r}")

    def current(self) -> list[str]:
        """Every endpoint as last resolved (each once, in the order of the URLs; a name's sorted)."""
        found: list[str] = []
        for url in self._order:
            lookup = self._lookups.get(url)
            found += [url] if lookup is None else sorted(lookup.endpoints)
        return list(dict.fromkeys(found))


def watch(
    discovery: DnsDiscovery, on_change: Callable[[EndpointChange], None], stop: threading.Event
) -> None:
    """Re-resolve until ``stop`` is set, calling ``on_change`` with each non-empty change (run it in a
    daemon thread, or ``asyncio.to_thread``). ``discovery`` should have been refreshed once already."""
    while not stop.wait(discovery.refresh_s):
        change = discovery.refresh()
        if change:
            on_change(change)
