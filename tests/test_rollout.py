"""Canary rollouts through the real server, under steady concurrent load from apps that only know the
model's name: a good candidate goes to 100 %, a shuffled-label one is rolled back at its shadow step
without answering anyone, a slow one at the first step; a killed controller is told dead and resumed, a
Ctrl-C pauses, a whole-server SIGKILL in each model-control mode costs no request once the server is
back — each with zero failed requests and what happened in the audit log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from callers import Callers
from rollout_models import mlp
from tritonforge.registry import audit_log, read_manifest, served_versions
from tritonforge.repository import add_model
from tritonforge.repository.writer import load_config, versions
from tritonforge.rollout import Rollout, RolloutError, Thresholds
from tritonforge.rollout.state import load_state, state_paths
from tritonforge.server import EmbeddedServer

pytestmark = pytest.mark.slow

MODELS = (
    "good",
    "wrong",
    "slow",
    "crashed",
    "aborted",
    "flip",
    "gated",
    "paused",
    "late",
    "back",
    "stopped",
    "broken",
    "pystep",
)
DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rollout") / "repo"
    files = tmp_path_factory.mktemp("rollout_files")
    stable = mlp(files / "stable.onnx")
    candidates = {
        "good": mlp(files / "good.onnx"),  # the same function, a new file
        "wrong": mlp(files / "wrong.onnx", shuffled=True),
        "slow": mlp(files / "slow.onnx", slow_matmuls=40),
        "crashed": mlp(files / "good2.onnx"),
        "aborted": mlp(files / "good3.onnx"),
        "flip": mlp(files / "wrong2.onnx", seed=9),
        "gated": mlp(files / "wrong3.onnx", seed=8),
        "paused": mlp(files / "good5.onnx"),
        "late": mlp(files / "slow2.onnx", slow_matmuls=40),
        "back": mlp(files / "wrong4.onnx", seed=8),  # v2: never promoted
        "stopped": mlp(files / "good6.onnx"),
        "broken": mlp(files / "broken.onnx", fails=True),  # fails at run time, on every call
    }
    from tritonforge.registry import promote

    _python_step(root, files)
    for name in MODELS[:-1]:
        add_model(root, name, stable, max_batch_size=16)
        add_model(root, name, candidates[name], max_batch_size=16)
        promote(root, name, 1, reason="initial")
    for name in ("gated", "back"):
        add_model(root, name, mlp(files / "good4.onnx"), max_batch_size=16)  # v3: as good as v1
        promote(root, name, 1)
    return root


# A pipeline's Python step as a model of its own: v1 answers, v2 answers an error for the rows whose first
# feature is above 0.5 (about half of the calls), as a step whose member fails does.
PYTHON_STEP = """
import numpy as np
import triton_python_backend_utils as pb_utils

FAIL = {fail}


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            if FAIL and float(x[:, 0].max()) > 0.5:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("member unavailable")))
                continue
            probs = np.full((x.shape[0], 3), 1.0 / 3.0, np.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("probs", probs)]))
        return out
