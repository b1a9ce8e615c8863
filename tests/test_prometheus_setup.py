"""The test setup's real Prometheus: installed when missing, scraping a real Triton server."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from promserver import PrometheusServer, promtool
from tritonforge.server import EmbeddedServer


def test_promtool_is_the_real_one(prometheus_bin: Path) -> None:
    done = promtool("--version")
    assert done.returncode == 0, done.stderr
    assert "promtool, version 2." in done.stdout + done.stderr


def test_prometheus_scrapes_an_embedded_server_and_counts_its_inferences(
    server: EmbeddedServer, prometheus_bin: Path
) -> None:
    import tritonclient.grpc as grpcclient

    from conftest import triton_infer

    target = server.metrics_url.removeprefix("http://").split("/")[0]
    with PrometheusServer({"triton": [target]}, scrape_interval_s=0.5) as prom:
        prom.wait_for_targets()
        query = 'sum(nv_inference_request_success{model="mlp"})'
        before = sum(prom.values(query).values())
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for _ in range(5):
                triton_infer(client, "mlp", {"x": np.zeros((1, 8), np.float32)})
        finally:
            client.close()
        deadline = time.monotonic() + 20
        after = before
        while time.monotonic() < deadline and after < before + 5:
            time.sleep(0.5)
            after = sum(prom.values(query).values())
        assert after >= before + 5, prom.log()[-1500:]
