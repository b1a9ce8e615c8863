"""The main job, end to end, on real data: build, serve, run the example pipelines, report.

``run_main_job`` builds the example repository (``tritonforge build``: the digits classifiers, the MiniLM
encoder in FP32 and INT8, the pipelines of ``ensembles/``), runs the pipelines on the embedded server
(:mod:`tritonforge.examples.pipelines_demo`), then ``run_frameworks_demo`` serves one model from two
frameworks:

A small MLP is trained on scikit-learn's bundled digits (8x8 images, 10 classes), exported to ONNX and to
TorchScript, laid out as a Triton repository with dynamic batching, and served by the embedded Triton server.
The whole test split is then sent one image per request from several threads, so Triton's dynamic batcher
groups them; the report compares Triton's answers with the model run in-process.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tritonforge.config import DataType, DynamicBatching, InstanceGroup, InstanceKind, ModelConfig, TensorSpec
from tritonforge.repository import add_model, pytorch_thread_parameters

__all__ = ["DemoResult", "run_frameworks_demo", "run_main_job"]

CONCURRENCY = 8


@dataclass
class DemoResult:
    model: str
    requests: int
    accuracy_triton: float
    accuracy_local: float
    max_abs_diff: float
    executions: int
    inferences: int
    p50_ms: float
    p99_ms: float


def _train(seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=seed, stratify=digits.target
    )
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10), torch.nn.Softmax(dim=-1)
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train.astype(np.int64))
    for _ in range(200):
        optimiser.zero_grad()
        loss = torch.nn.functional.nll_loss(torch.log(model(xt) + 1e-9), yt)
        loss.backward()
        optimiser.step()
    return model.eval(), x_train, x_test, y_train, y_test


def build_demo_repository(repo: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """Train the digits MLP and write it into ``repo`` as ONNX and TorchScript models."""
    import torch

    from tritonforge.export import to_onnx, to_torchscript

    model, _, x_test, _, y_test = _train()
    work = Path(tempfile.mkdtemp(prefix="tritonforge-demo-"))
    try:
        example = torch.from_numpy(x_test[:4])
        onnx_file = to_onnx(
            model, example, work / "model.onnx", input_names=["pixels"], output_names=["probs"]
        )
        add_model(
            repo,
            "digits_mlp_onnx",
            onnx_file,
            max_batch_size=64,
            max_queue_delay_us=2000,
            manifest={"dataset": "sklearn digits", "trained_by": "tritonforge demo"},
        )
        ts_file = to_torchscript(model, example, work / "model.pt")
        ts_config = ModelConfig(
            name="digits_mlp_torch",
            platform="pytorch_libtorch",
            max_batch_size=64,
            inputs=(TensorSpec(name="INPUT__0", dtype=DataType.FP32, dims=(64,)),),
            outputs=(TensorSpec(name="OUTPUT__0", dtype=DataType.FP32, dims=(10,)),),
            dynamic_batching=DynamicBatching(max_queue_delay_us=2000),
            instance_groups=(InstanceGroup(count=1, kind=InstanceKind.CPU),),
            parameters=pytorch_thread_parameters(),
        )
        add_model(
            repo,
            "digits_mlp_torch",
            ts_file,
            ts_config,
            manifest={"dataset": "sklearn digits", "trained_by": "tritonforge demo"},
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return model, x_test, y_test


def _serve_and_measure(
    server: Any,
    name: str,
    input_name: str,
    output_name: str,
    x: np.ndarray,
    y: np.ndarray,
    local: np.ndarray,
    progress: Progress,
) -> DemoResult:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    task = progress.add_task(f"{name}: {len(x)} requests", total=len(x))
    latencies: list[float] = [0.0] * len(x)
    probs = np.zeros_like(local)

    def one(i: int) -> None:
        infer_input = grpcclient.InferInput(input_name, [1, x.shape[1]], "FP32")
        infer_input.set_data_from_numpy(x[i : i + 1])
        start = time.perf_counter()
        result = client.infer(name, [infer_input])
        latencies[i] = (time.perf_counter() - start) * 1e3
        probs[i] = result.as_numpy(output_name)[0]
        progress.advance(task)

    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, range(len(x))))
        stats = client.get_inference_statistics(name, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return DemoResult(
        model=name,
        requests=len(x),
        accuracy_triton=float(np.mean(probs.argmax(1) == y)),
        accuracy_local=float(np.mean(local.argmax(1) == y)),
        max_abs_diff=float(np.max(np.abs(probs - local))),
        executions=int(stats.get("execution_count", 0)),
        inferences=int(stats.get("inference_count", 0)),
        p50_ms=float(np.percentile(latencies, 50)),
        p99_ms=float(np.percentile(latencies, 99)),
    )


def run_main_job(
    console: Console, repo: Path, *, build: bool = True, frameworks: bool = True, limit: int | None = None
) -> None:
    """Build the example repository into ``repo`` (from any folder), run its pipelines, and the
    frameworks demo.

    Raises:
        RepositoryError: the build failed (the repository keeps its previous versions).
    """
    import subprocess
    import sys

    from tritonforge.errors import RepositoryError
    from tritonforge.examples.pipelines_demo import run_pipelines_demo

    if build:
        console.rule("tritonforge build (unchanged models are skipped)")
        command = [sys.executable, "-m", "tritonforge", "build", "--repo", str(repo)]
        done = subprocess.run(command, check=False)
        if done.returncode:
            raise RepositoryError(f"tritonforge build failed (exit {done.returncode}); see its output above")
    if not Path(repo).is_dir():
        raise RepositoryError(f"no repository at {repo}: build it first (tritonforge build)")
    console.rule("the example pipelines on the embedded Triton server")
    run_pipelines_demo(console, Path(repo))
    if frameworks:
        console.rule("one model, two frameworks: ONNX and TorchScript side by side")
        run_frameworks_demo(console, limit=limit)


def run_frameworks_demo(
    console: Console, *, repo: Path | None = None, limit: int | None = None
) -> list[DemoResult]:
    """Train the digits MLP, serve it as ONNX and TorchScript, print a result table; returns the figures."""
    import torch

    from tritonforge.server import EmbeddedServer

    own_repo = repo is None
    root = Path(tempfile.mkdtemp(prefix="tritonforge-demo-repo-")) if repo is None else Path(repo)
    try:
        with console.status(
            "training an MLP on scikit-learn's digits, exporting to ONNX and TorchScript ..."
        ):
            model, x_test, y_test = build_demo_repository(root)
        if limit:
            x_test, y_test = x_test[:limit], y_test[:limit]
        with torch.inference_mode():
            local = model(torch.from_numpy(x_test)).numpy()
        console.print(f"repository built at {root}: " + ", ".join(sorted(p.name for p in root.iterdir())))
        with console.status("starting the embedded Triton server ..."):
            server = EmbeddedServer(root).start()
        try:
            console.print(f"Triton is serving on {server.grpc_url} (gRPC)")
            with Progress(console=console, transient=True) as progress:
                results = [
                    _serve_and_measure(
                        server, "digits_mlp_onnx", "pixels", "probs", x_test, y_test, local, progress
                    ),
                    _serve_and_measure(
                        server, "digits_mlp_torch", "INPUT__0", "OUTPUT__0", x_test, y_test, local, progress
                    ),
                ]
        finally:
            server.stop()
    finally:
        if own_repo:
            shutil.rmtree(root, ignore_errors=True)
    table = Table(
        title=f"digits test split through Triton ({CONCURRENCY} concurrent clients, 1 image/request)"
    )
    for column in (
        "model",
        "requests",
        "acc Triton",
        "acc local",
        "max |Δp|",
        "batches",
        "mean batch",
        "p50 ms",
        "p99 ms",
    ):
        table.add_column(column, justify="right" if column != "model" else "left")
    for r in results:
        table.add_row(
            r.model,
            str(r.requests),
            f"{r.accuracy_triton:.4f}",
            f"{r.accuracy_local:.4f}",
            f"{r.max_abs_diff:.2e}",
            str(r.executions),
            f"{r.inferences / max(r.executions, 1):.2f}",
            f"{r.p50_ms:.2f}",
            f"{r.p99_ms:.2f}",
        )
    console.print(table)
    return results
