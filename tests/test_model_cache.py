"""The model cache through the real server: a model loads on its first request, the least recently used
idle ones are unloaded under the budget, pinned and busy models stay, ensembles load whole, the deadline
bounds the wait, and two clients racing over more models than fit never see a failed request. Several
cache servers in one client's pool (127.0.0.2, .3, ... stand in for pods): every call after a miss is
answered by the server whose cache loaded its model, and one that dies between the load and the retry
costs the call no more than a failover."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

import client_fixtures as cf
from cli_runner import run_tritonforge
from triton_stats import Counts, counts, settled
from tritonforge.cache import CACHE_MODEL, CacheBudget, parse_size, write_cache_repository
from tritonforge.client import Client, ClientEvent, RetryPolicy
from tritonforge.client._misses import CACHE_MODEL as CLIENT_CACHE_MODEL
from tritonforge.errors import DeadlineExceeded, ModelNotFoundError, Unavailable
from tritonforge.server import EmbeddedServer

# y = x + add; a negative x sleeps -x seconds first (a request that stays in flight)
ECHO = """
import json, time
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        self.add = float(params["add"]["string_value"])
        time.sleep(float(params.get("init_s", {}).get("string_value", "0")))

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            if x.flat[0] < 0:
                time.sleep(-float(x.flat[0]))
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", (x + self.add).astype(np.float32))]))
        return out
