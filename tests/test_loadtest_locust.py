"""The locust user and the locustfiles, against the real embedded server.

locust monkey-patches the standard library with gevent when imported, which would disturb this pytest
process (and its warnings-are-errors setting): every locust run here is a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tritonforge.server import EmbeddedServer, free_port

ROOT = Path(__file__).resolve().parent.parent
LOCUST = [sys.executable, "-m", "locust"]


@pytest.fixture(scope="module")
def served(loadtest_server: EmbeddedServer) -> EmbeddedServer:
    return loadtest_server  # shared with the sweep and load-test-model tests: one server start-up


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONWARNINGS": "ignore", **extra}


def _stats(prefix: Path) -> dict[str, dict[str, str]]:
    with Path(f"{prefix}_stats.csv").open() as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


LIBRARY_MODE = textwrap.dedent(
    """
    import json, sys
    from tritonforge.loadtest.user import TritonUser  # locust (and gevent) first
    import gevent
    from locust import constant
    from locust.env import Environment

    class Pipe(TritonUser):
        model = sys.argv[2]
        wait_time = constant(0)

    env = Environment(user_classes=[Pipe], host=sys.argv[1])
    seen = []
    env.events.request.add_listener(
        lambda request_type, name, response_time, exception, **kw: seen.append(
            [request_type, name, response_time, None if exception is None else type(exception).__name__]))
    runner = env.create_local_runner()
    runner.start(2, spawn_rate=10)
    gevent.sleep(2)
    for _ in range(280):  # more than 10 calls, however slow the machine (30 s at most)
        if len(seen) > 10:
            break
        gevent.sleep(0.1)
    runner.quit()
    total = env.stats.total
    print(json.dumps({"seen": seen[:50], "count": len(seen), "requests": total.num_requests,
                      "failures": total.num_failures}))
    """
)


def _library_run(url: str, model: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", LIBRARY_MODE, url, model],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_triton_user_in_library_mode_reports_every_request_to_locust_with_the_model_name(
    served: EmbeddedServer,
) -> None:
    out = _library_run(served.grpc_url, "pipe")
    assert out["count"] > 10 and out["requests"] == out["count"] and out["failures"] == 0
    for request_type, name, response_time, exception in out["seen"]:
        assert (request_type, name, exception) == ("grpc", "pipe", None)
        assert response_time > 0


def test_triton_user_reports_calls_to_an_unknown_model_as_failures(served: EmbeddedServer) -> None:
    out = _library_run(served.grpc_url, "nope")
    assert out["failures"] >= 1 and out["failures"] == out["requests"]
    assert {(name, exc) for _, name, _, exc in out["seen"]} == {("nope", "ModelNotFoundError")}


@pytest.mark.slow
def test_headless_locustfile_run_on_an_ensemble_finishes_with_zero_failures_and_writes_csv_stats(
    served: EmbeddedServer, tmp_path: Path
) -> None:
    prefix = tmp_path / "pipe"
    run = subprocess.run(
        [
            *LOCUST,
            "-f",
            "loadtests/any_model.py",
            "--host",
            served.grpc_url,
            "--headless",
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "6s",
            "--csv",
            str(prefix),
            "--only-summary",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(TRITONFORGE_MODEL="pipe"),
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = _stats(prefix)
    assert int(rows["pipe"]["Request Count"]) > 0 and rows["pipe"]["Failure Count"] == "0"
    assert rows["pipe"]["Type"] == "grpc"


@pytest.mark.slow
def test_distributed_locust_master_and_worker_share_the_load_with_zero_failures(
    served: EmbeddedServer, tmp_path: Path
) -> None:
    port = free_port()
    prefix = tmp_path / "dist"
    env = _env(TRITONFORGE_MODEL="mlp")
    log = tmp_path / "master.log"
    master_log = log.open("w")
    master = subprocess.Popen(
        [
            *LOCUST,
            "-f",
            "loadtests/any_model.py",
            "--host",
            served.grpc_url,
            "--master",
            "--headless",
            "--master-bind-host",
            "127.0.0.1",
            "--master-bind-port",
            str(port),
            "--expect-workers",
            "1",
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "5s",
            "--csv",
            str(prefix),
            "--only-summary",
        ],
        stdout=subprocess.DEVNULL,
        stderr=master_log,
        env=env,
        cwd=ROOT,
    )
    worker = subprocess.Popen(
        [
            *LOCUST,
            "-f",
            "loadtests/any_model.py",
            "--worker",
            "--master-host",
            "127.0.0.1",
            "--master-port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=ROOT,
    )
    try:
        master.wait(timeout=120)
        worker.wait(timeout=60)
    finally:
        master_log.close()
        for proc in (master, worker):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert master.returncode == 0, log.read_text()[-3000:]
    rows = _stats(prefix)
    assert int(rows["mlp"]["Request Count"]) > 0 and rows["mlp"]["Failure Count"] == "0"


@pytest.mark.slow
def test_headless_20s_run_on_the_example_digits_vote_pipeline_has_zero_failures(
    example_repo: Path, tmp_path: Path
) -> None:
    prefix = tmp_path / "vote"
    with EmbeddedServer(example_repo) as server:
        run = subprocess.run(
            [
                *LOCUST,
                "-f",
                "loadtests/digits_vote.py",
                "--host",
                server.grpc_url,
                "--headless",
                "-u",
                "8",
                "-r",
                "8",
                "-t",
                "20s",
                "--csv",
                str(prefix),
                "--only-summary",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            env=_env(),
            cwd=ROOT,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = _stats(prefix)
    assert int(rows["digits_vote"]["Request Count"]) > 100
    assert rows["digits_vote"]["Failure Count"] == "0"
