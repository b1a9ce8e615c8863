"""DNS discovery (tritonforge.client._discovery): parsing dns:/// targets, resolving every address of a
loopback name with the system resolver, and the changes the endpoint pool must apply."""

from __future__ import annotations

import threading

import pytest

from tritonforge.client._discovery import (
    DnsDiscovery,
    DnsTarget,
    EndpointChange,
    diff_endpoints,
    parse_dns_target,
    resolve,
    watch,
)
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