"""
TENSORS = """max_batch_size: 0
input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]
"""
ADDS = {"pinned": 1, "a": 2, "b": 3, "c": 4, "d": 5, "e1": 10, "e2": 100, "slow_load": 7}
BUDGET = 4  # models loaded at most (the coordinator not counted)
IDLE_S = 0.5


def echo(repo: Path, name: str, add: float, init_s: float = 0.0) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(ECHO)
    params = f'parameters {{ key: "add" value {{ string_value: "{add}" }} }}\n'
    params += f'parameters {{ key: "init_s" value {{ string_value: "{init_s}" }} }}\n'
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\n{TENSORS}{params}')


def ensemble(repo: Path, name: str, steps: list[str]) -> None:
    (repo / name / "1").mkdir(parents=True)
    blocks, source = [], "x"
    for i, step in enumerate(steps):
        target = "y" if i == len(steps) - 1 else f"t{i}"
        blocks.append(
            f'step [{{ model_name: "{step}" model_version: -1 input_map {{ key: "x" value: "{source}" }} '
            f'output_map {{ key: "y" value: "{target}" }} }}]'
        )
        source = target
    text = f'name: "{name}"\nplatform: "ensemble"\n{TENSORS}ensemble_scheduling {{\n' + "\n".join(blocks)
    (repo / name / "config.pbtxt").write_text(text + "\n}\n")


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    root = tmp_path_factory.mktemp("cache")
    repo = root / "repo"
    for name, add in ADDS.items():
        echo(repo, name, add, init_s=3.0 if name == "slow_load" else 0.0)
    ensemble(repo, "ens", ["e1", "e2"])
    cache = write_cache_repository(
        root / "cache", CacheBudget(max_models=BUDGET, pins=("pinned",), idle_s=IDLE_S)
    )
    with EmbeddedServer(
        [repo, cache], model_control="explicit", load_models=[CACHE_MODEL, "pinned"]
    ) as server:
        yield server


def states(server: EmbeddedServer) -> dict[str, str]:
    with Client(server.grpc_url) as client:
        return {m["name"]: m.get("state", "") for m in client.repository_index()}


def loaded(server: EmbeddedServer) -> set[str]:
    return {m for m, s in states(server).items() if s == "READY"} - {CACHE_MODEL}


def ask_cache(server: EmbeddedServer, model: str) -> dict[str, object]:
    """What a plain tritonclient user does: one request to the coordinator naming the model."""
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = grpcclient.InferInput("MODEL", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([model.encode()], dtype=np.object_))
        answer = client.infer(CACHE_MODEL, [tensor]).as_numpy("STATE")[0]
    finally:
        client.close()
    return dict(json.loads(answer))


def x(value: float) -> dict[str, np.ndarray]:
    return {"x": np.array([value], dtype=np.float32)}


def infer(client: Client, model: str, value: float = 1.0, **options: float) -> float:
    return float(client.infer(model, x(value), **options)["y"][0])  # type: ignore[arg-type]


def wait_idle() -> None:
    time.sleep(IDLE_S + 0.3)


def test_client_and_cache_name_the_same_coordinator() -> None:
    assert CLIENT_CACHE_MODEL == CACHE_MODEL


def test_cache_loads_a_model_on_its_first_request(cached: EmbeddedServer) -> None:
    assert "a" not in loaded(cached)
    with Client(cached.grpc_url) as client:
        assert infer(client, "a") == 1 + ADDS["a"]
    assert "a" in loaded(cached)


def test_cache_evicts_the_least_recently_used_idle_model_first(cached: EmbeddedServer) -> None:
    with Client(cached.grpc_url) as client:
        for model in ("a", "b", "c"):  # with the pin: the budget of 4, full
            infer(client, model)
            time.sleep(0.05)  # distinct recency (Triton keeps it in milliseconds)
        wait_idle()
        infer(client, "a")  # a is now the most recent; b the least
        wait_idle()
        infer(client, "d")
    now = loaded(cached)
    assert now == {"pinned", "a", "c", "d"}, now


def test_cache_never_evicts_a_pinned_model(cached: EmbeddedServer) -> None:
    with Client(cached.grpc_url) as client:
        for model in ("a", "b", "c", "d", "a", "b"):
            wait_idle()
            infer(client, model)
            assert "pinned" in loaded(cached)
    assert len(loaded(cached)) <= BUDGET


def test_cache_never_evicts_a_model_with_requests_in_flight(cached: EmbeddedServer) -> None:
    """``a`` answers requests back to back (each 0.25 s in flight) while the others cycle through the
    budget: it stays loaded and none of its requests fails."""
    errors: list[BaseException] = []
    stop = threading.Event()
    done = [0]

    def keep_busy() -> None:
        with Client(cached.grpc_url) as client:
            try:
                while not stop.is_set():
                    assert infer(client, "a", -0.25) == -0.25 + ADDS["a"]
                    done[0] += 1
            except BaseException as exc:  # reported below
                errors.append(exc)

    thread = threading.Thread(target=keep_busy)
    thread.start()
    try:
        with Client(cached.grpc_url) as client:
            while done[0] < 2 and not errors and thread.is_alive():
                time.sleep(0.05)
            for model in ("b", "c", "d", "b", "c", "d"):
                wait_idle()
                infer(client, model)
                assert "a" in loaded(cached)
    finally:
        stop.set()
        thread.join()
    assert errors == []


def test_an_unload_lets_the_execution_in_progress_finish(cached: EmbeddedServer) -> None:
    """Triton's statistics see a request only when it completes: one far longer than the model's usual
    requests can look idle and be evicted. Triton then finishes it before the model goes."""
    with Client(cached.grpc_url) as client:
        for model in ("b", "c", "d"):  # b the least recently used
            infer(client, model)
            time.sleep(0.05)
        wait_idle()
        answers: list[float] = []
        thread = threading.Thread(target=lambda: answers.append(infer(client, "b", -3.0)))
        thread.start()
        time.sleep(0.5)
        evicted = ask_cache(cached, "ens")["evicted"]  # 3 models to make room for: b goes first
        thread.join()
        assert "b" in evicted
        assert answers == [-3.0 + ADDS["b"]]
        wait_idle()
        assert infer(client, "b") == 1 + ADDS["b"]  # a miss again: loaded anew


def test_cache_loads_an_ensemble_with_its_composing_models_and_evicts_them_together(
    cached: EmbeddedServer,
) -> None:
    wait_idle()
    with Client(cached.grpc_url) as client:
        assert infer(client, "ens") == 1 + ADDS["e1"] + ADDS["e2"]
        assert {"ens", "e1", "e2"} <= loaded(cached)
        assert len(loaded(cached)) <= BUDGET
        wait_idle()
        for model in ("a", "b"):  # the ensemble (3 models) must go whole to make room for both
            infer(client, model)
    now = loaded(cached)
    assert not {"ens", "e1", "e2"} & now, now
    assert now <= {"pinned", "a", "b", "c", "d"}


def test_cache_wait_is_bounded_by_the_call_deadline(cached: EmbeddedServer) -> None:
    assert "slow_load" not in loaded(cached)
    with Client(cached.grpc_url) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="slow_load"):
            infer(client, "slow_load", timeout_s=0.8)
        assert time.monotonic() - start < 2.0
        # the load carries on in the server: a later call with time enough is answered
        assert infer(client, "slow_load", timeout_s=30) == 1 + ADDS["slow_load"]


def test_cache_names_a_model_that_is_in_no_repository(cached: EmbeddedServer) -> None:
    with Client(cached.grpc_url) as client, pytest.raises(ModelNotFoundError, match="none of the server"):
        infer(client, "no_such_model")


def test_plain_tritonclient_users_ask_the_coordinator_themselves(cached: EmbeddedServer) -> None:
    wait_idle()
    answer = ask_cache(cached, "c")
    assert answer["state"] in ("loaded", "ready")
    assert ask_cache(cached, "c")["state"] == "ready"
    status = ask_cache(cached, "")
    assert status["max_models"] == BUDGET and status["pins"] == ["pinned"]
    assert int(status["memory_bytes"]) > 0  # type: ignore[call-overload]


def test_two_clients_racing_over_more_models_than_fit_never_fail_a_request(cached: EmbeddedServer) -> None:
    """Two clients (threads, each its own connection) pick models at random, with requests in flight and
    the coordinator loading and unloading under them: every request is answered, and answered right."""
    models = ["a", "b", "c", "d", "ens"]
    want = {m: 1 + ADDS[m] for m in "abcd"} | {"ens": 1 + ADDS["e1"] + ADDS["e2"]}
    failures: list[str] = []
    answered = [0, 0]

    def run(index: int) -> None:
        rng = random.Random(index)
        with Client(cached.grpc_url) as client:
            deadline = time.monotonic() + 25
            while time.monotonic() < deadline:
                model = rng.choice(models)
                try:
                    got = infer(client, model, timeout_s=60)
                except Exception as exc:  # every failure is the finding
                    failures.append(f"{model}: {exc}")
                    continue
                if got != want[model]:
                    failures.append(f"{model}: {got} != {want[model]}")
                answered[index] += 1
                time.sleep(rng.uniform(0, IDLE_S * 2))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert min(answered) > 5
    assert int(ask_cache(cached, "")["evictions"]) > 3  # type: ignore[call-overload]


def test_cache_never_goes_past_its_ceiling_while_every_model_is_busy(tmp_path: Path) -> None:
    """A budget of 2 with no overflow while two threads keep ``a`` and ``b`` busy: asking for ``c`` still
    loads it (the least recently used busy model goes after idle_s), the server never holds more than 2
    models (loaded or still unloading), and every request of every thread is answered right (a model
    unloaded under its caller is a miss, loaded again)."""
    repo = tmp_path / "repo"
    for name in "abc":
        echo(repo, name, ADDS[name])
    budget = CacheBudget(max_models=2, idle_s=IDLE_S, overflow=0)
    assert budget.ceiling == 2
    cache = write_cache_repository(tmp_path / "cache", budget)
    failures: list[str] = []
    most = [0]
    stop = threading.Event()

    def keep_busy(model: str) -> None:
        with Client(server.grpc_url) as client:
            while not stop.is_set():
                try:
                    got = infer(client, model, -0.0625, timeout_s=60)
                except Exception as exc:  # every failure is the finding
                    failures.append(f"{model}: {exc}")
                    continue
                if got != -0.0625 + ADDS[model]:
                    failures.append(f"{model}: {got}")

    def sample() -> None:  # models still unloading hold their processes: counted too
        while not stop.is_set():
            held = {m for m, s in states(server).items() if s in ("READY", "UNLOADING")} - {CACHE_MODEL}
            most[0] = max(most[0], len(held))
            time.sleep(0.02)

    with EmbeddedServer([repo, cache], model_control="explicit", load_models=[CACHE_MODEL]) as server:
        threads = [threading.Thread(target=keep_busy, args=(m,)) for m in "ab"]
        threads.append(threading.Thread(target=sample))
        for thread in threads:
            thread.start()
        try:
            with Client(server.grpc_url) as client:
                deadline = time.monotonic() + 30
                while loaded(server) != {"a", "b"} and time.monotonic() < deadline:
                    time.sleep(0.05)
                for _ in range(3):
                    assert infer(client, "c", timeout_s=60) == 1 + ADDS["c"]
                    time.sleep(IDLE_S)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        status = ask_cache(server, "")
    assert failures == []
    assert most[0] <= 2
    assert status["max_loaded_models"] == 2
    assert int(status["evictions"]) >= 1  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("text", "size"), [("512MiB", 512 * 2**20), ("2G", 2 * 2**30), ("1.5GiB", int(1.5 * 2**30)), ("10", 10)]
)
def test_parse_size_reads_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--cache-max-models", "0"), "--cache-max-models must be"),
        (("--cache-max-memory", "12XB"), "is not a size"),
        (("--pin", "a"), "--pin needs a cache"),
        (("--cache-max-models", "2", "--model-control", "poll"), "explicit"),
    ],
)
def test_serve_refuses_bad_cache_options_in_one_line(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    (tmp_path / "repo").mkdir()
    result = run_tritonforge("serve", str(tmp_path / "repo"), *args, timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_cache_keeps_measured_memory_under_its_budget(tmp_path: Path) -> None:
    """A memory budget: PSS summed over tritonserver and its processes. Two models' cost is measured, the
    budget set between two and three of them (the coordinator reloaded with it): loading a third unloads
    the least recently used one, and the memory measured after is back under the budget."""
    repo = tmp_path / "repo"
    for name in ("a", "b", "c"):
        echo(repo, name, ADDS[name])
    huge = CacheBudget(max_memory_bytes=2**40, idle_s=IDLE_S)
    cache = write_cache_repository(tmp_path / "cache", huge)
    with EmbeddedServer([repo, cache], model_control="explicit", load_models=[CACHE_MODEL]) as server:
        base = int(ask_cache(server, "")["memory_bytes"])  # type: ignore[call-overload]
        one = int(ask_cache(server, "a")["memory_bytes"])  # type: ignore[call-overload]
        two = int(ask_cache(server, "b")["memory_bytes"])  # type: ignore[call-overload]
        cost = max(one - base, two - one)
        assert cost > 0
        budget = two + cost // 2
        write_cache_repository(tmp_path / "cache", CacheBudget(max_memory_bytes=budget, idle_s=IDLE_S))
        with Client(server.grpc_url) as client:
            client.load_model(CACHE_MODEL)  # the coordinator reloaded with the new budget
            wait_idle()
            infer(client, "b")  # a is now the least recently used
            wait_idle()
            assert infer(client, "c") == 1 + ADDS["c"]
        status = ask_cache(server, "")
        assert loaded(server) == {"b", "c"}
        assert int(status["memory_bytes"]) <= budget  # type: ignore[call-overload]


def test_async_client_loads_a_missing_model_through_the_cache(cached: EmbeddedServer) -> None:
    from tritonforge.client import AsyncClient

    async def main() -> float:
        async with AsyncClient(cached.grpc_url) as client:
            out = await client.infer("d", x(1.0), timeout_s=60)
            return float(out["y"][0])

    wait_idle()
    for model in ("a", "b", "c"):  # with the pin, the budget: d is out
        ask_cache(cached, model)
    assert "d" not in loaded(cached)
    assert asyncio.run(main()) == 1 + ADDS["d"]


def test_serve_runs_the_cache_beside_the_repository_and_never_writes_it(tmp_path: Path) -> None:
    from cli_runner import tritonforge_process

    repo = tmp_path / "repo"
    for name in ("a", "b"):
        echo(repo, name, ADDS[name])

    def listing() -> list[tuple[str, int]]:  # the stub's own __pycache__ (Python's import) aside
        files = [p for p in repo.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        return sorted((str(p.relative_to(repo)), p.stat().st_mtime_ns) for p in files)

    before = listing()
    with tritonforge_process("serve", str(repo), "--cache-max-models", "2", "--pin", "a") as process:
        assert process.stdout is not None
        url, said = None, []
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            said.append(line)
            match = re.match(r"gRPC\s+(\S+)", line)
            url = match.group(1) if match else None
        assert url, "".join(said)
        with Client(url) as client:
            assert {m["name"]: m.get("state") for m in client.repository_index()}.get("b") != "READY"
            assert infer(client, "b", timeout_s=60) == 1 + ADDS["b"]
            assert infer(client, "a") == 1 + ADDS["a"]
        while not said[-1].startswith("Ctrl-C"):
            said.append(process.stdout.readline())
        cache_line = next(line for line in said if line.startswith("cache"))
        assert "at most 2 models" in cache_line and "pinned: a" in cache_line
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
    assert listing() == before


def test_the_coordinator_needs_only_what_nvidias_image_has(tmp_path: Path) -> None:
    """The stubs in an interpreter reduced to NVIDIA's image (its Python, the standard library and numpy
    only): the coordinator loads on a miss and evicts under its budget all the same."""
    from reduced_python import reduced_python

    repo = tmp_path / "repo"
    for name in ("a", "b"):
        echo(repo, name, ADDS[name])
    cache = write_cache_repository(tmp_path / "cache", CacheBudget(max_models=1, idle_s=0.2))
    with (
        EmbeddedServer(
            [repo, cache], model_control="explicit", load_models=[CACHE_MODEL], python=reduced_python()
        ) as server,
        Client(server.grpc_url) as client,
    ):
        assert infer(client, "a", timeout_s=60) == 1 + ADDS["a"]
        time.sleep(0.5)
        assert infer(client, "b", timeout_s=60) == 1 + ADDS["b"]
        assert loaded(server) == {"b"}


# -- several cache servers in one client's pool (no placement) --------------------------------------------

# y = x + add, and which server answered: its stub's process group, the server's (EmbeddedServer.pid)
SERVED = """
import json, os
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        self.add = float(json.loads(args["model_config"])["parameters"]["add"]["string_value"])
        self.server = np.array([os.getpgrp()], dtype=np.int64)

    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = pb_utils.Tensor("y", (x + self.add).astype(np.float32))
            out.append(pb_utils.InferenceResponse([y, pb_utils.Tensor("server", self.server)]))
        return out
