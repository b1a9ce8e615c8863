"""The model cache through the real server: a model loads on its first request, the least recently used
idle ones are unloaded under the budget, pinned and busy models stay, ensembles load whole, the deadline
bounds the wait, and two clients racing over more models than fit never see a failed request."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from cli_runner import run_tritonforge
from tritonforge.cache import CACHE_MODEL, CacheBudget, parse_size, write_cache_repository
from tritonforge.client import Client
from tritonforge.client._misses import CACHE_MODEL as CLIENT_CACHE_MODEL
from tritonforge.errors import DeadlineExceeded, ModelNotFoundError
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
    import asyncio

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
    import re
    import signal

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
