"""Python models tritonforge runs or generates answer failures as error responses and never raise from
``execute``, through the real server: the embedded onnxruntime backend on an input that fails at run time,
a pipeline block (mean pooling) and a compiled router, each failing every call under concurrent load,
then unloaded and loaded again with nothing left UNLOADING; and those error responses are failures in
``monitor``, in the SLO error-rate rule and in the KServe canary query a real Prometheus evaluates."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

import tiny_models
from callers import Callers
from cli_runner import run_tritonforge
from promserver import PrometheusServer
from tritonforge.deploy.canary import step_queries
from tritonforge.deploy.spec import DeploySpec
from tritonforge.ensemble import compile_specs
from tritonforge.ensemble.blocks import block_model
from tritonforge.observe import scrape
from tritonforge.observe.slo import load_slo, write
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

# what makes each model fail, and the reason its callers must see
FAILING = {
    # ids past the lookup table's 10 rows: onnxruntime fails at run time
    "lookup": ({"ids": np.array([[42, 1]], np.int64)}, "indices element out of data bounds"),
    # a mask shorter than the token embeddings: the block refuses it
    "pool": (
        {"TOKEN_EMBEDDINGS": np.ones((1, 5, 4), np.float32), "ATTENTION_MASK": np.ones((1, 3), np.int64)},
        "disagree on batch and sequence dims",
    ),
    # the router's only member fails
    "lookup_routed": ({"ids": np.array([[42, 1]], np.int64)}, "indices element out of data bounds"),
}
GOOD = {"ids": np.array([[1, 2]], np.int64)}
RELOADS = 4
DEADLINE_S = 20.0

ROUTED_SPEC = """
name: lookup_routed
max_batch_size: 16
inputs:
  - {name: ids, dtype: INT64, dims: [-1]}
outputs: [vec]
route:
  - model: lookup
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("errors")
    repo, work = root / "repo", root / "work"
    work.mkdir()
    tiny_models.add_lookup(repo, work)
    pool = block_model("pool", "mean_pooling", {"dim": 4})
    add_model(repo, "pool", pool.source, pool.config)
    spec = work / "lookup_routed.yaml"
    spec.write_text(ROUTED_SPEC)
    compile_specs([spec], repo)
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(repo, model_control="explicit", load_models=list(FAILING)) as running:
        yield running


