"""The client over several real servers: failover when a server dies, canary routing, sticky keys,
fallbacks, deadlines and shadow traffic."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

import client_fixtures as cf
from conftest import triton_infer
from tritonforge import (
    AsyncClient,
    CircuitBreaker,
    Deadline,
    DeadlineExceeded,
    Fallback,
    HealthCheck,
    InvalidRequestError,
    RetryPolicy,
    Shadow,
    TrafficSplit,
)
from tritonforge.client import ClientEvent
from tritonforge.server import EmbeddedServer
from tritonforge.server.embedded import free_port

X = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
ONES = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def client_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cf.build_client_repository(tmp_path_factory.mktemp("cluster_models"))


@pytest.fixture(scope="module")
def cluster(client_repo: Path) -> Iterator[list[EmbeddedServer]]:
    with cf.servers(client_repo, 3) as running:
        yield running


@pytest.fixture(scope="module")
def urls(cluster: list[EmbeddedServer]) -> list[str]:
    return [s.grpc_url for s in cluster]


@pytest.fixture(params=cf.FACES)
def face(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def reference(url: str, model: str, x: np.ndarray) -> np.ndarray:
    raw = grpcclient.InferenceServerClient(url)
    try:
        return triton_infer(raw, model, {"x": x})["probs"]
    finally:
        raw.close()


# -- balancing ------------------------------------------------------------------------------------------


def test_client_spreads_requests_over_every_endpoint(face: str, urls: list[str]) -> None:
    registry = CollectorRegistry()
    with cf.make_client(face, urls, registry=registry) as c:
        c.infer_many("mlp", [{"x": X}] * 60, concurrency=6)
    sent = [
        registry.get_sample_value("tritonforge_client_endpoint_requests_total", {"endpoint": u}) for u in urls
    ]
    assert all(n and n > 0 for n in sent) and sum(sent) == 60  # type: ignore[misc]


# -- canary and A/B routing -----------------------------------------------------------------------------


def test_client_canary_gets_its_share_of_requests(face: str, urls: list[str]) -> None:
    split = TrafficSplit.canary("scale", stable="1", candidate="2", share=0.1)
    with cf.make_client(face, urls, routes={"scale": split}) as c:
        outs = c.infer_many("scale", [{"x": ONES}] * 2_000, concurrency=16)
    canary = sum(float(o["y"][0, 0]) == 2.0 for o in outs)
    assert sum(float(o["y"][0, 0]) == 1.0 for o in outs) + canary == 2_000
    assert 140 <= canary <= 260  # 10% +- 3%


def test_async_client_sticky_keys_always_land_on_the_same_side(urls: list[str]) -> None:
    split = TrafficSplit.canary("scale", stable="1", candidate="2", share=0.3, sticky=True)

    async def run() -> dict[str, set[float]]:
        sides: dict[str, set[float]] = {}
        async with AsyncClient(urls, routes={"scale": split}, registry=CollectorRegistry()) as c:
            for _ in range(3):
                keys = [f"user-{i}" for i in range(100)]
                outs = await asyncio.gather(*(c.infer("scale", {"x": ONES}, key=k) for k in keys))
                for k, o in zip(keys, outs, strict=True):
                    sides.setdefault(k, set()).add(float(o["y"][0, 0]))
        return sides

    sides = asyncio.run(run())
    assert all(len(s) == 1 for s in sides.values())
    on_canary = sum(s == {2.0} for s in sides.values())
    assert 0 < on_canary < 100


# -- fallbacks -------------------------------------------------------------------------------------------


def test_client_failing_primary_model_is_answered_by_its_fallback(face: str, urls: list[str]) -> None:
    registry = CollectorRegistry()
    events: list[ClientEvent] = []
    with cf.make_client(
        face, urls, fallbacks={"broken": Fallback("mlp")}, hooks=[events.append], registry=registry
    ) as c:
        out = c.infer("broken", {"x": X})
    np.testing.assert_array_equal(out["probs"], reference(urls[0], "mlp", X))
    assert [e.kind for e in events] == ["fallback", "request"] and events[-1].error is None
    assert (
        registry.get_sample_value(
            "tritonforge_client_fallbacks_total", {"model": "broken", "fallback": "mlp"}
        )
        == 1
    )


def test_client_missing_model_is_answered_by_the_next_in_its_fallback_chain(
    face: str, urls: list[str]
) -> None:
    with cf.make_client(
        face, urls, fallbacks={"gone": Fallback("broken", "mlp")}, registry=CollectorRegistry()
    ) as c:
        out = c.infer("gone", {"x": X})
    np.testing.assert_array_equal(out["probs"], reference(urls[0], "mlp", X))


def test_client_raises_invalid_request_error_without_falling_back(face: str, urls: list[str]) -> None:
    events: list[ClientEvent] = []
    with (
        cf.make_client(
            face,
            urls,
            fallbacks={"mlp": Fallback("broken")},
            hooks=[events.append],
            registry=CollectorRegistry(),
        ) as c,
        pytest.raises(InvalidRequestError),
    ):
        c.infer("mlp", {"x": X.astype(np.float64)})
    assert [e.kind for e in events] == ["request"]


# -- deadlines -------------------------------------------------------------------------------------------


def test_client_raises_deadline_exceeded_without_retrying_when_the_deadline_passes(
    face: str, urls: list[str]
) -> None:
    events: list[ClientEvent] = []
    retry = RetryPolicy(max_attempts=100, budget=None)
    with (
        cf.make_client(face, urls, retry=retry, hooks=[events.append]) as c,
        pytest.raises(DeadlineExceeded, match="'sleepy'") as caught,
    ):
        c.infer("sleepy", {"x": ONES}, timeout_s=0.1)
    assert caught.value.model == "sleepy" and caught.value.endpoint in urls
    assert [e.kind for e in events] == ["request"] and events[0].attempt == 1


def test_client_retries_attempt_timeouts_only_until_the_call_deadline(face: str, urls: list[str]) -> None:
    events: list[ClientEvent] = []
    with (
        cf.make_client(
            face,
            urls,
            deadline=Deadline(total_s=0.5, attempt_s=0.1),
            hooks=[events.append],
            retry=RetryPolicy(max_attempts=1_000, budget=None),
            registry=CollectorRegistry(),
        ) as c,
        pytest.raises(DeadlineExceeded),
    ):
        c.infer("sleepy", {"x": ONES})
    retries = [e for e in events if e.kind == "retry"]
    assert 1 <= len(retries) <= 5  # each attempt got its 0.1 s; none ran past the 0.5 s call
    assert events[-1].kind == "request" and isinstance(events[-1].error, DeadlineExceeded)


def test_client_raises_deadline_exceeded_when_every_server_is_down_however_many_retries_allowed(
    face: str,
) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    retry = RetryPolicy(max_attempts=1_000_000, backoff_initial_s=0.01, backoff_max_s=0.05, budget=None)
    with (
        cf.make_client(face, dead, retry=retry) as c,
        pytest.raises(DeadlineExceeded) as caught,
    ):
        c.infer("mlp", {"x": X}, timeout_s=0.5)
    assert caught.value.__cause__ is not None


# -- shadow traffic --------------------------------------------------------------------------------------


def test_client_shadow_traffic_never_changes_the_response_and_counts_differences(
    face: str, urls: list[str]
) -> None:
    registry = CollectorRegistry()
    shadow = Shadow("scale", version="2", share=1.0)
    with cf.make_client(face, urls, shadows={"scale": shadow}, registry=registry) as c:
        outs = [c.infer("scale", {"x": ONES * i}, version=1) for i in range(20)]
        c.wait_shadows()
        stats = c.shadow_stats[("scale", "scale")]
    assert [float(o["y"][0, 0]) for o in outs] == [float(i) for i in range(20)]  # the primary's answers
    assert stats.mirrored == 20 and stats.mismatches == 19  # x * 2 differs from x * 1, except for 0
    assert stats.max_abs_diff == pytest.approx(19.0)
    assert (
        registry.get_sample_value(
            "tritonforge_client_shadow_mismatches_total", {"model": "scale", "shadow": "scale"}
        )
        == 19
    )


def test_client_failing_shadow_never_changes_the_response(face: str, urls: list[str]) -> None:
    with cf.make_client(face, urls, shadows={"mlp": Shadow("broken")}) as c:
        outs = [c.infer("mlp", {"x": X}) for _ in range(5)]
        c.wait_shadows()
        stats = c.shadow_stats[("mlp", "broken")]
        errors, mismatches = stats.errors, stats.mismatches
    expected = reference(urls[0], "mlp", X)
    assert all(np.array_equal(o["probs"], expected) for o in outs)
    assert errors == 5 and mismatches == 0


def test_client_identical_shadow_counts_no_difference(face: str, urls: list[str]) -> None:
    with cf.make_client(
        face, urls, shadows={"mlp": Shadow("mlp", share=0.5)}, seed=5, registry=CollectorRegistry()
    ) as c:
        for _ in range(40):
            c.infer("mlp", {"x": X})
        c.wait_shadows()
        stats = c.shadow_stats[("mlp", "mlp")]
    assert 5 < stats.mirrored < 35 and stats.mismatches == 0 and stats.errors == 0


# -- a server dies in the middle of a run ---------------------------------------------------------------


@pytest.mark.slow
def test_async_client_loses_no_request_when_a_server_dies_mid_run_and_uses_it_again_when_back(
    client_repo: Path,
) -> None:
    ports = [(free_port(), free_port(), free_port()) for _ in range(3)]
    servers = [EmbeddedServer(client_repo, grpc_port=g, http_port=h, metrics_port=m) for g, h, m in ports]
    rows = np.random.default_rng(9).standard_normal((600, 8)).astype(np.float32)
    registry = CollectorRegistry()
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(EmbeddedServer.start, servers))
        urls = [s.grpc_url for s in servers]
        victim = servers[1]
        expected = np.concatenate(
            [reference(urls[0], "mlp", rows[i : i + 32]) for i in range(0, len(rows), 32)]
        )

        async def run() -> tuple[list[np.ndarray], list[np.ndarray]]:
            async with AsyncClient(
                urls,
                retry=RetryPolicy(max_attempts=6),
                breaker=CircuitBreaker(2, 0.5),
                health_check=HealthCheck(interval_s=0.2, timeout_s=0.5),
                registry=registry,
            ) as c:
                gate = asyncio.Semaphore(16)
                done = 0

                async def one(i: int) -> np.ndarray:
                    nonlocal done
                    async with gate:
                        out = await c.infer("mlp", {"x": rows[i : i + 1]}, timeout_s=30.0)
                        done += 1
                        if done == 150:
                            os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]
                        return out["probs"][0]

                first = await asyncio.gather(*(one(i) for i in range(len(rows))))
                # Back on the same port: the pool takes it in again without the app doing anything.
                await asyncio.to_thread(victim.stop)
                await asyncio.to_thread(victim.start)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    status = {e.url: e for e in c.endpoints}[victim.grpc_url]
                    if status.state == "closed" and status.healthy:
                        break
                    await asyncio.sleep(0.1)
                before = (
                    registry.get_sample_value(
                        "tritonforge_client_endpoint_requests_total", {"endpoint": victim.grpc_url}
                    )
                    or 0
                )
                second = await asyncio.gather(*(one(i) for i in range(90)))
                after = (
                    registry.get_sample_value(
                        "tritonforge_client_endpoint_requests_total", {"endpoint": victim.grpc_url}
                    )
                    or 0
                )
                assert after > before, "the restarted server got no traffic"
                return first, second

        first, second = asyncio.run(run())
    finally:
        cf.stop_all(servers)
    np.testing.assert_allclose(np.stack(first), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.stack(second), expected[:90], rtol=1e-6, atol=1e-7)
    assert (
        registry.get_sample_value(
            "tritonforge_client_failures_total", {"model": "mlp", "error": "Unavailable"}
        )
        is None
    )
    # the kill did hit requests in flight: they failed on the victim and were answered by a retry elsewhere
    assert (registry.get_sample_value("tritonforge_client_retries_total", {"model": "mlp"}) or 0) > 0
