"""Structured pruning of the digits MLP: file size, parameters, accuracy and CPU latency, full vs pruned.

Trains a 64-256-128-10 MLP on scikit-learn's digits (1400 train / 397 test), exports it to ONNX, then
prunes 50 % and 75 % of every hidden layer's neurons (with a short fine-tune) and exports those, each
judged by the tolerance gate against the full model. Latency is timed in-process with onnxruntime (one
thread), calls interleaved model by model, at batch 1 and 256; the best round is reported with the
median beside it (the figure other work on a shared machine disturbs least, as ``timeit`` does).

    python benchmarks/pruning.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _common import wide_console  # benchmarks/ is on sys.path
from rich.table import Table
from sklearn.datasets import load_digits

from tritonforge.export import export_onnx, export_pruned_onnx


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """``steps`` full-batch Adam steps of cross-entropy, then eval mode."""
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
    model.eval()


def digits_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 64-256-128-10 MLP trained on digits (seed 0): ``(model, x, y, train rows, test rows)``."""
    torch.manual_seed(0)
    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x))
    train_rows, test_rows = order[:1400], order[1400:]
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 10),
    )
    train(model, x[train_rows], y[train_rows], 200)
    return model, x, y, train_rows, test_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, x, y, train_rows, test_rows = digits_mlp()
    console = wide_console()  # names unbroken when piped
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        full = export_onnx(
            model, x[test_rows][:4], Path(work) / "full.onnx", input_names=["x"], output_names=["logits"]
        )
        rows["full"] = (full.path, None)
        for amount in (0.5, 0.75):
            artifact = export_pruned_onnx(
                model,
                x[test_rows][:4],
                Path(work) / f"pruned{int(amount * 100)}.onnx",
                amount=amount,
                holdout=x[test_rows],
                labels=y[test_rows].numpy(),
                input_names=["x"],
                output_names=["logits"],
                finetune=lambda m: train(m, x[train_rows], y[train_rows], 150),
            )
            rows[f"pruned {int(amount * 100)}%"] = (artifact.path, artifact)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions = {
            n: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"])
            for n, (p, _) in rows.items()
        }
        test_x = x[test_rows].numpy()
        timings: dict[tuple[str, int], list[float]] = {}
        for batch in (1, 256):
            feeds = {"x": np.ascontiguousarray(np.resize(test_x, (batch, 64)))}
            for s in sessions.values():
                s.run(None, feeds)
            calls = 2000 if batch == 1 else 200
            for _ in range(args.rounds):
                for name, session in sessions.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        session.run(None, feeds)
                    timings.setdefault((name, batch), []).append((time.perf_counter() - start) / calls * 1e6)
        table = Table(title=f"digits MLP, full vs pruned ({args.rounds} rounds; best / median us per call)")
        for column in (
            "model",
            "hidden",
            "params",
            "file KB",
            "test accuracy",
            "gate",
            "batch 1 us",
            "batch 256 us",
        ):
            table.add_column(column, justify="left" if column in ("model", "hidden", "gate") else "right")
        for name, (path, artifact) in rows.items():
            logits = sessions[name].run(None, {"x": test_x})[0]
            accuracy = float((logits.argmax(1) == y[test_rows].numpy()).mean())
            import onnx

            inits = onnx.load(str(path)).graph.initializer
            params = sum(int(np.prod(t.dims)) for t in inits)
            hidden = "-".join(str(t.dims[0]) for t in inits if len(t.dims) == 1)
            gate = "" if artifact is None else ("passed" if artifact.passed else "FAILED")
            cells = []
            for batch in (1, 256):
                values = timings[(name, batch)]
                cells.append(f"{min(values):.1f} / {statistics.median(values):.1f}")
            table.add_row(
                name,
                hidden,
                str(params),
                f"{path.stat().st_size / 1024:.1f}",
                f"{accuracy:.4f}",
                gate,
                *cells,
            )
        console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
