"""Canary rollouts through the real server, under steady concurrent load from apps that only know the
model's name: a good candidate goes to 100 %, a wrong and a slow one are rolled back at the first step,
a killed controller is resumed — each with zero failed requests and the verdicts in the audit log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from rollout_models import mlp

from tritonforge.registry import audit_log, read_manifest, served_versions
from tritonforge.repository import add_model
from tritonforge.repository.writer import load_config, versions
from tritonforge.rollout import Rollout, RolloutError, Thresholds
from tritonforge.rollout.state import load_state, state_paths
from tritonforge.server import EmbeddedServer

pytestmark = pytest.mark.slow

MODELS = ("good", "wrong", "slow", "resumed", "aborted")
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rollout") / "repo"
    files = tmp_path_factory.mktemp("rollout_files")
    stable = mlp(files / "stable.onnx")
    candidates = {
        "good": mlp(files / "good.onnx"),  # the same function, a new file
        "wrong": mlp(files / "wrong.onnx", seed=8),
        "slow": mlp(files / "slow.onnx", slow_matmuls=40),
        "resumed": mlp(files / "good2.onnx"),
        "aborted": mlp(files / "good3.onnx"),
    }
    from tritonforge.registry import promote

    for name in MODELS:
        add_model(root, name, stable, max_batch_size=16)
        add_model(root, name, candidates[name], max_batch_size=16)
        promote(root, name, 1, reason="initial")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(repo, model_control="explicit", load_models=list(MODELS)) as running:
        yield running


class Load:
    """Apps calling the model by name from a few threads (deadline per call), counting every failure."""

    def __init__(self, url: str, model: str, threads: int = 3) -> None:
        self.url, self.model = url, model
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        rng = np.random.default_rng()
        try:
            while not self.stop.is_set():
                x = rng.random((2, 8), dtype=np.float32)
                inp = grpcclient.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                try:
                    result = client.infer(self.model, [inp], client_timeout=DEADLINE_S)
                    assert result.as_numpy("probs").shape == (2, 3)
                    with self.lock:
                        self.ok += 1
                except Exception as exc:  # noqa: BLE001 - every failure is what the test counts
                    with self.lock:
                        self.failures.append(repr(exc)[:300])
                time.sleep(0.005)
        finally:
            client.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)
        self.stop.set()
        for t in self.threads:
            t.join(30)


def _limits(**changes: object) -> Thresholds:
    base = dict(max_error_rate=0.0, max_p99_ms=None, min_agreement=0.99, min_requests=15)
    base.update(changes)
    return Thresholds(**base)  # type: ignore[arg-type]


def _serves(repo: Path, model: str) -> list[int]:
    return served_versions(load_config(repo / model), versions(repo / model))


def _events(repo: Path, model: str, action: str) -> list[dict]:
    return [e for e in audit_log(repo) if e.get("model") == model and e.get("action") == action]


def _left_clean(repo: Path, server: EmbeddedServer, model: str) -> None:
    assert load_state(repo, model) is None
    assert not (repo / f"{model}__rollout").exists()
    assert not state_paths(repo, model).stats_files()
    assert not [p for p in repo.iterdir() if p.is_dir() and p.name.startswith(".")]
    assert not any((repo / model).glob("*/model.py"))
    assert "tritonforge_rollout" not in load_config(repo / model).parameters


def test_rollout_moves_a_good_candidate_to_100_percent_with_zero_failed_requests(repo, server):
    with Load(server.grpc_url, "good") as load:
        outcome = Rollout(repo, server.grpc_url, "good").start(
            2, steps=[10, 50, 100], hold_s=1.5, thresholds=_limits(), reason="good candidate")
    assert outcome.result == "promoted", outcome
    assert load.failures == [] and load.ok > 100
    assert _serves(repo, "good") == [2]
    assert server.is_model_ready("good", 2) and not server.is_model_ready("good", 1)
    steps = _events(repo, "good", "rollout-step")
    assert [e["verdict"] for e in steps] == ["pass", "pass", "pass"]
    assert all(e["evidence"]["agreement"] == 1.0 for e in steps)
    assert all(e["evidence"]["candidate_calls"] >= 15 for e in steps)
    assert _events(repo, "good", "promote")[-1]["to"] == [2]
    _left_clean(repo, server, "good")


def test_rollout_rolls_a_wrong_candidate_back_at_the_first_step_with_zero_failed_requests(repo, server):
    with Load(server.grpc_url, "wrong") as load:
        outcome = Rollout(repo, server.grpc_url, "wrong").start(
            2, steps=[10, 50, 100], hold_s=1.5, thresholds=_limits())
    assert outcome.result == "rolled_back"
    assert "agreement" in outcome.reason
    assert load.failures == [] and load.ok > 50
    assert _serves(repo, "wrong") == [1]
    assert server.is_model_ready("wrong", 1)
    step = _events(repo, "wrong", "rollout-step")[-1]
    assert step["verdict"] == "fail" and step["step"] == 1 and step["weight"] == 10
    assert step["evidence"]["agreement"] < 0.99 and step["evidence"]["disagreements"]
    assert _events(repo, "wrong", "rollback")[-1]["to"] == [1]
    _left_clean(repo, server, "wrong")


def test_rollout_rolls_a_slow_candidate_back_at_the_first_step_with_zero_failed_requests(repo, server):
    with Load(server.grpc_url, "slow") as load:
        outcome = Rollout(repo, server.grpc_url, "slow").start(
            2, steps=[10, 50, 100], hold_s=1.5, thresholds=_limits(max_p99_ms=150.0, min_requests=10))
    assert outcome.result == "rolled_back"
    assert "p99" in outcome.reason
    assert load.failures == []
    assert _serves(repo, "slow") == [1]
    step = _events(repo, "slow", "rollout-step")[-1]
    assert step["verdict"] == "fail" and step["step"] == 1
    assert step["evidence"]["candidate_p99_ms"] > 150.0
    assert step["evidence"]["agreement"] == 1.0  # right answers, too late
    _left_clean(repo, server, "slow")


def test_rollout_killed_mid_way_is_resumed_from_its_saved_state_and_finishes(repo, server):
    cmd = [sys.executable, "-m", "tritonforge", "rollout", "resumed", "--to", "2", "--url", server.grpc_url,
           "--repo", str(repo), "--steps", "10,50,100", "--hold", "1.5", "--max-error-rate", "0",
           "--min-requests", "15"]
    with Load(server.grpc_url, "resumed") as load:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not _events(repo, "resumed", "rollout-step") and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        state = load_state(repo, "resumed")
        assert state is not None and state.phase == "running" and state.step_index >= 1
        time.sleep(1.0)  # the splitter keeps serving the split with no controller alive
        with pytest.raises(RolloutError, match="already in progress"):
            Rollout(repo, server.grpc_url, "resumed").start(2)
        outcome = Rollout(repo, server.grpc_url, "resumed").resume()
    assert outcome.result == "promoted"
    assert load.failures == []
    assert _serves(repo, "resumed") == [2]
    assert _events(repo, "resumed", "rollout-resume")
    assert [e["weight"] for e in _events(repo, "resumed", "rollout-step")][-1] == 100
    _left_clean(repo, server, "resumed")


def test_rollout_abort_after_a_crash_restores_the_stable_version(repo, server):
    rollout = Rollout(repo, server.grpc_url, "aborted")
    with Load(server.grpc_url, "aborted") as load:
        rollout.start(2, steps=[10, 100], hold_s=0.5, thresholds=_limits(min_requests=1_000_000), max_hold_s=0)
    assert load.failures == []
    assert _serves(repo, "aborted") == [1]
    assert "not enough traffic" in _events(repo, "aborted", "rollout-step")[-1]["reasons"]
    with pytest.raises(RolloutError, match="no rollout"):
        rollout.abort()
    _left_clean(repo, server, "aborted")
    assert json.loads(json.dumps(read_manifest(repo, "aborted", 2)))  # manifests untouched and readable


def test_rollout_under_poll_mode_promotes_with_zero_failed_requests(tmp_path):
    files = tmp_path / "files"
    root = tmp_path / "repo"
    add_model(root, "polled", mlp(files / "stable.onnx"), max_batch_size=16)
    add_model(root, "polled", mlp(files / "good.onnx"), max_batch_size=16)
    from tritonforge.registry import promote

    promote(root, "polled", 1)
    poll = ["--model-control-mode=poll", "--repository-poll-secs=1"]
    with EmbeddedServer(root, extra_args=poll) as polled:
        with Load(polled.grpc_url, "polled") as load:
            outcome = Rollout(root, polled.grpc_url, "polled").start(
                2, steps=[50, 100], hold_s=1.0, thresholds=_limits())
            deadline = time.monotonic() + 30
            while polled.is_model_ready("polled__rollout") and time.monotonic() < deadline:
                time.sleep(0.2)
        assert outcome.result == "promoted"
        assert load.failures == [] and load.ok > 50
        assert polled.is_model_ready("polled", 2) and not polled.is_model_ready("polled", 1)
        assert not polled.is_model_ready("polled__rollout")
        _left_clean(root, polled, "polled")