"""
SERVED_OUTPUT = 'output [{ name: "server" data_type: TYPE_INT64 dims: [1] }]\n'
POOL_MODELS = {f"p{i}": 20 + i for i in range(8)}  # name -> add
POOL_BUDGET = 3  # with the default overflow of 1: at most 4 loaded, the concurrency of the calls below
POOL_CALLS = 120
POOL_TIMEOUT_S = 60.0


def cache_servers(root: Path, hosts: tuple[str, ...]) -> list[EmbeddedServer]:
    """Started servers on ``hosts``, each with its own cache over one repository of the ``POOL_MODELS``."""
    repo = root / "repo"
    if not repo.exists():
        for name, add in POOL_MODELS.items():
            (repo / name / "1").mkdir(parents=True)
            (repo / name / "1" / "model.py").write_text(SERVED)
            params = f'parameters {{ key: "add" value {{ string_value: "{add}" }} }}\n'
            config = f'name: "{name}"\nbackend: "python"\n{TENSORS}{SERVED_OUTPUT}{params}'
            (repo / name / "config.pbtxt").write_text(config)
    cache = write_cache_repository(root / "cache", CacheBudget(max_models=POOL_BUDGET, idle_s=IDLE_S))
    return cf.start_all(
        [
            EmbeddedServer([repo, cache], model_control="explicit", load_models=[CACHE_MODEL], host=host)
            for host in hosts
        ]
    )


@pytest.fixture(scope="module")
def cache_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EmbeddedServer]]:
    servers = cache_servers(tmp_path_factory.mktemp("cache_pods"), ("127.0.0.2", "127.0.0.3", "127.0.0.4"))
    try:
        yield servers
    finally:
        cf.stop_all(servers)


def loads_asked(url: str, before: Counts, at_least: int) -> int:
    """The requests the coordinator at ``url`` answered since ``before`` (its statistics), read again until
    there are ``at_least`` (bounded: Triton counts a request after answering it)."""
    return settled(lambda: counts(url, CACHE_MODEL) - before, lambda c: c.requests >= at_least).requests


def run_calls(face: str, client: Any, models: list[str], concurrency: int) -> list[object]:
    """Call ``i`` (request id ``call-i``) of ``models[i]``, ``concurrency`` at a time: its ``(y, the pid of
    the server that answered)``, or the exception it raised."""

    def answer(out: dict[str, np.ndarray]) -> tuple[float, int]:
        return float(out["y"][0]), int(out["server"][0])

    if face == "sync":

        def one(i: int) -> object:
            try:
                return answer(
                    client.infer(models[i], x(1.0), timeout_s=POOL_TIMEOUT_S, request_id=f"call-{i}")
                )
            except Exception as exc:  # every failure is the finding
                return exc

        with ThreadPoolExecutor(concurrency) as threads:
            return list(threads.map(one, range(len(models))))

    async def calls() -> list[object]:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int) -> object:
            async with gate:
                try:
                    return answer(
                        await client.client.infer(
                            models[i], x(1.0), timeout_s=POOL_TIMEOUT_S, request_id=f"call-{i}"
                        )
                    )
                except Exception as exc:
                    return exc

        return list(await asyncio.gather(*(one(i) for i in range(len(models)))))

    return list(client.run(calls()))


@pytest.mark.slow
@pytest.mark.parametrize("face", cf.FACES)
def test_a_pool_of_cache_servers_answers_every_call_after_a_miss_where_its_model_was_loaded(
    face: str, cache_pods: list[EmbeddedServer]
) -> None:
    """Three cache servers, each with room for 3 of 8 models, one client pool without placement, 120 calls
    4 at a time in random order: none fails. Each call's misses were loaded at the server that answered
    it: the answer names its server, and each server's coordinator counted (Triton's statistics) exactly
    the loads of the calls answered there: one per attempt after the first (each is the retry of a miss
    here: no server fails)."""
    urls = [s.grpc_url for s in cache_pods]
    url_of = {s.pid: s.grpc_url for s in cache_pods}
    before = {u: counts(u, CACHE_MODEL) for u in urls}
    rng = random.Random(f"pool-{face}")
    order = [rng.choice(list(POOL_MODELS)) for _ in range(POOL_CALLS)]
    events: list[ClientEvent] = []
    with cf.make_client(face, urls, hooks=[events.append]) as client:
        outcomes = run_calls(face, client, order, concurrency=4)
    wrong = [
        (m, o)
        for m, o in zip(order, outcomes, strict=True)
        if not isinstance(o, tuple) or o[0] != 1 + POOL_MODELS[m] or o[1] not in url_of
    ]
    assert wrong == []
    done = {e.request_id: e for e in events if e.kind == "request"}
    assert len(done) == POOL_CALLS and all(e.error is None for e in done.values())
    loads = dict.fromkeys(urls, 0)
    for i, (_, server) in enumerate(outcomes):  # type: ignore[misc]
        event = done[f"call-{i}"]
        assert event.endpoint == url_of[server]  # the client's account of the call is the server's
        loads[event.endpoint] += event.attempt - 1
    assert sum(loads.values()) >= len(POOL_MODELS)  # the cache did work: every model missed at least once
    assert {u: loads_asked(u, before[u], loads[u]) for u in urls} == loads


def unloaded(server: EmbeddedServer, model: str) -> None:
    """``model`` unloaded at ``server`` by hand (as another client may) and its unload over."""
    server.unload_model(model)
    gone = ("READY", "UNLOADING")
    assert settled(lambda: states(server).get(model), lambda state: state not in gone) not in gone


def test_infer_many_over_the_pool_loads_its_misses_and_answers_every_request(
    cache_pods: list[EmbeddedServer],
) -> None:
    """``infer_many`` over the whole pool with its model unloaded everywhere: every request is answered."""
    for pod in cache_pods:
        unloaded(pod, "p5")
    with Client([s.grpc_url for s in cache_pods], registry=CollectorRegistry()) as client:
        answers = client.infer_many("p5", [x(float(i)) for i in range(12)], concurrency=4, timeout_s=60)
    assert [float(a["y"][0]) for a in answers] == [i + POOL_MODELS["p5"] for i in range(12)]


def kill(server: EmbeddedServer) -> None:
    """SIGKILL the server and its stubs (a pod gone at once), and wait until it is gone."""
    assert server.pid is not None
    os.killpg(server.pid, signal.SIGKILL)
    assert settled(lambda: server.is_running, lambda running: not running)


def loaders(urls: list[str], before: dict[str, Counts]) -> list[str]:
    """The servers whose coordinator answered a request since ``before``."""
    return [u for u in urls if (counts(u, CACHE_MODEL) - before[u]).requests > 0]


class KillTheLoader:
    """A client hook: at the call's first retry, the server whose cache has just loaded the model (read
    from each server's statistics) is killed before the retry is sent; what it saw is kept."""

    def __init__(self, servers: list[EmbeddedServer]) -> None:
        self.servers = servers
        self.before = {s.grpc_url: counts(s.grpc_url, CACHE_MODEL) for s in servers}
        self.loader: str | None = None
        self.retried_at: str | None = None

    def __call__(self, event: ClientEvent) -> None:
        if event.kind != "retry" or self.loader is not None:
            return
        urls = [s.grpc_url for s in self.servers]
        (self.loader,) = settled(lambda: loaders(urls, self.before), bool)
        self.retried_at = event.endpoint
        kill(next(s for s in self.servers if s.grpc_url == self.loader))


