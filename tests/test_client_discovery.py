"""DNS discovery (tritonforge.client._discovery): parsing dns:/// targets, resolving every address of a
loopback name with the system resolver, and the changes the endpoint pool must apply."""

from __future__ import annotations

import random
import threading

import pytest

from tritonforge.client._discovery import (
    Discovery,
    DnsDiscovery,
    DnsTarget,
    EndpointChange,
    EndpointSources,
    diff_endpoints,
    parse_dns_target,
    resolve,
    watch,
)
from tritonforge.client._pool import Endpoint, EndpointPool
from tritonforge.client.policies import CircuitBreaker
from tritonforge.errors import Unavailable


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("dns:///triton-headless.ns.svc.cluster.local:8001", "triton-headless.ns.svc.cluster.local", 8001),
        ("dns:///localhost", "localhost", 8001),
        ("dns:///[::1]:9001", "::1", 9001),
        ("dns:///127.0.0.2:7000", "127.0.0.2", 7000),
    ],
)
def test_parse_dns_target_reads_host_and_port(url: str, host: str, port: int) -> None:
    assert parse_dns_target(url) == DnsTarget(host, port)


@pytest.mark.parametrize(
    "url", ["localhost:8001", "dns://8.8.8.8/triton:8001", "dns:///:8001", "dns:///host:99999", "dns:///h:x"]
)
def test_parse_dns_target_raises_value_error_for_a_bad_target(url: str) -> None:
    with pytest.raises(ValueError):
        parse_dns_target(url)


def test_resolve_finds_the_loopback_address_of_localhost() -> None:
    endpoints = resolve(DnsTarget("localhost", 8001))
    assert "127.0.0.1:8001" in endpoints
    assert endpoints <= {"127.0.0.1:8001", "[::1]:8001"}


def test_resolve_takes_a_numeric_loopback_address_as_it_is() -> None:
    assert resolve(DnsTarget("127.0.0.2", 8001)) == {"127.0.0.2:8001"}


def test_resolve_raises_unavailable_naming_the_target_for_an_unknown_name() -> None:
    with pytest.raises(Unavailable) as caught:
        resolve(DnsTarget("no-such-host.invalid", 8001))
    assert caught.value.endpoint == "dns:///no-such-host.invalid:8001"


def test_diff_endpoints_says_which_came_and_went() -> None:
    change = diff_endpoints({"127.0.0.1:8001", "127.0.0.2:8001"}, {"127.0.0.2:8001", "127.0.0.3:8001"})
    assert change == EndpointChange(added=("127.0.0.3:8001",), removed=("127.0.0.1:8001",))
    assert not diff_endpoints({"a"}, {"a"})


class _Scripted:
    """Answers of a name over time: a set, or Unavailable for a failed look-up."""

    def __init__(self, *answers: frozenset[str] | None) -> None:
        self.answers = list(answers)

    def __call__(self, target: DnsTarget) -> frozenset[str]:
        answer = self.answers.pop(0)
        if answer is None:
            raise Unavailable("resolver down", endpoint=str(target))
        return answer


def test_discovery_adds_and_drops_replicas_and_keeps_them_through_a_failed_lookup() -> None:
    now = [0.0]
    one, two = "127.0.0.1:8001", "127.0.0.2:8001"
    discovery = DnsDiscovery(
        "dns:///triton:8001",
        refresh_s=10,
        resolver=_Scripted(frozenset({one}), frozenset({one, two}), None, frozenset({two})),
        clock=lambda: now[0],
    )
    assert discovery.refresh() == EndpointChange(added=(one,))
    assert discovery.refresh_if_due() == EndpointChange()  # not due yet: no look-up
    now[0] = 10
    assert discovery.refresh_if_due() == EndpointChange(added=(two,))
    now[0] = 20
    assert discovery.refresh_if_due() == EndpointChange() and discovery.endpoints == {one, two}
    assert discovery.last_error is not None
    now[0] = 30
    assert discovery.refresh_if_due() == EndpointChange(removed=(one,))
    assert discovery.endpoints == {two} and discovery.last_error is None


def test_discovery_raises_unavailable_when_the_first_lookup_fails() -> None:
    with pytest.raises(Unavailable):
        DnsDiscovery(DnsTarget("x", 1), resolver=_Scripted(None)).refresh()


def test_watch_reports_changes_until_stopped() -> None:
    seen: list[EndpointChange] = []
    stop = threading.Event()
    answers = _Scripted(frozenset({"a"}), frozenset({"a", "b"}), *[frozenset({"a", "b"})] * 1000)
    discovery = DnsDiscovery(DnsTarget("x", 1), refresh_s=0.01, resolver=answers)
    discovery.refresh()

    def record(change: EndpointChange) -> None:
        seen.append(change)
        stop.set()

    thread = threading.Thread(target=watch, args=(discovery, record, stop))
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert seen == [EndpointChange(added=("b",))]


