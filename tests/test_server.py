"""The embedded server's lifecycle: start, load failures, explicit control, and a clean stop."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient

import tiny_models
from conftest import triton_infer
from tritonforge.errors import ModelLoadError, ServerError
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer
from tritonforge.server.leftovers import OWNED_REPO_PREFIX, sweep_leftovers


def _connections(process: psutil.Process) -> list:
    """The process's sockets (psutil < 6, which the kserve SDK pins, names it ``connections``)."""
    return (getattr(process, "net_connections", None) or process.connections)()


def _stray(pid: int) -> list[psutil.Process]:
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(pid) in " ".join(p.info["cmdline"] or [])
        and "triton_python_backend_stub" in " ".join(p.info["cmdline"] or [])
    ]


def _shm(prefix: str) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]


def test_server_listens_only_on_loopback_with_free_ports(server):
    assert server.grpc_url.startswith("127.0.0.1:")
    assert len({server.grpc_port, server.http_port, server.metrics_port}) == 3
    listening = {c.laddr for c in _connections(psutil.Process(server.pid)) if c.status == "LISTEN"}
    assert listening and all(addr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for addr in listening)


def test_stop_leaves_no_process_shared_memory_or_log_file(tmp_path):
    repo = tmp_path / "repo"
    add_model(repo, "mlp", tiny_models.mlp_onnx(tmp_path / "mlp.onnx"), instances=2)
    server = EmbeddedServer(repo).start()
    pid, prefix, log_path = server.pid, server._shm_prefix, server._log_path
    children = psutil.Process(pid).children(recursive=True)
    assert len(children) == 2  # one backend stub per instance
    assert _shm(prefix), "the Python backend should have made shared-memory regions"
    server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert _shm(prefix) == []
    assert log_path is not None and not log_path.exists()
    assert "successfully loaded 'mlp'" in server.log  # the log stays readable after stop


def test_stop_after_the_server_was_killed_still_sweeps_its_backend_processes(tmp_path):
    repo = tmp_path / "repo"
    add_model(repo, "mlp", tiny_models.mlp_onnx(tmp_path / "mlp.onnx"))
    server = EmbeddedServer(repo).start()
    children = psutil.Process(server.pid).children(recursive=True)
    os.kill(server.pid, 9)
    server.stop()
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


# a program that starts a server, prints what a test must find of it, and waits to be stopped
SERVE_UNTIL_KILLED = """
import sys, time
from tritonforge.server import EmbeddedServer
server = EmbeddedServer(sys.argv[1]).start()
print(server.pid, server._shm_prefix, server._log_path, server.grpc_port, server.http_port,
      server.metrics_port, flush=True)
time.sleep(300)
"""


