"""Session-wide real Triton server over a repository of tiny real models (built once per session).

The suite runs on parallel workers (pytest-xdist, ``-n``/``--dist`` in pyproject's addopts): a session
fixture runs once per worker, so what is slow to build and only read afterwards (the example repository)
is built once per run through ``shared_build``, under a file lock in the run's shared temp folder.
Whatever a test changes stays per worker or per test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from filelock import FileLock

import tiny_models
from tiny_models import spec as _spec
from tritonforge.config import (
    DataType,
    DynamicBatching,
    InstanceGroup,
    InstanceKind,
    ModelConfig,
)
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer


def build_test_repository(root: Path) -> Path:
    work = root / "_src"
    repo = root / "repo"
    batching = DynamicBatching(max_queue_delay_us=20_000, preferred_batch_sizes=(8, 16))
    # mlp: inferred config (the path users take), with a queue delay so concurrent requests are batched
    add_model(
        repo, "mlp", tiny_models.mlp_onnx(work / "mlp.onnx"), max_batch_size=32, max_queue_delay_us=20_000
    )
    dtypes = tiny_models.dtypes_config()
    add_model(repo, "dtypes", tiny_models.dtypes_onnx(work / "dtypes.onnx"), dtypes)
    fixed = ModelConfig(
        name="fixed",
        platform="onnxruntime_onnx",
        max_batch_size=0,
        inputs=(_spec("a", DataType.FP32, (2, 3)),),
        outputs=(_spec("b", DataType.FP32, (3, 2)),),
    )
    add_model(repo, "fixed", tiny_models.fixed_onnx(work / "fixed.onnx"), fixed)
    tiny_models.add_lookup(
        repo,
        work,
        dynamic_batching=DynamicBatching(max_queue_delay_us=50_000),
        instance_groups=(InstanceGroup(count=2, kind=InstanceKind.CPU),),
        parameters={"intra_op_thread_count": "1"},
    )
    # same model, a 4-thread intra-op pool: the thread-count parameter must reach onnxruntime
    tiny_models.add_lookup(
        repo,
        work,
        "lookup_4threads",
        dynamic_batching=DynamicBatching(max_queue_delay_us=50_000),
        instance_groups=(InstanceGroup(count=1, kind=InstanceKind.CPU),),
        parameters={"intra_op_thread_count": "4"},
    )
    # two outputs, requests naming one, the other or both are batched together
    two = ModelConfig(
        name="two_outputs",
        platform="onnxruntime_onnx",
        max_batch_size=16,
        inputs=(_spec("x", DataType.FP32, (4,)),),
        outputs=(_spec("double", DataType.FP32, (4,)), _spec("total", DataType.FP32, (1,))),
        dynamic_batching=DynamicBatching(max_queue_delay_us=50_000),
        parameters={"intra_op_thread_count": "1"},
    )
    add_model(repo, "two_outputs", tiny_models.two_outputs_onnx(work / "two_outputs.onnx"), two)
    if _has_torch():
        affine = ModelConfig(
            name="affine_ts",
            platform="pytorch_libtorch",
            max_batch_size=32,
            inputs=(_spec("INPUT__0", DataType.FP32, (6,)),),
            outputs=(_spec("OUTPUT__0", DataType.FP32, (4,)),),
            dynamic_batching=batching,
            parameters={"INTRA_OP_THREAD_COUNT": "1"},
        )
        add_model(repo, "affine_ts", tiny_models.affine_torchscript(work / "affine.pt"), affine)
        named = ModelConfig(
            name="named_ts",
            platform="pytorch_libtorch",
            max_batch_size=8,
            inputs=(_spec("tokens", DataType.INT64, (-1,)), _spec("scale", DataType.FP32, (1,))),
            outputs=(_spec("OUTPUT__0", DataType.INT64, (1,)), _spec("OUTPUT__1", DataType.FP32, (-1,))),
            dynamic_batching=DynamicBatching(),
        )
        add_model(repo, "named_ts", tiny_models.named_torchscript(work / "named.pt"), named)
    return repo


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


PROJECT_ROOT = Path(__file__).resolve().parent.parent


def shared_build(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``name``'s folder, made by ``build(folder)`` once per run and read by every worker afterwards.

    On one process (``-n 0``) it is an ordinary session temp folder. Under xdist the first worker to ask
    builds it in the folder the workers' temp folders share (the run's, removed with it) while the others
    wait on the lock; a build that failed is not retried by each worker: they all fail with its message.
    Only for what the tests read and never change.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    run_root = tmp_path_factory.getbasetemp().parent
    folder, done, failed = run_root / name, run_root / f"{name}.done", run_root / f"{name}.failed"
    with FileLock(str(run_root / f"{name}.lock")):
        if failed.exists():
            pytest.fail(f"building the shared {name!r} failed on another worker:\n{failed.read_text()}")
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException as exc:
                failed.write_text(str(exc)[-6000:] or type(exc).__name__)
                raise
            done.touch()
    return folder


#: the most the example build may take (minutes on 2 cores; more while other workers run beside it)
EXAMPLE_BUILD_TIMEOUT_S = 1800


def _build_examples(folder: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "tritonforge", "build", "--repo", str(folder / "model_repository")],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=EXAMPLE_BUILD_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real example repository, built once per run by the real `tritonforge build` (slow). Read-only."""
    return shared_build(tmp_path_factory, "examples", _build_examples) / "model_repository"


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def server(model_repo: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(model_repo) as running:
        yield running


@pytest.fixture(scope="session")
def loadtest_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mlp``, ``scale`` and the ensemble ``pipe`` over them, for the load-test, sweep and locust tests.

    Read-only: a test that changes configs (the tuner) builds its own.
    """
    from test_loadtest_models import build_loadtest_repository

    return build_loadtest_repository(tmp_path_factory.mktemp("loadtest"))


@pytest.fixture(scope="session")
def loadtest_server(loadtest_repo: Path) -> Iterator[EmbeddedServer]:
    """One server over ``loadtest_repo`` for every module that only sends it requests."""
    with EmbeddedServer(loadtest_repo) as running:
        yield running


@pytest.fixture()
def grpc(server: EmbeddedServer) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def triton_infer(
    client: grpcclient.InferenceServerClient, model: str, inputs: dict[str, np.ndarray], **kwargs: Any
) -> dict[str, np.ndarray]:
    """One request through raw tritonclient (so these tests don't depend on our own client)."""
    from tritonclient.utils import np_to_triton_dtype

    infer_inputs = []
    for name, array in inputs.items():
        item = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        item.set_data_from_numpy(array)
        infer_inputs.append(item)
    result = client.infer(model, infer_inputs, **kwargs)
    response = result.get_response()
    return {out.name: result.as_numpy(out.name) for out in response.outputs}


def still_running(processes: list[Any]) -> list[Any]:
    """Those of ``processes`` (``psutil.Process``) still running: a zombie has ended, only its exit status
    is left, and one that ends while it is looked at has ended too."""
    import psutil

    left = []
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
    return left


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """Folder with Debian's `prometheus` and `promtool` (installed into a cache when not on PATH)."""
    from promserver import prometheus_bin as find

    return find()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long test files first, so that the parallel workers don't end waiting on one of them.

    A test that takes minutes says so with ``@pytest.mark.timeout(seconds)`` above the ini's timeout;
    its file runs first (longest first), then the files that read the example repository (its build is
    on their path), then the rest, more tests first. Files stay whole: one worker runs a file
    (``--dist loadfile``), so its module-scoped servers start once.
    """
    default = float(config.getini("timeout") or 0)
    count: dict[str, int] = {}
    for item in items:
        count[item.nodeid.split("::")[0]] = count.get(item.nodeid.split("::")[0], 0) + 1
    rank: dict[str, tuple[int, float]] = {}
    for item in items:
        file = item.nodeid.split("::")[0]
        marker = item.get_closest_marker("timeout")
        declared = float(marker.args[0]) if marker and marker.args else 0.0
        if declared > default:
            key = (0, -declared)
        elif "example_repo" in item.fixturenames:
            key = (1, 0.0)
        else:
            key = (2, float(-count[file]))
        rank[file] = min(rank.get(file, key), key)
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])
    # The example build runs in the setup of the first test that reads it (the other workers wait on its
    # lock), so those tests get the build's own bound, not the ini's per-test one.
    for item in items:
        marker = item.get_closest_marker("timeout")
        declared = float(marker.args[0]) if marker and marker.args else 0.0
        if "example_repo" in item.fixturenames and declared < EXAMPLE_BUILD_TIMEOUT_S:
            item.add_marker(pytest.mark.timeout(EXAMPLE_BUILD_TIMEOUT_S))