def _inputs(arrays: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    out = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(
            name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32"
        )
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def _states(server: EmbeddedServer, model: str) -> dict[str, str]:
    return {
        str(m.get("version")): m.get("state", "") for m in server.repository_index() if m["name"] == model
    }


def _counted(url: str, model: str) -> tuple[float, float]:
    """Triton's requests and our failures (Triton's plus the error responses) of ``model`` v1 now."""
    counters = scrape(url).models.get((model, "1"), {})
    requests = counters.get("success", 0.0) + counters.get("failure", 0.0)
    return requests, counters.get("failure", 0.0) + counters.get("error_responses", 0.0)


# first in the module: Triton's counters start again when a model is unloaded and loaded, ours go on, and
# monitor's cumulative totals are exact only while both have counted the same requests (its rates always)
def test_monitor_json_counts_every_error_response_as_a_failure(server: EmbeddedServer) -> None:
    before = {model: _counted(server.metrics_url, model) for model in FAILING}
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        for model, (arrays, reason) in FAILING.items():
            for _ in range(5):
                with pytest.raises(Exception, match=reason):
                    client.infer(model, _inputs(arrays))
        for model in ("lookup", "lookup_routed"):
            for _ in range(3):
                client.infer(model, _inputs(GOOD))
    sent = {"lookup": 2 * (5 + 3), "pool": 5, "lookup_routed": 5 + 3}  # the router calls lookup too
    failed = {"lookup": 5 + 5, "pool": 5, "lookup_routed": 5}
    deadline = time.monotonic() + 10  # a backend sends its answers before it counts them
    while time.monotonic() < deadline and any(
        _counted(server.metrics_url, m)[0] - before[m][0] < sent[m] for m in FAILING
    ):
        time.sleep(0.1)

    stop = threading.Event()

    def failing() -> None:  # traffic during monitor's interval: its rates
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            while not stop.is_set():
                with contextlib.suppress(Exception):
                    client.infer("pool", _inputs(FAILING["pool"][0]))
                time.sleep(0.01)

    # the totals before the traffic, the rates with it
    done = run_tritonforge(
        "monitor", "--metrics-url", server.metrics_url, "--once", "--json", "--interval-s", "0.3", timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = {m["model"]: m for m in json.loads(done.stdout)["models"]}
    for model in FAILING:
        assert rows[model]["requests_total"] - before[model][0] == sent[model], model
        assert rows[model]["failures_total"] - before[model][1] == failed[model], model
    thread = threading.Thread(target=failing, daemon=True)
    thread.start()
    try:
        done = run_tritonforge(
            "monitor",
            "--metrics-url",
            server.metrics_url,
            "--once",
            "--json",
            "--interval-s",
            "2",
            timeout=120,
        )
    finally:
        stop.set()
        thread.join(30)
    assert done.returncode == 0, done.stderr
    pool = next(m for m in json.loads(done.stdout)["models"] if m["model"] == "pool")
    # every call failed (the two counters are read at one scrape, a request apart at most at its edges)
    assert pool["failures_per_s"] > 0 and pool["failures_per_s"] == pytest.approx(
        pool["requests_per_s"], rel=0.1
    )
    done = run_tritonforge(
        "monitor",
        "--metrics-url",
        server.metrics_url,
        "--once",
        "--match",
        "pool",
        "--sort",
        "failures",
        timeout=120,
        columns=None,
    )
    assert done.returncode == 0 and "pool" in done.stdout, done.stderr


@pytest.mark.parametrize("model", list(FAILING))
def test_a_model_failing_every_call_under_load_unloads_and_loads_again_leaving_nothing_unloading(
    server: EmbeddedServer, model: str
) -> None:
    arrays, reason = FAILING[model]
    stuck: list[dict[str, str]] = []
    with Callers(server.grpc_url, model, lambda: (_inputs(arrays), None), deadline_s=DEADLINE_S) as callers:
        for _ in range(RELOADS):
            time.sleep(1.0)  # calls in flight, each failing
            server.unload_model(model)
            deadline = time.monotonic() + 30
            while "UNLOADING" in _states(server, model).values() and time.monotonic() < deadline:
                time.sleep(0.25)
            if "UNLOADING" in _states(server, model).values():
                stuck.append(_states(server, model))
            server.load_model(model)
        time.sleep(1.0)
    assert not stuck, f"{model} left UNLOADING after an unload: {stuck}\n{server.log_tail(40)}"
    assert callers.ok == 0
    # every call was answered (none waited for its deadline: a lost request would), with the model's own
    # reason, or refused while the model was unloaded
    answered = [f for f in callers.failures if reason in f]
    refused = [f for f in callers.failures if reason not in f]
    assert len(answered) > 20, callers.failures[:5]
    assert all("DEADLINE" not in f.upper() for f in callers.failures), callers.failures
    assert all("[StatusCode.NOT_FOUND]" in f or "[StatusCode.UNAVAILABLE]" in f for f in refused), refused[:5]
    # the message is the model's own, without Triton's wrapper of a raise or a traceback
    assert not [f for f in answered if "Failed to process the request" in f or "\nAt:\n" in f], answered[:3]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        assert client.is_server_ready()
        assert client.is_model_ready(model)
        with pytest.raises(Exception, match=reason):
            client.infer(model, _inputs(arrays))


class NamespacedPrometheus(PrometheusServer):
    """Its targets labelled ``namespace="prod"``, as a Kubernetes scrape labels a pod's series."""

    def config(self) -> dict:
        config = super().config()
        for job in config["scrape_configs"]:
            job["static_configs"][0]["labels"] = {"namespace": "prod"}
        return config


SLO = """
window: 5s
for: 2s
models:
  lookup: {error_rate: 0.2}
  pool: {error_rate: 0.2}
  lookup_routed: {error_rate: 0.2}
"""


@pytest.mark.slow
def test_prometheus_counts_error_responses_in_the_slo_error_rate_and_fires_its_alert(
    server: EmbeddedServer, tmp_path: Path, prometheus_bin: Path
) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text(SLO)
    written = write(load_slo(slo), tmp_path / "out")
    target = server.metrics_url.removeprefix("http://").split("/")[0]
    stop = threading.Event()

    def traffic() -> None:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            while not stop.is_set():
                for model, (arrays, _) in FAILING.items():
                    with contextlib.suppress(Exception):
                        client.infer(model, _inputs(arrays))
                time.sleep(0.05)

    with NamespacedPrometheus(
        {"triton": [target]}, scrape_interval_s=0.5, rule_files=[written["rules"]]
    ) as prom:
        prom.wait_for_targets()
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 90
            firing: set[str] = set()
            while time.monotonic() < deadline and firing != set(FAILING):
                firing = {
                    a["labels"]["model"]
                    for a in prom.alerts()
                    if a["labels"]["alertname"] == "TritonModelErrorRateHigh" and a["state"] == "firing"
                }
                time.sleep(0.5)
            assert firing == set(FAILING), f"{prom.alerts()}\n{prom.log()[-1500:]}"
            # every call fails: the recorded error ratio is 1 (Triton's own counter says 0)
            ratios = {
                row["metric"]["model"]: float(row["value"][1])
                for row in prom.query("model:tritonforge_error_ratio:rate5s")
            }
            assert all(ratios[model] > 0.9 for model in FAILING), ratios
            triton_alone = prom.query('sum by (model) (rate(nv_inference_request_failure{model="pool"}[5s]))')
            assert all(float(r["value"][1]) == 0 for r in triton_alone)
            # the KServe canary plan's error rate of each version, as `deploy` writes it
            canary = step_queries(DeploySpec().replace(models=tuple(FAILING)), "prod")["error_rate"]
            rates = {row["metric"]["model"]: float(row["value"][1]) for row in prom.query(canary)}
            assert set(rates) == set(FAILING) and all(rate > 0.9 for rate in rates.values()), rates
        finally:
            stop.set()
            thread.join(timeout=30)
    with urllib.request.urlopen(server.metrics_url, timeout=10) as answer:
        assert "tritonforge_error_responses_total" in answer.read().decode()
