"""Observe against real servers: `monitor` over two embedded Tritons, and SLO alerts that a real
Prometheus fires for a model made slow or failing while a healthy model stays quiet."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_tritonforge
from observe_fixtures import build_observe_repository, knob_input
from promserver import PrometheusServer
from triton_stats import settled
from tritonforge.client import Client, RetryPolicy
from tritonforge.error_accounting import ERROR_RESPONSES
from tritonforge.errors import ClientError
from tritonforge.observe import SUMMARY_FLAGS, MetricsError, Scrape, scrape, snapshot
from tritonforge.observe.slo import dashboard_queries, load_slo, write
from tritonforge.server import EmbeddedServer


@pytest.fixture(scope="module")
def observe_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_observe_repository(tmp_path_factory.mktemp("observe"))


@pytest.fixture(scope="module")
def servers(observe_repo: Path) -> Iterator[tuple[EmbeddedServer, EmbeddedServer]]:
    with (
        EmbeddedServer(observe_repo, extra_args=SUMMARY_FLAGS) as first,
        EmbeddedServer(observe_repo, extra_args=SUMMARY_FLAGS) as second,
    ):
        yield first, second


def _client(server: EmbeddedServer) -> Client:
    return Client(server.grpc_url, retry=RetryPolicy.none(), metrics=False)


def _requests(scraped: Scrape, model: str) -> float:
    """The requests Triton counted for ``model`` v1 (successes and failures) in ``scraped``."""
    counters = scraped.models.get((model, "1"), {})
    return counters.get("success", 0.0) + counters.get("failure", 0.0)


def test_monitor_counts_each_servers_requests_and_sums_them(
    servers: tuple[EmbeddedServer, EmbeddedServer],
) -> None:
    first, second = servers
    urls = [first.metrics_url, second.metrics_url]
    before = {s.url: s for s in (scrape(u) for u in urls)}
    with _client(first) as a, _client(second) as b:
        for _ in range(6):
            a.infer("steady", knob_input())
        for _ in range(4):
            b.infer("steady", knob_input())
        with pytest.raises(ClientError):
            a.infer("knob", knob_input(fail=True))
        # concurrent calls to the dynamic-batching mlp: the batcher groups them
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: b.infer("mlp", {"x": np.ones((1, 8), np.float32)}), range(32)))
    sent = {(urls[0], "steady"): 6, (urls[1], "steady"): 4, (urls[0], "knob"): 1, (urls[1], "mlp"): 32}
    settled(  # a backend answers before it counts: the snapshot reads once every request is counted
        lambda: {u: scrape(u) for u in urls},
        lambda now: all(_requests(now[u], m) - _requests(before[u], m) >= n for (u, m), n in sent.items()),
    )
    snap, _ = snapshot(urls, grpc_urls=[first.grpc_url, second.grpc_url], previous=before)
    seen = {(r.server, r.model): r for r in snap.rows}

    def served(url: str, model: str) -> float:
        return seen[(url, model)].requests_total - _requests(before[url], model)

    assert served(urls[0], "steady") == 6
    assert served(urls[1], "steady") == 4
    assert (
        seen[(urls[0], "knob")].failures_total - before[urls[0]].models[("knob", "1")].get("failure", 0) == 1
    )
    assert seen[(urls[0], "steady")].requests_per_s > 0
    assert seen[(urls[0], "steady")].p99_ms is not None  # summaries are on
    total = next(t for t in snap.totals if t.model == "steady")
    assert total.requests_per_s == pytest.approx(
        seen[(urls[0], "steady")].requests_per_s + seen[(urls[1], "steady")].requests_per_s
    )
    mlp = seen[(urls[1], "mlp")]
    assert mlp.batch_size is not None and mlp.batch_size > 1.0
    assert max(snap.batch_sizes[urls[1]]["mlp:1"]) > 1  # the statistics API saw batches of several


def test_monitor_once_json_lists_every_model_of_both_servers(
    servers: tuple[EmbeddedServer, EmbeddedServer],
) -> None:
    first, second = servers
    done = run_tritonforge(
        "monitor",
        "--metrics-url",
        first.metrics_url,
        "--metrics-url",
        second.metrics_url,
        "--once",
        "--json",
        "--interval-s",
        "0.3",
        "--price-per-hour",
        "3.6",
        timeout=120,
        columns=None,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert {m["server"] for m in data["models"]} == {first.metrics_url, second.metrics_url}
    assert {(m["server"], m["model"]) for m in data["models"]} >= {
        (s.metrics_url, model) for s in servers for model in ("knob", "steady", "mlp")
    }
    assert {t["model"] for t in data["totals"]} == {"knob", "steady", "mlp", "knob_routed"}
    assert data["summaries"] is True


def test_monitor_table_names_each_server_and_model_unbroken_when_piped(
    servers: tuple[EmbeddedServer, EmbeddedServer],
) -> None:
    first, second = servers
    done = run_tritonforge(
        "monitor",
        "--metrics-url",
        first.metrics_url,
        "--metrics-url",
        second.metrics_url,
        "--once",
        "--interval-s",
        "0.3",
        timeout=120,
        columns=None,
    )
    assert done.returncode == 0, done.stderr
    for server in servers:
        assert server.metrics_url.removeprefix("http://").removesuffix("/metrics") in done.stdout
    assert "steady" in done.stdout and "knob" in done.stdout


def test_monitor_match_sort_and_limit_keep_rows_and_totals_to_the_same_models(
    servers: tuple[EmbeddedServer, EmbeddedServer],
) -> None:
    from tritonforge.observe.monitor import select

    first, second = servers
    urls = [first.metrics_url, second.metrics_url]
    before = {s.url: s for s in (scrape(u) for u in urls)}
    with _client(first) as a, _client(second) as b:
        for _ in range(5):
            a.infer("steady", knob_input())
            b.infer("steady", knob_input())
        a.infer("knob", knob_input())
    snap, _ = snapshot(urls, grpc_urls=[first.grpc_url, second.grpc_url], previous=before)
    busiest = select(snap, sort="requests", limit=1)
    assert [t.model for t in busiest.totals] == ["steady"]
    kept = [key for per in busiest.batch_sizes.values() for key in per]  # the batch sizes follow the models
    assert kept and {key.partition(":")[0] for key in kept} == {"steady"}
    assert {(r.server, r.model) for r in busiest.rows} == {(u, "steady") for u in urls}
    assert busiest.hidden_models == len(snap.totals) - 1 == busiest.model_count - 1
    knobs = select(snap, match=["knob*"])
    assert {t.model for t in knobs.totals} == {"knob", "knob_routed"}
    assert {r.model for r in knobs.rows} == {"knob", "knob_routed"}
    with pytest.raises(ValueError, match="sort by one of"):
        select(snap, sort="colour")

    base = ("monitor", "--metrics-url", first.metrics_url, "--metrics-url", second.metrics_url, "--once")
    done = run_tritonforge(*base, "--interval-s", "0.3", "--match", "k*", "--json", timeout=120, columns=None)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert (
        {t["model"] for t in data["totals"]}
        == {m["model"] for m in data["models"]}
        == {"knob", "knob_routed"}
    )
    assert data["model_count"] == 4 and data["hidden_models"] == 2
    done = run_tritonforge(*base, "--interval-s", "0.3", "--limit", "1", timeout=120, columns=None)
    assert done.returncode == 0, done.stderr
    assert "3 of 4 models hidden" in done.stdout and "knob " in done.stdout and "steady" not in done.stdout


def test_monitor_exits_1_with_a_one_line_error_when_a_server_is_unreachable() -> None:
    from tritonforge.server import free_port

    done = run_tritonforge(
        "monitor", "--metrics-url", f"127.0.0.1:{free_port()}", "--once", timeout=60, columns=None
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "cannot read Triton's metrics" in done.stderr
    with pytest.raises(MetricsError, match="metrics port"):
        scrape(f"127.0.0.1:{free_port()}")


LIVE_SLO = """
window: 5s
for: 2s
models:
  knob:   {p99_latency_ms: 1000, error_rate: 0.2}
  steady: {p99_latency_ms: 1000, error_rate: 0.2}
  knob_routed: {error_rate: 0.2}