# -- the pool applies changes: adds, drains, closes when idle (no I/O) -------------------------------------


def _pool(*urls: str) -> EndpointPool:
    return EndpointPool(list(urls), CircuitBreaker(), random.Random(0))


def _attach(ep: Endpoint) -> None:
    ep.handle = f"transport to {ep.url}"


def test_pool_apply_gives_added_endpoints_a_transport_and_picks_them() -> None:
    pool = _pool("a:1")
    assert pool.apply(["b:1"], [], _attach) == []
    assert [e.url for e in pool.endpoints] == ["a:1", "b:1"]
    picked = {pool.acquire(0.0).url for _ in range(2)}  # least outstanding: both get one
    assert picked == {"a:1", "b:1"}
    assert pool.endpoints[1].handle == "transport to b:1"


def test_pool_apply_drains_a_removed_endpoint_until_its_calls_in_flight_are_released() -> None:
    pool = _pool("a:1", "b:1")
    busy = pool.acquire(0.0, exclude=[pool.endpoints[1]])
    assert busy is not None and busy.url == "a:1"
    assert pool.apply([], ["a:1"], _attach) == []  # a call in flight: not closed yet
    assert [e.url for e in pool.endpoints] == ["b:1"] and pool.draining == [busy]
    assert all(pool.acquire(0.0).url == "b:1" for _ in range(3))  # never picked again
    pool.release(busy, 0.0, transport_failure=False)  # the call finishes normally
    assert pool.take_idle() == []  # idle now: one more turn for calls the pool does not count
    assert pool.take_idle() == [busy] and pool.draining == []
    assert [e.url for e in pool.every_endpoint()] == ["b:1"]


def test_pool_hands_back_an_idle_removed_endpoint_for_closing_on_the_next_turn() -> None:
    pool = _pool("a:1", "b:1")
    assert pool.apply([], ["b:1"], _attach) == []
    idle = pool.apply([], [], _attach)
    assert [e.url for e in idle] == ["b:1"] and pool.draining == []


def test_pool_apply_picks_a_draining_endpoint_again_when_its_address_returns() -> None:
    pool = _pool("a:1", "b:1")
    busy = pool.acquire(0.0, exclude=[pool.endpoints[0]])
    assert busy is not None and busy.url == "b:1"
    pool.apply([], ["b:1"], _attach)
    made: list[str] = []
    pool.apply(["b:1"], [], lambda ep: made.append(ep.url))
    assert made == [] and busy in pool.endpoints and pool.draining == []  # same transport, no new one


def test_pool_with_every_endpoint_removed_makes_calls_fail_with_no_endpoint() -> None:
    pool = _pool("a:1")
    pool.apply([], ["a:1"], _attach)
    assert pool.acquire(0.0) is None


# -- the sources a client's URLs stand for -----------------------------------------------------------------


def test_endpoint_sources_expand_dns_urls_among_plain_ones_in_order() -> None:
    answers = {"one": {"127.0.0.3:9", "127.0.0.2:9"}, "two": {"127.0.0.2:9", "127.0.0.4:9"}}
    sources = EndpointSources(
        ["10.0.0.1:8001", "dns:///one:9", "dns:///two:9"],
        Discovery(refresh_s=1, resolver=lambda target: answers[target.host]),
    )
    assert sources.dynamic
    assert sources.first() == ["10.0.0.1:8001", "127.0.0.2:9", "127.0.0.3:9", "127.0.0.4:9"]


def test_endpoint_sources_keep_the_last_endpoints_when_a_resolver_fails_or_finds_nothing() -> None:
    answers: list[object] = [{"127.0.0.1:9"}, set(), RuntimeError("registry down"), {"127.0.0.2:9"}]

    def resolver(target: DnsTarget) -> set[str]:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[return-value]

    sources = EndpointSources(["dns:///x:9"], Discovery(refresh_s=1, resolver=resolver))
    assert sources.first() == ["127.0.0.1:9"]
    sources.refresh()  # nothing found: a blip
    assert sources.current() == ["127.0.0.1:9"]
    sources.refresh()  # the resolver's own error: a blip too
    assert sources.current() == ["127.0.0.1:9"]
    sources.refresh()
    assert sources.current() == ["127.0.0.2:9"]


def test_endpoint_sources_raise_unavailable_naming_the_url_when_a_name_finds_nothing_at_first() -> None:
    sources = EndpointSources(["dns:///x:9"], Discovery(resolver=lambda target: set()))
    with pytest.raises(Unavailable) as caught:
        sources.first()
    assert caught.value.endpoint == "dns:///x:9" and "x resolved to no address" in str(caught.value)


def test_discovery_raises_value_error_for_a_refresh_period_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="refresh_s"):
        Discovery(refresh_s=0)
