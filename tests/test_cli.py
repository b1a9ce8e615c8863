"""The `tritonforge` command, run as users run it (a real subprocess)."""

from __future__ import annotations

import re
import signal
import time

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

import tiny_models
from cli_runner import run_tritonforge as run_cli
from cli_runner import tritonforge_process
from conftest import still_running, triton_infer
from triton_stats import settled


def test_add_model_then_validate_live_passes(tmp_path):
    repo = tmp_path / "repo"
    onnx_file = tiny_models.mlp_onnx(tmp_path / "mlp.onnx")
    added = run_cli(
        "add-model", str(repo), "mlp", str(onnx_file), "--max-batch-size", "16", "--instances", "2"
    )
    assert added.returncode == 0, added.stderr
    assert "max_batch_size: 16" in added.stdout and "count: 2" in added.stdout
    checked = run_cli("validate", str(repo), "--live")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "offline checks passed" in checked.stdout
    assert re.search(r"mlp\s+│\s+yes\s+│\s+yes", checked.stdout), checked.stdout


def test_add_model_fails_with_a_clear_message_when_the_file_is_missing(tmp_path):
    result = run_cli("add-model", str(tmp_path / "repo"), "mlp", str(tmp_path / "missing.onnx"))
    assert result.returncode == 1
    assert "missing.onnx does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_validate_exits_1_and_lists_the_problem_when_a_model_file_is_gone(tmp_path):
    repo = tmp_path / "repo"
    assert (
        run_cli("add-model", str(repo), "mlp", str(tiny_models.mlp_onnx(tmp_path / "m.onnx"))).returncode == 0
    )
    (repo / "mlp" / "1" / "model.onnx").unlink()
    result = run_cli("validate", str(repo))
    assert result.returncode == 1
    assert "missing model file model.onnx" in result.stdout


def test_serve_answers_until_interrupted_and_leaves_nothing_running(tmp_path):
    repo = tmp_path / "repo"
    assert (
        run_cli("add-model", str(repo), "mlp", str(tiny_models.mlp_onnx(tmp_path / "m.onnx"))).returncode == 0
    )
    with tritonforge_process("serve", str(repo)) as process:
        url = None
        deadline = time.monotonic() + 120
        assert process.stdout is not None
        while url is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            match = re.match(r"gRPC\s+(\S+)", line)
            url = match.group(1) if match else None
        assert url, "serve never printed its gRPC address"
        descendants = psutil.Process(process.pid).children(recursive=True)
        client = grpcclient.InferenceServerClient(url)
        try:
            out = triton_infer(client, "mlp", {"x": np.ones((1, 8), dtype=np.float32)})
        finally:
            client.close()
        assert out["probs"].shape == (1, 3)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert settled(lambda: still_running(descendants), lambda left: not left, timeout_s=10) == []


@pytest.mark.slow
def test_demo_runs_the_pipelines_and_both_frameworks_on_the_example_repository(example_repo):
    result = run_cli("demo", "--no-build", "--repo", str(example_repo), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # text_embedding: the nearest sentence to the weather query is the rain one, server == in-process
    assert re.search(r"will it rain on Saturday\?\s+│\s+Heavy rain is expected", out), out
    cosine = float(re.search(r"min cosine ([\d.]+)", out).group(1))
    assert cosine >= 0.999
    # digits_vote: the vote is at least as accurate as its weakest member
    members = [float(a) for a in re.findall(r"│ (?:logreg|mlp|random_forest)\s+│\s+([\d.]+)", out)]
    vote = float(re.search(r"majority vote\s+│\s+([\d.]+)", out).group(1))
    assert len(members) == 3 and vote >= min(members)
    # digits_routed answered with its primary unloaded (the fallback took over)
    assert re.search(r"digits_logreg unloaded \(forced failure\): accuracy 0\.9\d+", out), out
    # one model from two frameworks, equal accuracy through Triton and in-process
    rows = re.findall(r"(digits_mlp_\w+)\s+│\s+(\d+)\s+│\s+([\d.]+)\s+│\s+([\d.]+)", out)
    assert {r[0] for r in rows} == {"digits_mlp_onnx", "digits_mlp_torch"}, out
    for _, requests, acc_triton, acc_local in rows:
        assert int(requests) == 450
        assert acc_triton == acc_local and float(acc_triton) > 0.9