"""


def _wait_alert(prom: PrometheusServer, name: str, model: str, timeout_s: float = 90.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alerts = prom.alerts()
        if any(
            a["labels"]["alertname"] == name and a["labels"]["model"] == model and a["state"] == "firing"
            for a in alerts
        ):
            return alerts
        time.sleep(0.5)
    raise AssertionError(f"{name} for {model} never fired: {prom.alerts()}\n{prom.log()[-1500:]}")


@pytest.mark.slow
def test_prometheus_fires_the_slo_alerts_of_a_slow_then_failing_model_and_not_of_a_healthy_one(
    servers: tuple[EmbeddedServer, EmbeddedServer], tmp_path: Path, prometheus_bin: Path
) -> None:
    server = servers[0]
    slo = tmp_path / "slo.yaml"
    slo.write_text(LIVE_SLO)
    spec = load_slo(slo)
    written = write(spec, tmp_path / "out")
    target = server.metrics_url.removeprefix("http://").split("/")[0]
    stop = threading.Event()
    # slow: far above the objective, so a busy CI machine's hiccups on the healthy model stay below it
    mode = {"knob": knob_input(delay_ms=1500)}

    def traffic() -> None:
        with _client(server) as client:
            while not stop.is_set():
                client.infer("steady", knob_input())
                with contextlib.suppress(ClientError):
                    client.infer("knob", mode["knob"])
                if "routed" in mode:
                    with contextlib.suppress(ClientError):
                        client.infer("knob_routed", mode["routed"])
                time.sleep(0.05)

    with PrometheusServer({"triton": [target]}, scrape_interval_s=0.5, rule_files=[written["rules"]]) as prom:
        prom.wait_for_targets()
        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            alerts = _wait_alert(prom, "TritonModelP99LatencyHigh", "knob")
            assert not [a for a in alerts if a["labels"]["model"] == "steady"], alerts
            mode["knob"] = knob_input(fail=True)
            alerts = _wait_alert(prom, "TritonModelErrorRateHigh", "knob")
            assert not [a for a in alerts if a["labels"]["model"] == "steady"], alerts
            # a pipeline's Python step (the compiled router) answering errors fires its alert too
            mode["routed"] = knob_input(fail=True)
            _wait_alert(prom, "TritonModelErrorRateHigh", "knob_routed")
            # the dashboard's queries are valid PromQL that Prometheus answers for these series
            for model in ("knob", "steady"):
                for name, expr in dashboard_queries(spec, model, rate_window="5s").items():
                    assert isinstance(prom.query(expr), list), name
            assert prom.values(dashboard_queries(spec, "steady", rate_window="5s")["success"])
        finally:
            stop.set()
            thread.join(timeout=30)


def _counts(server: EmbeddedServer, model: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.metrics_url, timeout=10) as answer:
        text = answer.read().decode()
    out = {"nv_inference_request_success": 0.0, "nv_inference_request_failure": 0.0, ERROR_RESPONSES: 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.name.removesuffix("_total") in {
                k.removesuffix("_total") for k in out
            }:
                key = next(k for k in out if k.removesuffix("_total") == sample.name.removesuffix("_total"))
                out[key] += sample.value
    return out


def test_every_error_a_python_step_answers_is_counted_once_alone_or_beside_successes(
    servers: tuple[EmbeddedServer, EmbeddedServer],
) -> None:
    server = servers[1]
    before = _counts(server, "knob_routed")
    failed = 0
    with _client(server) as client:
        for _ in range(3):  # alone in their execute: answered as errors, never raised
            with pytest.raises(ClientError, match="failing on purpose"):
                client.infer("knob_routed", knob_input(fail=True))
        failed += 3
        # Triton may answer a request before it counts it: read until the count settles (bounded)
        deadline = time.monotonic() + 10
        alone = _counts(server, "knob_routed")
        while (
            alone["nv_inference_request_success"] - before["nv_inference_request_success"] < 3
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
            alone = _counts(server, "knob_routed")
        # Triton counts an error response as a success; our counter has each
        assert alone["nv_inference_request_success"] - before["nv_inference_request_success"] == 3
        assert alone["nv_inference_request_failure"] == before["nv_inference_request_failure"]
        assert alone[ERROR_RESPONSES] - before[ERROR_RESPONSES] == 3

        def call(i: int) -> bool:
            try:
                client.infer("knob_routed", knob_input(fail=i % 2 == 0, delay_ms=0 if i % 2 == 0 else 30))
                return True
            except ClientError as exc:
                # the step's own reason, without the wrapper and traceback Triton gives a raise
                assert "failing on purpose" in str(exc) and "At:" not in str(exc), exc
                return False

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(call, range(64)))
    failed += outcomes.count(False)
    assert outcomes.count(False) == 32  # a bad request never fails a good one batched with it
    deadline = time.monotonic() + 10  # as above: until Triton has counted every answered request
    after = _counts(server, "knob_routed")
    while (
        sum(after[k] - before[k] for k in ("nv_inference_request_success", "nv_inference_request_failure"))
        < 3 + 64
        and time.monotonic() < deadline
    ):
        time.sleep(0.1)
        after = _counts(server, "knob_routed")
    counted = sum(after[k] - before[k] for k in ("nv_inference_request_failure", ERROR_RESPONSES))
    assert counted == failed, (before, after)
    total = sum(
        after[k] - before[k] for k in ("nv_inference_request_success", "nv_inference_request_failure")
    )
    assert total == 3 + 64


GPU_TEXT = """# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-a"} 0.5
nv_gpu_utilization{gpu_uuid="GPU-b"} 0.3
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-a"} 2147483648
nv_gpu_memory_used_bytes{gpu_uuid="GPU-b"} 1073741824
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="m",version="1"} SUCCESS
# TYPE nv_inference_request_failure counter
nv_inference_request_failure{model="m",reason="BACKEND",version="1"} 2
nv_inference_request_failure{model="m",reason="REJECTED",version="1"} 1
"""


def test_parse_metrics_averages_gpu_use_sums_failure_reasons_and_survives_a_restart() -> None:
    from tritonforge.observe import model_rates, parse_metrics

    before = parse_metrics(GPU_TEXT.replace("SUCCESS", "100"), url="u", at_s=0.0)
    assert before.gpus == 2 and before.server["gpu_utilization"] == pytest.approx(0.4)
    assert before.server["gpu_memory_used_bytes"] == 3 * 2**30
    assert before.models[("m", "1")]["failure"] == 3
    # the server restarted: counters start again from zero, the rate counts from there
    after = parse_metrics(GPU_TEXT.replace("SUCCESS", "7"), url="u", at_s=2.0)
    (rates,) = model_rates(before, after)
    assert rates.requests_per_s == pytest.approx(7 / 2.0)  # not (7 - 100) / 2
    assert rates.failures_per_s == 0


def test_parse_metrics_raises_metrics_error_for_text_that_is_not_prometheus() -> None:
    from tritonforge.observe import parse_metrics

    with pytest.raises(MetricsError, match="not Prometheus exposition format"):
        parse_metrics('nv_inference_count{model="m" 1\n', url="http://x/metrics")


def test_every_generated_python_model_uses_the_one_error_accounting_shipped_beside_it() -> None:
    from tritonforge.ensemble.blocks import model_file
    from tritonforge.error_accounting import SHIPPED_AS
    from tritonforge.rollout.twin import SPLITTER

    files = [model_file(k) for k in ("router", "combiner", "impute", "mean_pooling", "tokenizer")]
    for f in [*files, SPLITTER]:
        text = f.read_text()
        assert f"from {SHIPPED_AS} import error_counter, settle_errors" in text, f
        assert "self.error_counter = error_counter(pb_utils, args)" in text, f
        assert "return settle_errors(pb_utils, " in text, f
        assert "ERROR_RESPONSES =" not in text and "def _settle" not in text, f"{f} has its own copy"


# Triton's GPU gauges exactly as a GPU server exports them (one GPU per gpu_uuid label)
_TRITON_GPU_TEXT = """\
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-c06bbf33-c250-ca45-579b-19134b518844"} 0.730000
nv_gpu_utilization{gpu_uuid="GPU-1b2e7f0a-9d3c-4e8b-a1f2-0c9d8e7f6a5b"} 0.250000
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-c06bbf33-c250-ca45-579b-19134b518844"} 42949672960.000000
nv_gpu_memory_total_bytes{gpu_uuid="GPU-1b2e7f0a-9d3c-4e8b-a1f2-0c9d8e7f6a5b"} 42949672960.000000
# HELP nv_gpu_memory_used_bytes GPU used memory, in bytes
# TYPE nv_gpu_memory_used_bytes gauge
nv_gpu_memory_used_bytes{gpu_uuid="GPU-c06bbf33-c250-ca45-579b-19134b518844"} 33763098624.000000
nv_gpu_memory_used_bytes{gpu_uuid="GPU-1b2e7f0a-9d3c-4e8b-a1f2-0c9d8e7f6a5b"} 10737418240.000000
# HELP nv_gpu_power_usage GPU power usage in watts
# TYPE nv_gpu_power_usage gauge
nv_gpu_power_usage{gpu_uuid="GPU-c06bbf33-c250-ca45-579b-19134b518844"} 51.091000
nv_gpu_power_usage{gpu_uuid="GPU-1b2e7f0a-9d3c-4e8b-a1f2-0c9d8e7f6a5b"} 40.000000
"""


def test_monitor_gpu_reads_each_gpu_of_tritons_gauges_by_gpu_uuid() -> None:
    from rich.console import Console

    from tritonforge.observe.metrics import parse_metrics
    from tritonforge.observe.monitor import Snapshot, render_gpus

    url = "http://gpu-host:8002/metrics"
    reading = parse_metrics(_TRITON_GPU_TEXT, url=url)
    first, second = "GPU-c06bbf33-c250-ca45-579b-19134b518844", "GPU-1b2e7f0a-9d3c-4e8b-a1f2-0c9d8e7f6a5b"
    assert reading.devices == {
        second: {
            "utilization": 0.25,
            "memory_total_bytes": 42949672960.0,
            "memory_used_bytes": 10737418240.0,
        },
        first: {"utilization": 0.73, "memory_total_bytes": 42949672960.0, "memory_used_bytes": 33763098624.0},
    }
    assert reading.gpus == 2 and reading.server["gpu_utilization"] == pytest.approx(0.49)
    snap = Snapshot(1.0, [], [], {url: reading.server}, {}, {}, False, {url: reading.devices})
    data = snap.as_dict()
    assert data["gpus"][url][1] == {"gpu_uuid": first, **reading.devices[first]}
    assert data["gpu_note"] == {}
    console = Console(width=200, record=True, force_terminal=False)
    console.print(render_gpus(snap))
    text = console.export_text()
    assert first in text and second in text  # each GPU whole, by its uuid
    assert "73%" in text and "31.44 GiB" in text and "40.00 GiB" in text and "79%" in text


def test_monitor_gpu_on_a_server_without_a_gpu_says_no_gpu_metrics(
    servers: tuple[EmbeddedServer, EmbeddedServer],
) -> None:
    first, _ = servers
    base = ("monitor", "--metrics-url", first.metrics_url, "--once", "--interval-s", "0.3", "--gpu")
    done = run_tritonforge(*base, timeout=120, columns=None)
    assert done.returncode == 0, done.stderr
    assert "no GPU metrics" in done.stdout and "knob" in done.stdout
    done = run_tritonforge(*base, "--json", timeout=120, columns=None)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["gpus"] == {first.metrics_url: []}
    assert data["gpu_note"] == {first.metrics_url: "no GPU metrics"}
    done = run_tritonforge(*base[:-1], "--json", timeout=120, columns=None)
    assert "gpus" not in json.loads(done.stdout)  # only when asked
