"""What serving through the embedded Triton costs against in-process onnxruntime, same model and input.

The model is the real digits MLP (trained on scikit-learn's digits, exported to ONNX). It is served twice
from one repository: with Triton's dynamic batcher and without (same max_batch_size, one instance each).
Each is driven by closed-loop gRPC clients (tritonclient.grpc.aio, batch-1 requests) at concurrency 1 and 16;
the baseline is an onnxruntime session in this process answering the same batch-1 input from as many threads.
Figures are ratios against that baseline in the same run (these machines are noisy).

    python benchmarks/backend_overhead.py [--duration-s 5] [--concurrency 1,16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _common import summary, wide_console  # benchmarks/ is on sys.path when a script runs
from rich.table import Table

from tritonforge.config import DynamicBatching, read_config
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer


def build_repository(root: Path) -> tuple[Path, np.ndarray]:
    import torch

    from tritonforge.examples.demo import _train
    from tritonforge.export import to_onnx

    model, _, x_test, _, _ = _train()
    onnx_file = to_onnx(
        model,
        torch.from_numpy(x_test[:4]),
        root / "src" / "model.onnx",
        input_names=["pixels"],
        output_names=["probs"],
    )
    repo = root / "repo"
    add_model(repo, "digits_batched", onnx_file, max_batch_size=64)
    add_model(repo, "digits_unbatched", onnx_file, max_batch_size=64, dynamic_batching=False)
    config = read_config(repo / "digits_batched" / "config.pbtxt")
    assert config.dynamic_batching == DynamicBatching()
    return onnx_file, x_test[:1].copy()


def in_process(onnx_file: Path, x: np.ndarray, concurrency: int, duration_s: float) -> list[float]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    stop_at = time.perf_counter() + duration_s

    def worker(i: int) -> None:
        own = latencies[i]
        while True:
            start = time.perf_counter()
            if start > stop_at:
                return
            session.run(["probs"], {"pixels": x})
            own.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [v for own in latencies for v in own]


async def through_triton(
    url: str, model: str, x: np.ndarray, concurrency: int, duration_s: float
) -> list[float]:
    import tritonclient.grpc.aio as aioclient
    from tritonclient.grpc import InferInput

    client = aioclient.InferenceServerClient(url)
    item = InferInput("pixels", list(x.shape), "FP32")
    item.set_data_from_numpy(x)
    latencies: list[float] = []
    try:
        for _ in range(20):  # warm the channel and the model
            await client.infer(model, [item])
        stop_at = time.perf_counter() + duration_s

        async def worker() -> None:
            while True:
                start = time.perf_counter()
                if start > stop_at:
                    return
                await client.infer(model, [item])
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    finally:
        await client.close()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    console = wide_console()  # names unbroken when piped
    root = Path(tempfile.mkdtemp(prefix="tritonforge-bench-"))
    rows: list[dict[str, object]] = []
    try:
        with console.status("training and exporting the digits MLP ..."):
            onnx_file, x = build_repository(root)
        with console.status("starting the embedded Triton server ..."):
            server = EmbeddedServer(root / "repo").start()
        try:
            for concurrency in levels:
                with console.status(f"in-process onnxruntime, concurrency {concurrency} ..."):
                    base = summary(in_process(onnx_file, x, concurrency, args.duration_s), args.duration_s)
                rows.append(
                    {"path": "onnxruntime in-process", "concurrency": concurrency, **base, "ratio": 1.0}
                )
                for model, label in (
                    ("digits_batched", "Triton, dynamic batching"),
                    ("digits_unbatched", "Triton, no batching"),
                ):
                    with console.status(f"{label}, concurrency {concurrency} ..."):
                        lat = asyncio.run(
                            through_triton(server.grpc_url, model, x, concurrency, args.duration_s)
                        )
                    figures = summary(lat, args.duration_s)
                    rows.append(
                        {
                            "path": label,
                            "concurrency": concurrency,
                            **figures,
                            "ratio": figures["throughput"] / base["throughput"],
                        }
                    )
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = Table(
        title=f"backend overhead: digits MLP (ONNX), batch-1 requests, {args.duration_s:.0f} s windows"
    )
    for column in ("path", "concurrency", "infer/s", "p50 ms", "p99 ms", "throughput vs in-process"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for r in rows:
        table.add_row(
            str(r["path"]),
            str(r["concurrency"]),
            f"{r['throughput']:.0f}",
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['ratio']:.3f}x",
        )
    console.print(table)
    for concurrency in levels:
        by = {r["path"]: r for r in rows if r["concurrency"] == concurrency}
        gain = by["Triton, dynamic batching"]["throughput"] / by["Triton, no batching"]["throughput"]  # type: ignore[operator]
        console.print(
            f"concurrency {concurrency}: dynamic batching gives {gain:.2f}x the throughput of no batching"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