"""


def _python_step(repo: Path, files: Path) -> None:
    from tritonforge.config import DataType, ModelConfig, TensorSpec
    from tritonforge.registry import promote

    config = ModelConfig(
        name="pystep",
        backend="python",
        max_batch_size=16,
        inputs=(TensorSpec(name="x", dtype=DataType.FP32, dims=(8,)),),
        outputs=(TensorSpec(name="probs", dtype=DataType.FP32, dims=(3,)),),
    )
    for version, fail in ((1, False), (2, True)):
        code = files / f"pystep{version}" / "model.py"
        code.parent.mkdir(parents=True, exist_ok=True)
        code.write_text(PYTHON_STEP.format(fail=fail))
        add_model(repo, "pystep", code, config, version=version)
    promote(repo, "pystep", 1, reason="initial")


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(repo, model_control="explicit", load_models=list(MODELS)) as running:
        yield running


def apps_calling(url: str, model: str, expect: Path | None = None) -> Callers:
    """Apps calling the model by name from three threads (deadline per call), counting every failure and,
    with ``expect`` (the stable version's file), every answer that is not stable's."""
    session = None
    if expect is not None:
        import onnxruntime as ort

        session = ort.InferenceSession(str(expect), providers=["CPUExecutionProvider"])

    def request() -> tuple[list[grpcclient.InferInput], np.ndarray]:
        x = np.random.default_rng().random((2, 8), dtype=np.float32)  # a generator per call: threads
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return [inp], x

    def judge(result: grpcclient.InferResult, x: np.ndarray) -> bool:
        probs = result.as_numpy("probs")
        assert probs.shape == (2, 3)
        return session is not None and not np.allclose(probs, session.run(None, {"x": x})[0], atol=1e-4)

    return Callers(url, model, request, deadline_s=DEADLINE_S, judge=judge, settle_s=0.5)


def _limits(**changes: object) -> Thresholds:
    base = dict(max_error_rate=0.0, max_p99_ms=None, min_agreement=0.99, min_requests=15)
    base.update(changes)
    return Thresholds(**base)  # type: ignore[arg-type]


def _serves(repo: Path, model: str) -> list[int]:
    return served_versions(load_config(repo / model), versions(repo / model))


def _events(repo: Path, model: str, action: str) -> list[dict]:
    return [e for e in audit_log(repo) if e.get("model") == model and e.get("action") == action]


def _actions(repo: Path, model: str) -> list[str]:
    return [e["action"] for e in audit_log(repo) if e.get("model") == model]


def _left_clean(repo: Path, server: EmbeddedServer, model: str) -> None:
    assert load_state(repo, model) is None
    assert not (repo / f"{model}__rollout").exists()
    assert not state_paths(repo, model).stats_files()
    assert not [p for p in repo.iterdir() if p.is_dir() and p.name.startswith(".")]
    assert not any((repo / model).glob("*/tritonforge_rollout_splitter.py"))
    # the splitter's bytecode gone (a Python model's own cache comes back when it serves again)
    assert not any((repo / model).glob("*/__pycache__/tritonforge_rollout_splitter.*"))
    assert "tritonforge_rollout" not in load_config(repo / model).parameters
    assert not state_paths(repo, model).heartbeat.exists()
    # nothing left UNLOADING on the server (a version that never finishes unloading makes the whole server
    # not ready under Triton's strict readiness); unloading itself takes a moment, and the twin, its folder
    # gone, is out of the index: the server's readiness tells
    _wait_for(lambda: not _unloading(server, model), 30)
    _wait_for(lambda: _server_ready(server), 30)


def _server_ready(server: EmbeddedServer) -> bool:
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        return bool(client.is_server_ready())


def _unloading(server: EmbeddedServer, model: str) -> list[str]:
    return [
        f"{m['name']} v{m.get('version')}"
        for m in server.repository_index()
        if m["name"] in (model, f"{model}__rollout") and m.get("state") == "UNLOADING"
    ]


def test_rollout_moves_a_good_candidate_to_100_percent_with_zero_failed_requests(repo, server):
    with apps_calling(server.grpc_url, "good") as load:
        outcome = Rollout(repo, server.grpc_url, "good").start(
            2, steps=[10, 50, 100], hold_s=1.5, thresholds=_limits(), reason="good candidate"
        )
    assert outcome.result == "promoted", outcome
    assert load.failures == [] and load.ok > 100
    assert _serves(repo, "good") == [2]
    assert server.is_model_ready("good", 2) and not server.is_model_ready("good", 1)
    steps = _events(repo, "good", "rollout-step")
    assert [(e["step"], e["verdict"]) for e in steps] == [
        ("shadow", "pass"),
        (1, "pass"),
        (2, "pass"),
        (3, "pass"),
    ]
    assert all(e["evidence"]["agreement"] == 1.0 for e in steps)
    assert all(e["evidence"]["candidate_calls"] >= 15 for e in steps)
    promoted = _events(repo, "good", "promote")[-1]
    assert (promoted["from"], promoted["to"]) == ([1], [2])
    _left_clean(repo, server, "good")


def test_rollout_shadow_step_rolls_a_shuffled_label_candidate_back_before_any_user_gets_its_answers(
    repo, server
):
    with apps_calling(server.grpc_url, "wrong", expect=repo / "wrong" / "1" / "model.onnx") as load:
        outcome = Rollout(repo, server.grpc_url, "wrong").start(
            2, steps=[10, 50, 100], hold_s=1.5, thresholds=_limits()
        )
    assert outcome.result == "rolled_back"
    assert "agreement" in outcome.reason
    assert load.failures == [] and load.ok > 50
    assert load.wrong == 0  # the candidate was judged on mirrored traffic only
    assert _serves(repo, "wrong") == [1]
    assert server.is_model_ready("wrong", 1)
    step = _events(repo, "wrong", "rollout-step")[-1]
    assert step["verdict"] == "fail" and step["step"] == "shadow" and step["weight"] == 10
    assert step["evidence"]["agreement"] < 0.99 and step["evidence"]["disagreements"]
    rollback = _events(repo, "wrong", "rollout-rollback")[-1]
    assert rollback["to"] == [1] and rollback["cause"] == "breach" and "agreement" in rollback["reason"]
    assert not _events(repo, "wrong", "rollback")  # the registry's rollback history is left alone
    assert _actions(repo, "wrong")[-3:] == ["rollout-start", "rollout-step", "rollout-rollback"]
    _left_clean(repo, server, "wrong")


def test_rollback_after_a_rollout_returns_to_the_version_served_before_not_a_failed_one(repo, server):
    from tritonforge.rollout.live import rollback_live

    with apps_calling(server.grpc_url, "back") as load:
        outcome = Rollout(repo, server.grpc_url, "back").start(
            3, steps=[50, 100], hold_s=1.0, thresholds=_limits(min_requests=10)
        )
        assert outcome.result == "promoted"
        promoted = _events(repo, "back", "promote")[-1]
        assert (promoted["from"], promoted["to"]) == ([1], [3])
        event = rollback_live(repo, server.grpc_url, "back", reason="back to what served")
    assert event["to"] == [1]  # not v2, the highest below v3, which never served
    assert load.failures == []
    assert _serves(repo, "back") == [1]
    assert server.is_model_ready("back", 1) and not server.is_model_ready("back", 3)
    _left_clean(repo, server, "back")


def test_rollout_rolls_back_a_candidate_whose_python_step_answers_errors_with_zero_failed_requests(
    repo, server
):
    with apps_calling(server.grpc_url, "pystep") as load:
        outcome = Rollout(repo, server.grpc_url, "pystep").start(
            2, steps=[10, 50, 100], hold_s=1.5, thresholds=_limits(max_error_rate=0.05)
        )
    assert outcome.result == "rolled_back", outcome
    assert "error rate" in outcome.reason
    assert load.failures == [] and load.ok > 50  # stable answered for every failed candidate call
    assert _serves(repo, "pystep") == [1]
    step = _events(repo, "pystep", "rollout-step")[-1]
    assert step["verdict"] == "fail" and step["step"] == "shadow"  # judged on mirrored calls first
    assert step["evidence"]["candidate_errors"] > 0
    _left_clean(repo, server, "pystep")
    assert "FAIL = False" in (repo / "pystep" / "1" / "model.py").read_text()  # its own code, untouched


def test_rollout_rolls_back_a_candidate_failing_every_call_at_run_time_and_leaves_nothing_unloading(
    repo, server
):
    # the embedded onnxruntime backend answers each failed call with an error response (Triton counts
    # those as successes): the splitter's own count sees them
    with apps_calling(server.grpc_url, "broken") as load:
        outcome = Rollout(repo, server.grpc_url, "broken").start(
            2, steps=[10, 50, 100], hold_s=1.5, thresholds=_limits(max_error_rate=0.05)
        )
    assert outcome.result == "rolled_back", outcome
    assert "error rate" in outcome.reason
    assert load.failures == [] and load.ok > 50
    assert _serves(repo, "broken") == [1]
    step = _events(repo, "broken", "rollout-step")[-1]
    assert step["verdict"] == "fail" and step["step"] == "shadow"
    assert step["evidence"]["candidate_errors"] == step["evidence"]["candidate_calls"] > 0
    assert step["evidence"]["error_rate"] == 1.0
    _left_clean(repo, server, "broken")  # nothing left UNLOADING, the server ready


def _one_thread_ms(model_file: Path) -> float:
    """Median latency of one request to ``model_file`` in-process on one onnxruntime thread."""
    import statistics

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.zeros((1, 8), np.float32)}
    session.run(None, feed)
    times = []
    for _ in range(5):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def test_rollout_rolls_a_slow_candidate_back_at_the_first_step_with_zero_failed_requests(repo, server):
    # The limit scales with this machine: a request can't take less than half the one-thread time on 2
    # cores, so a quarter of it is always breached by the candidate (a fixed 150 ms was not on fast CPUs).
    limit_ms = max(1.0, _one_thread_ms(repo / "slow" / "2" / "model.onnx") / 4)
    with apps_calling(server.grpc_url, "slow") as load:
        outcome = Rollout(repo, server.grpc_url, "slow").start(
            2, steps=[10, 50, 100], hold_s=1.5, thresholds=_limits(max_p99_ms=limit_ms, min_requests=10)
        )
    assert outcome.result == "rolled_back"
    assert "p99" in outcome.reason
    assert load.failures == []
    assert _serves(repo, "slow") == [1]
    step = _events(repo, "slow", "rollout-step")[-1]
    assert step["verdict"] == "fail" and step["step"] == "shadow"
    assert step["evidence"]["candidate_p99_ms"] > limit_ms
    assert step["evidence"]["agreement"] == 1.0  # right answers, too late
    _left_clean(repo, server, "slow")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tritonforge", *args]


def _wait_for(check, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _status(repo: Path, model: str) -> dict:
    from typer.testing import CliRunner

    from tritonforge.cli import app

    result = CliRunner().invoke(app, ["rollout", "status", model, "--repo", str(repo), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_rollout_killed_controller_is_told_dead_recorded_as_a_crash_and_resumed_with_its_twin_reloaded(
    repo, server
):
    start = _cli(
        "rollout", "start", "crashed", "--to", "2", "--url", server.grpc_url, "--repo", str(repo),
        "--steps", "10,50,100", "--hold-s", "1.5", "--max-error-rate", "0", "--min-requests", "15",
    )  # fmt: skip
    with apps_calling(server.grpc_url, "crashed") as load:
        proc = subprocess.Popen(
            start, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            _wait_for(lambda: bool(_events(repo, "crashed", "rollout-step")), 120)
            alive = _status(repo, "crashed")["controller"]
            assert alive["alive"] and alive["pid"] == proc.pid and alive["last_beat_age_s"] < 5
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        dead = _status(repo, "crashed")
        assert dead["phase"] == "running" and dead["controller"]["alive"] is False
        assert dead["controller"]["pid"] == proc.pid
        time.sleep(1.0)  # the splitter keeps serving the split with no controller alive
        with pytest.raises(RolloutError, match="already in progress"):
            Rollout(repo, server.grpc_url, "crashed").start(2)
    assert load.failures == []
    # as after a server restart that lost it: the twin is gone, so every call through the split fails on
    # both arms, which is not the candidate's fault; resume loads it again before it judges anything
    server.unload_model("crashed__rollout")
    _wait_for(lambda: not server.is_model_ready("crashed__rollout"), 30)
    with apps_calling(server.grpc_url, "crashed") as lost:
        outcome = Rollout(repo, server.grpc_url, "crashed").resume()
    assert outcome.result == "promoted", outcome
    assert lost.ok > 20  # (calls before the twin was back failed: the point of loading it with the model)
    # ...each with an error answered at once, none left without an answer until its deadline
    assert not [f for f in lost.failures if "DEADLINE_EXCEEDED" in f], lost.failures[:3]
    assert _serves(repo, "crashed") == [2]
    crash = _events(repo, "crashed", "rollout-crash")[-1]
    assert crash["pid"] == proc.pid and crash["phase"] == "running" and crash["last_beat"]
    assert all(e["verdict"] == "pass" for e in _events(repo, "crashed", "rollout-step"))
    # in the order it happened: the crash is recorded when the rollout is resumed, before it carries on
    actions = _actions(repo, "crashed")
    after = actions[actions.index("rollout-crash") :]
    assert after[:2] == ["rollout-crash", "rollout-resume"] and after[-2:] == ["promote", "rollout-done"]
    assert set(after[2:-2]) == {"rollout-step"} and "rollout-start" in actions[: -len(after)]
    _left_clean(repo, server, "crashed")


def test_rollout_ctrl_c_pauses_and_says_how_to_continue_and_an_abort_is_the_operators_not_a_failure(
    repo, server
):
    from typer.testing import CliRunner

    from tritonforge.cli import app

    runner = CliRunner()
    start = _cli(
        "rollout", "start", "stopped", "--to", "2", "--url", server.grpc_url, "--repo", str(repo),
        "--steps", "20,100", "--hold-s", "60", "--min-requests", "5",
    )  # fmt: skip
    where = ["--url", server.grpc_url, "--repo", str(repo)]
    with apps_calling(server.grpc_url, "stopped") as load:
        proc = subprocess.Popen(start, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # "running" is saved before the first step's weight: wait for both
            _wait_for(
                lambda: (
                    (s := load_state(repo, "stopped")) is not None and s.phase == "running" and s.weight > 0
                )
            )
            resumed = runner.invoke(app, ["rollout", "resume", "stopped", *where])
            assert resumed.exit_code == 1 and "nothing to resume" in resumed.stderr
            listed = runner.invoke(app, ["models", str(repo)], env={"COLUMNS": "200"})
            assert "shadow 20%" in listed.stdout and "stopped__rollout" not in listed.stdout
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 128 + signal.SIGINT, err
        last = out.strip().splitlines()[-1]
        assert "SIGINT: paused at 20%" in last and "tritonforge rollout resume stopped" in last
        assert "tritonforge rollout abort stopped" in last
        paused = _status(repo, "stopped")
        assert paused["phase"] == "paused" and paused["controller"]["pid"] is None
        status = runner.invoke(app, ["rollout", "status", "stopped", "--repo", str(repo)])
        assert "paused" in status.stdout and "no controller" in status.stdout
        aborted = runner.invoke(app, ["rollout", "abort", "stopped", *where, "--reason", "not today"])
        assert aborted.exit_code == 0, aborted.output
    assert load.failures == []
    assert _serves(repo, "stopped") == [1]
    abort = _events(repo, "stopped", "rollout-abort")[-1]
    assert abort["reason"] == "not today"
    assert not [e for e in _events(repo, "stopped", "rollout-step") if e["verdict"] == "fail"]
    rollback = _events(repo, "stopped", "rollout-rollback")[-1]
    assert rollback["cause"] == "abort" and rollback["reason"] == "not today"
    assert _events(repo, "stopped", "rollout-pause")[-1]["reason"] == "interrupted by SIGINT"
    assert _actions(repo, "stopped")[-3:] == ["rollout-pause", "rollout-abort", "rollout-rollback"]
    _left_clean(repo, server, "stopped")


def test_rollout_abort_after_a_crash_restores_the_stable_version(repo, server):
    rollout = Rollout(repo, server.grpc_url, "aborted")
    with apps_calling(server.grpc_url, "aborted") as load:
        rollout.start(
            2, steps=[10, 100], hold_s=0.5, thresholds=_limits(min_requests=1_000_000), max_hold_s=0
        )
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
        with apps_calling(polled.grpc_url, "polled") as load:
            outcome = Rollout(root, polled.grpc_url, "polled").start(
                2, steps=[50, 100], hold_s=1.0, thresholds=_limits()
            )
            deadline = time.monotonic() + 30
            while polled.is_model_ready("polled__rollout") and time.monotonic() < deadline:
                time.sleep(0.2)
        assert outcome.result == "promoted"
        assert load.failures == [] and load.ok > 50
        assert polled.is_model_ready("polled", 2) and not polled.is_model_ready("polled", 1)
        assert not polled.is_model_ready("polled__rollout")
        _left_clean(root, polled, "polled")


def _one_model_repo(tmp_path: Path) -> Path:
    from tritonforge.registry import promote

    root = tmp_path / "repo"
    add_model(root, "k", mlp(tmp_path / "files" / "stable.onnx"), max_batch_size=16)
    add_model(root, "k", mlp(tmp_path / "files" / "good.onnx"), max_batch_size=16)
    promote(root, "k", 1)
    return root


def _restart_killed(server: EmbeddedServer, root: Path, options: dict) -> EmbeddedServer:
    """SIGKILL the whole server (its process group: Triton and the model stubs), then start it again on
    the same ports, in the mode ``options`` give; returns once it is ready."""
    ports = {
        "grpc_port": server.grpc_port,
        "http_port": server.http_port,
        "metrics_port": server.metrics_port,
    }
    assert server.pid is not None
    os.killpg(server.pid, signal.SIGKILL)
    server.stop()
    return EmbeddedServer(root, **ports, **options).start()


_MODES: dict[str, dict] = {
    "explicit": {"model_control": "explicit", "load_models": ["k"]},  # as the docs show: no twin named
    # a plain tritonserver command line: nothing reads the splitter's load-with parameter
    "explicit-raw": {"model_control": "explicit", "extra_args": ["--load-model=k"]},
    "poll": {"model_control": "poll", "poll_interval_s": 1},
    "none": {},
}


@pytest.mark.parametrize("mode", ["explicit", "explicit-raw", "poll"])
def test_rollout_survives_a_whole_server_sigkill_with_zero_failed_requests_once_the_server_is_ready(
    tmp_path, mode
):
    """The controller lives on: at its next tick it finds the restarted server and carries on."""
    import concurrent.futures

    root = _one_model_repo(tmp_path)
    options = _MODES[mode]
    first = EmbeddedServer(root, **options).start()
    second = None
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            rollout = Rollout(root, first.grpc_url, "k", ready_timeout_s=60)
            running = pool.submit(
                rollout.start,
                2,
                steps=[50, 100],
                hold_s=1.5,
                thresholds=_limits(min_requests=10),
                shadow=False,
            )
            _wait_for(
                lambda: ((s := load_state(root, "k")) is not None and s.phase == "running") or running.done()
            )
            assert not running.done(), running.result()
            second = _restart_killed(first, root, options)
            if mode != "explicit-raw":  # there the splitter's first request loads it
                assert second.is_model_ready("k__rollout", 1) and second.is_model_ready("k__rollout", 2)
            with apps_calling(second.grpc_url, "k") as load:
                outcome = running.result(timeout=120)
        assert load.failures == [] and load.ok > 20
        assert outcome.result == "promoted", outcome
        assert _serves(root, "k") == [2]
        _wait_for(lambda: second.is_model_ready("k", 2) and not second.is_model_ready("k__rollout"), 30)
        _left_clean(root, second, "k")
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.parametrize("mode", ["none", "explicit-raw"])
def test_rollout_split_serves_with_zero_failed_requests_after_the_machine_restarts_without_a_controller(
    tmp_path, mode
):
    """Server and controller killed at once; the server comes back in none mode (every model of the
    repository loaded at start, so the twin too), or from a plain command line in explicit mode naming only
    the model (the splitter's first request loads its twin): the split answers every request once ready."""
    root = _one_model_repo(tmp_path)
    first = EmbeddedServer(root, **_MODES["explicit"]).start()
    second = None
    try:
        start = _cli(
            "rollout", "start", "k", "--to", "2", "--url", first.grpc_url, "--repo", str(root),
            "--steps", "50,100", "--hold-s", "60", "--min-requests", "10",
        )  # fmt: skip
        proc = subprocess.Popen(start, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for(lambda: (s := load_state(root, "k")) is not None and s.phase == "running")
        finally:
            proc.kill()
            proc.wait()
        second = _restart_killed(first, root, _MODES[mode])
        with apps_calling(second.grpc_url, "k") as load:
            _wait_for(
                lambda: load.ok > 20 or bool(load.failures), 30
            )  # explicit-raw: the first wait for the twin
        assert load.failures == [] and load.ok > 20
        assert _status(root, "k")["controller"]["alive"] is False
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_promote_and_rollback_live_keep_serving_with_zero_failed_requests(repo, server):
    from tritonforge.rollout.live import promote_live, rollback_live

    with apps_calling(server.grpc_url, "flip") as load:
        promote_live(repo, server.grpc_url, "flip", 2, reason="try v2")
        assert server.is_model_ready("flip", 2) and not server.is_model_ready("flip", 1)
        time.sleep(0.5)
        rollback_live(repo, server.grpc_url, "flip", reason="back")
        assert server.is_model_ready("flip", 1) and not server.is_model_ready("flip", 2)
    assert load.failures == [] and load.ok > 20
    moves = [
        e for e in audit_log(repo) if e.get("model") == "flip" and e.get("action") in ("promote", "rollback")
    ]
    assert [e["to"] for e in moves][-2:] == [[2], [1]]


def _holdout(path: Path) -> Path:
    """Labels are the stable version's own answers, so v1 (and v3, the same function) score 1.0."""
    import onnxruntime as ort

    x = np.random.default_rng(5).random((200, 8), dtype=np.float32)
    labels = ort.InferenceSession(str(mlp(path.with_suffix(".onnx")))).run(None, {"x": x})[0].argmax(1)
    np.savez(path, x=x, labels=labels)
    return path


def test_evaluate_runs_the_holdout_through_the_server_and_records_figures(repo, server, tmp_path):
    from tritonforge.rollout.gates import evaluate

    data = _holdout(tmp_path / "holdout.npz")
    served = evaluate(repo, server.grpc_url, "gated", data)
    assert served.version == 1 and served.figures["accuracy"] == 1.0 and served.figures["samples"] == 200
    candidate = evaluate(repo, server.grpc_url, "gated", data, version=2)  # not loaded: a temporary name
    assert candidate.figures["accuracy"] < 0.9
    manifest = read_manifest(repo, "gated", 2)
    assert manifest["metrics"]["accuracy"] == candidate.figures["accuracy"]
    assert manifest["evaluations"][-1]["data_sha256"] == candidate.data_sha256
    assert not (repo / "gated__eval_v2").exists() and not server.is_model_ready("gated__eval_v2")
    assert [e["version"] for e in _events(repo, "gated", "evaluate")][-2:] == [1, 2]
    evaluate(repo, server.grpc_url, "gated", data, version=3)


def test_gates_refuse_a_worse_candidate_with_its_figures_and_run_the_retraining_hook(repo, server, tmp_path):
    from tritonforge.rollout.gates import GateError, check_gates

    if not read_manifest(repo, "gated", 3).get("evaluations"):
        test_evaluate_runs_the_holdout_through_the_server_and_records_figures(repo, server, tmp_path)
    marker = tmp_path / "hook.txt"
    hook = f'echo "$TRITONFORGE_MODEL $TRITONFORGE_VERSION $TRITONFORGE_GATE_FAILURES" > {marker}'
    with pytest.raises(GateError, match=r"accuracy 0\.\d+ is not >= 0\.97") as caught:
        check_gates(repo, "gated", 2, require=["accuracy>=0.97"], hook=hook)
    assert marker.read_text().startswith("gated 2 [")
    with pytest.raises(GateError, match="worse than the served v1"):
        check_gates(repo, "gated", 2, no_worse_than_serving=True)
    assert (
        check_gates(repo, "gated", 3, require=["accuracy>=0.97"], no_worse_than_serving=True)["accuracy"] == 1
    )
    assert caught.value.failures
    failed = _events(repo, "gated", "gate-failed")[-2]
    assert failed["version"] == 2 and failed["figures"]["accuracy"] < 0.9
    with pytest.raises(GateError, match="no evaluation"):
        check_gates(repo, "good", 2, require=["accuracy>=0.5"])
    with pytest.raises(ValueError, match="must look like"):
        check_gates(repo, "gated", 3, require=["accuracy=>0.9"])


def test_cli_promote_and_rollout_refuse_a_failed_gate_in_one_line_on_stderr(repo, server, tmp_path):
    from typer.testing import CliRunner

    from tritonforge.cli import app

    if not read_manifest(repo, "gated", 2).get("evaluations"):
        test_evaluate_runs_the_holdout_through_the_server_and_records_figures(repo, server, tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["promote", str(repo), "gated", "2", "--require", "accuracy>=0.97"])
    assert result.exit_code == 1 and "failed its gate" in result.stderr and "accuracy 0." in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(
        app,
        [
            "rollout",
            "start",
            "gated",
            "--to",
            "2",
            "--url",
            server.grpc_url,
            "--repo",
            str(repo),
            "--no-worse-than-serving",
        ],
    )
    assert result.exit_code == 1 and "worse than the served v1" in result.stderr
    assert _serves(repo, "gated") == [1] and load_state(repo, "gated") is None


def test_audit_command_shows_every_change_as_a_table_and_as_json(repo, server):
    from typer.testing import CliRunner

    from tritonforge.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["audit", str(repo), "--json"])
    assert result.exit_code == 0
    events = json.loads(result.stdout)
    actions = {e["action"] for e in events}
    assert {"promote"} <= actions
    assert all({"at", "by", "action"} <= set(e) for e in events)
    table = runner.invoke(app, ["audit", str(repo), "--model", "flip"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "flip" in table.stdout and "promote" in table.stdout


def test_rollout_pause_holds_the_weight_until_resume_from_another_caller(repo, server):
    import concurrent.futures

    wait_for = _wait_for

    with apps_calling(server.grpc_url, "paused") as load, concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            Rollout(repo, server.grpc_url, "paused").start,
            2,
            steps=[20, 100],
            hold_s=2.0,
            thresholds=_limits(min_requests=5),
            shadow=False,
        )
        wait_for(lambda: (s := load_state(repo, "paused")) is not None and s.phase == "running")
        Rollout(repo, server.grpc_url, "paused").pause()
        wait_for(lambda: load_state(repo, "paused").phase == "paused")
        held = load_state(repo, "paused")
        time.sleep(3.0)  # three holds' worth: no step may pass while paused
        assert load_state(repo, "paused").step_index == held.step_index
        assert load_state(repo, "paused").weight == held.weight == 20
        assert not running.done()
        Rollout(repo, server.grpc_url, "paused").resume()
        outcome = running.result(timeout=120)
    assert outcome.result == "promoted"
    assert load.failures == []
    assert _serves(repo, "paused") == [2]
    assert [e["action"] for e in audit_log(repo) if e.get("model") == "paused"][-7:] == [
        "rollout-start",
        "rollout-pause",
        "rollout-resume",
        "rollout-step",
        "rollout-step",
        "promote",
        "rollout-done",
    ]
    _left_clean(repo, server, "paused")


def test_rollout_answers_from_stable_when_the_candidate_is_later_than_its_timeout(repo, server):
    with apps_calling(server.grpc_url, "late") as load:
        outcome = Rollout(repo, server.grpc_url, "late").start(
            2, steps=[50, 100], hold_s=1.5, thresholds=_limits(candidate_timeout_ms=30.0, min_requests=10)
        )
    assert outcome.result == "rolled_back" and "error rate" in outcome.reason
    assert load.failures == []
    evidence = _events(repo, "late", "rollout-step")[-1]["evidence"]
    assert (
        evidence["candidate_timeouts"] >= 1 and evidence["candidate_timeouts"] == evidence["candidate_errors"]
    )
    _left_clean(repo, server, "late")


def test_rollout_old_flag_forms_still_work_with_one_deprecation_line(tmp_path):
    from typer.testing import CliRunner

    from tritonforge.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["rollout", "clf", "--status", "--repo", str(tmp_path)])
    assert result.exit_code == 0 and "no rollout of clf in progress" in result.stdout
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("deprecated: `tritonforge rollout --status` is now `tritonforge rollout status")
    resumed = runner.invoke(app, ["rollout", "resume", "clf", "--repo", str(tmp_path)])
    assert resumed.exit_code == 1 and "no rollout of 'clf' is in progress" in resumed.stderr
    both = runner.invoke(app, ["rollout", "clf", "--pause", "--abort"])
    assert both.exit_code == 1 and "give at most one of --pause, --abort" in both.stderr
