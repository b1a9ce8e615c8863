"""A real Open Inference Protocol server that is not Triton: Seldon's MLServer, for the interop tests.

MLServer's dependencies (numpy 2, its own grpcio/protobuf pins) clash with ours (nvidia-pytriton pins
numpy<2), so it lives in a venv of its own, built on first use and kept, keyed by its version and the
Python's, in the backends' cache folder (``$TRITONFORGE_CACHE``, else ``$XDG_CACHE_HOME`` or ``~/.cache``,
then ``tritonforge``). A marker file written last tells a finished venv from one a killed build left
half-made (which is rebuilt); a file lock keeps two test sessions from building it at once. The model
is a scikit-learn classifier on the digits data that scikit-learn ships, trained inside that venv (so
the pickle matches the scikit-learn that loads it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tritonforge.server.embedded import free_port

MLSERVER_VERSION = "1.7.1"
MLSERVER_PACKAGES = (f"mlserver=={MLSERVER_VERSION}", f"mlserver-sklearn=={MLSERVER_VERSION}")
START_TIMEOUT_S = 180.0

TRAIN = textwrap.dedent("""
    import sys
    import joblib
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    model = LogisticRegression(max_iter=300).fit(x, y)
    joblib.dump(model, sys.argv[1] + "/model.joblib")
    np.save(sys.argv[1] + "/x.npy", x)
    np.save(sys.argv[1] + "/labels.npy", model.predict(x))
""")


def cache_root() -> Path:
    """The same cache folder as the embedded server's backends (``tritonforge.server.install``)."""
    if os.environ.get("TRITONFORGE_CACHE"):
        return Path(os.environ["TRITONFORGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tritonforge"


def mlserver_venv() -> Path:
    """The venv with MLServer (built once and kept; see the module doc)."""
    tag = f"mlserver-{MLSERVER_VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    venv = cache_root() / tag
    done = venv / ".tritonforge-complete"
    if done.exists():
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():  # another session built it while we waited
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a build that was killed half-way
        # A venv can't be moved once made (its scripts name their own path), hence the marker, not a rename.
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True)
        pip = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *MLSERVER_PACKAGES],
            capture_output=True,
            text=True,
        )
        if pip.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise RuntimeError(f"could not install {' '.join(MLSERVER_PACKAGES)}:\n{pip.stderr[-3000:]}")
        done.write_text(" ".join(MLSERVER_PACKAGES) + "\n")
    return venv


@dataclass
class MLServer:
    """A running MLServer serving the ``digits`` model on loopback."""

    grpc_url: str
    x: np.ndarray  # the digits features (1797 x 64, float64)
    labels: np.ndarray  # what the model predicts for them
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC's default, which MLServer keeps


def build_models(venv: Path, root: Path) -> Path:
    models = root / "models"
    digits = models / "digits"
    digits.mkdir(parents=True)
    subprocess.run(
        [str(venv / "bin" / "python"), "-c", TRAIN, str(digits)], check=True, capture_output=True, timeout=300
    )
    settings = {
        "name": "digits",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 64]}],
        "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1, 1]}],
        "parameters": {"uri": "./model.joblib", "version": "1"},
    }
    (digits / "model-settings.json").write_text(json.dumps(settings))
    # the same model with nothing declared: its metadata lists no inputs (the client can't check them)
    plain = models / "digits_plain"
    plain.mkdir()
    shutil.copy(digits / "model.joblib", plain / "model.joblib")
    bare = {k: v for k, v in settings.items() if k not in ("inputs", "outputs")} | {"name": "digits_plain"}
    (plain / "model-settings.json").write_text(json.dumps(bare))
    return models


@contextlib.contextmanager
def running_mlserver(root: Path) -> Iterator[MLServer]:
    """MLServer on free loopback ports, stopped (its whole process group) at the end."""
    from tritonforge.client import CircuitBreaker, Client, RetryPolicy

    venv = mlserver_venv()
    models = build_models(venv, root)
    grpc_port = free_port()
    server_settings = {
        "debug": False,
        "host": "127.0.0.1",
        "http_port": free_port(),
        "grpc_port": grpc_port,
        "metrics_port": free_port(),
        "parallel_workers": 0,  # one process: nothing else to clean up
        "load_models_at_startup": True,
    }
    (models / "settings.json").write_text(json.dumps(server_settings))
    log = (root / "mlserver.log").open("wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    process = subprocess.Popen(
        [str(venv / "bin" / "mlserver"), "start", str(models)],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"127.0.0.1:{grpc_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        patient = CircuitBreaker(failure_threshold=1_000_000)  # "not up yet" is expected here
        with Client(url, metrics=False, retry=RetryPolicy.none(), breaker=patient) as probe:
            while not probe.is_model_ready("digits"):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"MLServer did not get ready: {(root / 'mlserver.log').read_text()[-3000:]}"
                    )
                time.sleep(0.5)
        digits = models / "digits"
        yield MLServer(url, np.load(digits / "x.npy"), np.load(digits / "labels.npy"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
