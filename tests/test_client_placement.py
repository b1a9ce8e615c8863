"""Consistent-hash placement in the client's endpoint pool (``Placement``): each model goes to a few replicas
chosen by rendezvous hashing. Real servers on 127.0.0.2, .3, .4 (and .5 joining) stand in for pods; what
each server did is read from its own statistics, never from the client's bookkeeping."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import client_fixtures as cf
import tiny_models
from triton_stats import counts as counts_of
from triton_stats import settled
from tritonforge import AsyncClient, CircuitBreaker, Client, HealthCheck, Placement, RetryPolicy
from tritonforge.client import Discovery, DnsTarget
from tritonforge.client._pool import EndpointPool, rendezvous_score
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

MODELS = [f"m{i}" for i in range(6)]
X = {"x": np.ones((1, 8), np.float32)}
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def home(model: str, urls: list[str], replicas: int = 2) -> set[str]:
    """The model's replicas computed here from the definition (highest scores), not by the pool."""
    return set(sorted(urls, key=lambda u: rendezvous_score(model, u), reverse=True)[:replicas])


def successes(url: str, model: str) -> int:
    """The successful requests ``url``'s server counted for ``model`` (its statistics API)."""
    return counts_of(url, model).requests


def counts(urls: list[str]) -> dict[tuple[str, str], int]:
    return {(u, m): successes(u, m) for u in urls for m in MODELS}


@pytest.fixture(scope="module")
def placement_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("placement")
    onnx = tiny_models.mlp_onnx(root / "_src" / "mlp.onnx")
    for model in MODELS:
        add_model(root / "repo", model, onnx, max_batch_size=8)
    return root / "repo"


def _start(repo: Path, hosts: tuple[str, ...]) -> list[EmbeddedServer]:
    return cf.start_all([EmbeddedServer(repo, host=h) for h in hosts])


@pytest.fixture(scope="module")
def pods(placement_repo: Path) -> Iterator[list[EmbeddedServer]]:
    running = _start(placement_repo, HOSTS)
    try:
        yield running
    finally:
        cf.stop_all(running)


# -- the ranking itself (no I/O) --------------------------------------------------------------------------

URLS = [f"10.0.{i // 250}.{i % 250 + 1}:8001" for i in range(10)]
NAMES = [f"model-{i}" for i in range(3000)]


def _homes(urls: list[str], replicas: int = 2) -> dict[str, set[str]]:
    pool = EndpointPool(urls, CircuitBreaker(), placement=Placement(replicas))
    return {m: {e.url for e in pool.candidates(m, 0.0)} for m in NAMES}


def test_placement_is_the_same_in_every_process_and_for_any_order_of_the_urls() -> None:
    forward = _homes(URLS)
    assert _homes(list(reversed(URLS))) == forward
    code = (
        "from tritonforge.client._pool import EndpointPool; "
        "from tritonforge import CircuitBreaker, Placement; "
        f"p = EndpointPool({URLS!r}, CircuitBreaker(), placement=Placement(2)); "
        "print([sorted(e.url for e in p.candidates(f'model-{i}', 0.0)) for i in range(50)])"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )  # fmt: skip
    assert other.stdout.strip() == str([sorted(forward[f"model-{i}"]) for i in range(50)])


def test_placement_spreads_models_evenly_over_the_endpoints() -> None:
    homes = _homes(URLS)
    per_endpoint = {u: sum(u in h for h in homes.values()) for u in URLS}
    fair = len(NAMES) * 2 / len(URLS)  # 600
    assert all(abs(n - fair) < 0.15 * fair for n in per_endpoint.values()), per_endpoint
    assert all(len(h) == 2 for h in homes.values())


def test_an_endpoint_joining_or_leaving_moves_only_the_assignments_it_takes_or_gives() -> None:
    before = _homes(URLS)
    joined = _homes([*URLS, "10.0.9.9:8001"])
    moved = [(m, before[m] - joined[m]) for m in NAMES if before[m] != joined[m]]
    # a model changes only by taking the newcomer in place of one replica, never between old endpoints
    assert all(joined[m] - before[m] == {"10.0.9.9:8001"} and len(lost) == 1 for m, lost in moved)
    share = len(moved) * 1 / (2 * len(NAMES))  # of the model-replica assignments: ~1/(N+1)
    assert abs(share - 1 / 11) < 0.02, share
    left = _homes(URLS[1:])
    changed = [m for m in NAMES if before[m] != left[m]]
    assert all(URLS[0] in before[m] and URLS[0] not in left[m] for m in changed)
    assert all(len(before[m] & left[m]) == 1 for m in changed)  # the other replica stays
    assert abs(len(changed) / (2 * len(NAMES)) - 1 / 10) < 0.02


def test_candidates_skip_an_open_circuit_to_the_next_ranked_and_prefer_untried_replicas() -> None:
    pool = EndpointPool(
        URLS, CircuitBreaker(failure_threshold=1, reset_timeout_s=10.0), placement=Placement(2)
    )
    ranked = pool.ranking("m")
    first, second, third, fourth = ranked[:4]
    assert pool.candidates("m", 0.0) == [first, second]
    pool.release(pool.acquire(0.0, (second,), "m"), 1.0, transport_failure=True)  # first's circuit opens
    assert pool.candidates("m", 1.0) == [second, third]  # the next endpoint stands in
    assert pool.candidates("m", 1.0, exclude=[second]) == [third]
    assert pool.candidates("m", 1.0, exclude=[second, third]) == [fourth]  # both tried: the next one
    assert pool.candidates("m", 20.0) == [first, second]  # half-open after the reset: it is home again
    every = list(ranked)
    assert pool.candidates("m", 1.0, exclude=every) == [second, third]  # all tried: home, once more