@contextlib.contextmanager
def _serving_program(
    tmp_path: Path, tmp_dir: Path | None = None
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """Runs SERVE_UNTIL_KILLED on a one-model repository (its temporary files in ``tmp_dir`` if given);
    yields it and its printed fields (pid, shm prefix, log path, gRPC, HTTP and metrics ports); killed
    (if still running) at the end."""
    repo = tmp_path / "repo"
    add_model(repo, "mlp", tiny_models.mlp_onnx(tmp_path / "mlp.onnx"))
    env = None if tmp_dir is None else {**os.environ, "TMPDIR": str(tmp_dir)}
    program = subprocess.Popen(
        [sys.executable, "-c", SERVE_UNTIL_KILLED, str(repo)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert program.stdout is not None
        yield program, program.stdout.readline().split()
    finally:
        program.kill()
        program.wait()
        if program.stdout is not None:
            program.stdout.close()


def test_a_program_stopped_by_sigterm_leaves_no_server_shared_memory_or_log_behind(tmp_path):
    with _serving_program(tmp_path) as (program, fields):
        pid_text, prefix, log_name, *_ = fields
        pid = int(pid_text)
        children = psutil.Process(pid).children(recursive=True)
        assert children and _shm(prefix)
        program.send_signal(signal.SIGTERM)
        assert program.wait(timeout=60) == 128 + signal.SIGTERM
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
    assert _shm(prefix) == []
    assert not os.path.exists(log_name)


def _group_alive(pgid: int) -> bool:
    return any(
        p.info["status"] != psutil.STATUS_ZOMBIE
        for p in psutil.process_iter(["status"])
        if _pgid(p.pid) == pgid
    )


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_a_program_killed_by_sigkill_leaves_no_server_stub_port_or_shared_memory_behind(tmp_path):
    with _serving_program(tmp_path) as (program, fields):
        pid_text, prefix, log_name, *ports_text = fields
        pid, ports = int(pid_text), [int(p) for p in ports_text]
        stubs = psutil.Process(pid).children(recursive=True)
        assert stubs and _shm(prefix) and all(_listening(port) for port in ports)
        program.send_signal(signal.SIGKILL)  # no handler, no atexit, no finally: only the watchdog is left
        assert program.wait(timeout=30) == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (_group_alive(pid) or _shm(prefix) or os.path.exists(log_name)):
        time.sleep(0.2)
    assert not _group_alive(pid), "the server or a backend stub outlived its owner"
    assert not any(s.is_running() and s.status() != psutil.STATUS_ZOMBIE for s in stubs)
    assert _shm(prefix) == []
    assert not os.path.exists(log_name)
    assert not any(_listening(port) for port in ports)


def test_after_a_whole_tree_sigkill_the_next_start_sweeps_its_leftovers_and_no_live_servers(
    tmp_path, server, monkeypatch
):
    live = sorted(_shm(server._shm_prefix))
    assert live, "the session's server should have shared-memory regions"
    # servers that other test workers start meanwhile sweep too: the killed server's log lives in a folder
    # only this test's start sweeps, and its regions stay mapped here (a sweep spares a mapped region)
    # until that start
    private = tmp_path / "tmp"
    private.mkdir()
    held: list[mmap.mmap] = []
    with _serving_program(tmp_path, private) as (program, fields):
        pid_text, prefix, log_name, *_ = fields
        pid = int(pid_text)
        watchdog = [c for c in psutil.Process(program.pid).children() if c.pid != pid]
        assert len(watchdog) == 1 and _shm(prefix)
        for name in _shm(prefix):
            with open(f"/dev/shm/{name}", "r+b") as region:
                held.append(mmap.mmap(region.fileno(), 0))
        # the whole tree at once, as an OOM kill or `kill -9` of everything would: nothing runs to clean up
        watchdog[0].kill()
        os.killpg(pid, signal.SIGKILL)
        program.kill()
        program.wait(timeout=30)
        watchdog[0].wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _group_alive(pid):
            time.sleep(0.1)
    left = _shm(prefix)
    assert left and os.path.exists(log_name), "the SIGKILL should have left regions and a log behind"
    for region in held:
        region.close()
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    with EmbeddedServer(tmp_path / "repo") as again:
        assert _shm(prefix) == [] and not os.path.exists(log_name)
        assert _shm(again._shm_prefix)  # its own, made after the sweep
    assert sorted(_shm(server._shm_prefix)) == live  # a live server's regions are never taken
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        assert triton_infer(client, "mlp", {"x": np.ones((1, 8), np.float32)})["probs"].shape == (1, 3)
    finally:
        client.close()


def test_the_sweep_takes_a_dead_programs_temporary_repository_and_nothing_else(tmp_path):
    """``serve``'s cache repository is named with its owner's pid: once that program is gone (killed, so
    nothing of it cleaned up) the next start's sweep removes the folder; a live owner's folder, a folder
    of another name and a link stay."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"{OWNED_REPO_PREFIX}{dead.pid}-abc"
    (gone / "tritonforge_cache" / "1").mkdir(parents=True)
    (gone / "tritonforge_cache" / "1" / "model.py").write_text("# coordinator\n")
    live = tmp_path / f"{OWNED_REPO_PREFIX}{os.getpid()}-abc"
    live.mkdir()
    other = tmp_path / "tritonforge-repository-of-someone"
    other.mkdir()
    link = tmp_path / f"{OWNED_REPO_PREFIX}{dead.pid}-link"
    link.symlink_to(other)
    removed = sweep_leftovers(shm_dir=str(tmp_path / "no-shm"), tmp_dir=str(tmp_path))
    assert removed == [str(gone)]
    assert not gone.exists() and live.is_dir() and other.is_dir() and link.is_symlink()


def test_a_clean_stop_ends_the_watchdog_without_it_touching_anything(tmp_path):
    repo = tmp_path / "repo"
    add_model(repo, "mlp", tiny_models.mlp_onnx(tmp_path / "mlp.onnx"))
    server = EmbeddedServer(repo, log_file=tmp_path / "logs" / "triton.log").start()
    watchdog = server._watchdog
    assert watchdog is not None and watchdog._process.poll() is None
    server.stop()
    assert watchdog._process.wait(timeout=10) == 0
    assert (tmp_path / "logs" / "triton.log").exists()  # a log file the user named is kept
    assert "successfully loaded 'mlp'" in (tmp_path / "logs" / "triton.log").read_text()


def test_start_raises_model_load_error_naming_the_model_and_cause(tmp_path):
    repo = tmp_path / "repo"
    model = add_model(repo, "broken", tiny_models.mlp_onnx(tmp_path / "mlp.onnx"))
    (model / "model.onnx").write_bytes(b"this is not an onnx file")
    with pytest.raises(ModelLoadError) as info:
        EmbeddedServer(repo, startup_timeout_s=60).start()
    assert info.value.model == "broken"
    assert "broken" in info.value.message and "protobuf" in info.value.message.lower()


def test_start_raises_server_error_when_the_repository_is_missing(tmp_path):
    with pytest.raises(ServerError, match="does not exist"):
        EmbeddedServer(tmp_path / "nowhere")


def test_explicit_mode_loads_and_unloads_models_on_demand(tmp_path):
    repo = tmp_path / "repo"
    add_model(repo, "mlp", tiny_models.mlp_onnx(tmp_path / "mlp.onnx"))
    add_model(repo, "fixed", tiny_models.fixed_onnx(tmp_path / "fixed.onnx"))
    with EmbeddedServer(repo, model_control="explicit", load_models=["fixed"]) as server:
        assert server.is_model_ready("fixed")
        assert not server.is_model_ready("mlp")
        server.load_model("mlp")
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            out = triton_infer(client, "mlp", {"x": np.ones((2, 8), dtype=np.float32)})
            assert out["probs"].shape == (2, 3)
            server.unload_model("mlp")
            assert not server.is_model_ready("mlp")
        finally:
            client.close()


def test_load_model_raises_model_load_error_with_tritons_reason(tmp_path):
    repo = tmp_path / "repo"
    model = add_model(repo, "mlp", tiny_models.mlp_onnx(tmp_path / "mlp.onnx"))
    shutil.copy(model / "model.onnx", tmp_path / "keep.onnx")
    (model / "model.onnx").unlink()
    with EmbeddedServer(repo, model_control="explicit") as server:
        with pytest.raises(ModelLoadError) as info:
            server.load_model("mlp")
        assert info.value.model == "mlp"
        assert "model.onnx" in info.value.message
        # a name that is no usable model name reaches Triton as one path segment (quoted), never another
        # endpoint or urllib's InvalidURL: Triton's refusal, naming the model
        with pytest.raises(ModelLoadError) as info:
            server.load_model("no/such model")
        assert info.value.model == "no/such model"
        assert not server.is_model_ready("no/such model")


PYTHON_MODEL_USING_THE_VENV = """
import ssl  # a stdlib extension module: needs the stub to embed this interpreter's own libpython

import numpy as np
import psutil  # installed only in the venv, not in the system Python
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        answer = np.array([[len(ssl.OPENSSL_VERSION), psutil.cpu_count()]], dtype=np.int64)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", answer)]) for _ in requests]
"""


def test_python_models_run_on_this_interpreter_with_its_packages_and_stdlib(tmp_path):
    from tritonforge.config import DataType, ModelConfig, TensorSpec

    source = tmp_path / "model.py"
    source.write_text(PYTHON_MODEL_USING_THE_VENV)
    config = ModelConfig(
        name="venv_probe",
        backend="python",
        inputs=(TensorSpec(name="IN", dtype=DataType.FP32, dims=(1,)),),
        outputs=(TensorSpec(name="OUT", dtype=DataType.INT64, dims=(1, 2)),),
    )
    add_model(tmp_path / "repo", "venv_probe", source, config)
    with EmbeddedServer(tmp_path / "repo") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            out = triton_infer(client, "venv_probe", {"IN": np.zeros(1, dtype=np.float32)})["OUT"]
        finally:
            client.close()
    assert out[0, 0] > 0 and out[0, 1] == psutil.cpu_count()