@pytest.mark.slow
@pytest.mark.parametrize("face", cf.FACES)
def test_a_cache_server_dying_between_its_load_and_the_retry_costs_the_call_a_failover(
    face: str, tmp_path: Path
) -> None:
    """Two cache servers; the one whose cache loaded the model dies before the retry reaches it: the call is
    answered by the other (which misses, loads and answers in turn) within its deadline. With retries off,
    the same call fails with one Unavailable naming the dead server, within its deadline too."""
    servers = cache_servers(tmp_path, ("127.0.0.5", "127.0.0.6"))
    try:
        hook = KillTheLoader(servers)
        started = time.monotonic()
        with cf.make_client(face, [s.grpc_url for s in servers], hooks=[hook]) as client:
            assert infer(client, "p0", timeout_s=POOL_TIMEOUT_S) == 1 + POOL_MODELS["p0"]
        assert time.monotonic() - started < POOL_TIMEOUT_S
        assert hook.loader is not None and hook.retried_at == hook.loader  # the retry went to the loader
        (survivor,) = [s for s in servers if s.grpc_url != hook.loader]
        url = survivor.grpc_url
        assert settled(lambda: counts(url, "p0").requests, lambda n: n >= 1) == 1
        assert settled(lambda: loaders([url], hook.before), bool) == [url]  # it loaded p0 itself

        # retries off: the survivor alone, its cache loads p1, it dies before the retry
        hook = KillTheLoader([survivor])
        started = time.monotonic()
        with (
            cf.make_client(face, url, hooks=[hook], retry=RetryPolicy.none()) as client,
            pytest.raises(Unavailable, match=re.escape(url)),
        ):
            infer(client, "p1", timeout_s=POOL_TIMEOUT_S)
        assert time.monotonic() - started < POOL_TIMEOUT_S
        assert hook.loader == hook.retried_at == url
    finally:
        cf.stop_all(servers)