def test_acquire_picks_the_least_loaded_of_the_models_replicas_only() -> None:
    pool = EndpointPool(URLS, CircuitBreaker(), placement=Placement(3))
    replicas = pool.ranking("m")[:3]
    taken = [pool.acquire(0.0, model="m") for _ in range(9)]
    assert {e.url for e in taken if e} == {e.url for e in replicas}
    assert [e.outstanding for e in replicas] == [3, 3, 3]  # least outstanding among the three
    assert pool.acquire(0.0) in pool.endpoints  # no model: the whole pool, as without placement


def test_placement_raises_value_error_for_a_bad_replica_count() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="Placement"):
            Placement(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Placement\(replicas=2\)"):
        cf.make_client("sync", "127.0.0.1:1", placement=2)


# -- through real servers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("face", cf.FACES)
def test_each_models_requests_land_only_on_its_replicas_by_the_servers_statistics(
    face: str, pods: list[EmbeddedServer]
) -> None:
    urls = [p.grpc_url for p in pods]
    before = counts(urls)
    with cf.make_client(face, urls, placement=Placement(2)) as client:
        for model in MODELS:
            client.infer_many(model, [X] * 24, concurrency=4)
    total = 24 * len(MODELS)
    after = settled(lambda: counts(urls), lambda c: sum(c.values()) - sum(before.values()) >= total)
    for model in MODELS:
        served = {u: after[u, model] - before[u, model] for u in urls}
        assert sum(served.values()) == 24, (model, served)
        assert {u for u, n in served.items() if n} <= home(model, urls), (model, served)


def test_a_joining_server_takes_over_only_the_models_that_rank_it_first(
    placement_repo: Path, pods: list[EmbeddedServer]
) -> None:
    urls = [p.grpc_url for p in pods]
    listing = _Listing(urls)
    client = cf.make_client(
        "sync", "dns:///pods.test:8001", placement=Placement(1), discovery=Discovery(0.1, listing)
    )
    try:
        with EmbeddedServer(placement_repo, host="127.0.0.5") as newcomer:
            grown = [*urls, newcomer.grpc_url]
            listing.urls = grown
            deadline = time.monotonic() + 30
            while len(client.endpoints) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(client.endpoints) == 4
            before = counts(grown)
            for model in MODELS:
                client.infer_many(model, [X] * 10, concurrency=2)
            total = 10 * len(MODELS)
            after = settled(lambda: counts(grown), lambda c: sum(c.values()) - sum(before.values()) >= total)
            for model in MODELS:
                (owner,) = home(model, grown, 1)
                assert after[owner, model] - before[owner, model] == 10, model
                if owner != newcomer.grpc_url:  # the model kept its server: the newcomer saw none of it
                    assert after[newcomer.grpc_url, model] == before[newcomer.grpc_url, model]
                    assert owner in home(model, urls, 1)
    finally:
        client.close()


def _outcome(infer: Callable[..., dict[str, np.ndarray]], model: str) -> object:
    try:
        return infer(model, X)["probs"].shape
    except Exception as exc:
        return exc


class _Listing:
    """A resolver whose answer the test sets (a headless Service's endpoints)."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = list(urls)

    def __call__(self, target: DnsTarget) -> set[str]:
        return set(self.urls)


@pytest.mark.slow
@pytest.mark.parametrize("face", cf.FACES)
def test_a_killed_replica_fails_over_to_the_next_ranked_server_with_no_failed_request(
    face: str, placement_repo: Path
) -> None:
    servers = _start(placement_repo, HOSTS)
    try:
        urls = [s.grpc_url for s in servers]
        model = MODELS[0]
        first, second = sorted(home(model, urls), key=lambda u: rendezvous_score(model, u), reverse=True)
        (stand_in,) = set(urls) - {first, second}
        victim = next(s for s in servers if s.grpc_url == first)
        options = {
            "placement": Placement(2),
            "retry": RetryPolicy(max_attempts=6),
            "breaker": CircuitBreaker(2, 0.5),
            "health_check": HealthCheck(interval_s=0.2, timeout_s=0.5),
            "deadline": 30,
            "registry": CollectorRegistry(),
        }
        quiet = successes(stand_in, model)
        outcomes: list[object] = []

        def kill() -> None:
            assert successes(stand_in, model) == quiet  # while both replicas live: none of its requests
            os.kill(victim.pid, signal.SIGKILL)  # type: ignore[arg-type]

        if face == "sync":
            with Client(urls, **options) as client, ThreadPoolExecutor(4) as pool:
                outcomes += pool.map(lambda _: _outcome(client.infer, model), range(60))
                kill()
                outcomes += pool.map(lambda _: _outcome(client.infer, model), range(120))
        else:

            async def run() -> None:
                async with AsyncClient(urls, **options) as client:
                    gate = asyncio.Semaphore(4)

                    async def one() -> object:
                        async with gate:
                            try:
                                return (await client.infer(model, X))["probs"].shape
                            except Exception as exc:
                                return exc

                    outcomes.extend(await asyncio.gather(*(one() for _ in range(60))))
                    await asyncio.to_thread(kill)
                    outcomes.extend(await asyncio.gather(*(one() for _ in range(120))))

            asyncio.run(run())
        failures = [o for o in outcomes if o != (1, 3)]
        answered = len(outcomes) - len(failures)
        assert failures == [] and answered == 180
        # the killed replica's place went to the next server of the model's ranking, the other stayed
        assert settled(lambda: successes(stand_in, model), lambda n: n > quiet) > quiet
        assert settled(lambda: successes(second, model), lambda n: n > 0) > 0
    finally:
        cf.stop_all(servers)
