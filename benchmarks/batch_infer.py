"""batch-infer against the loop a user would write, and against perf_analyzer, on the same model and server.

The digits MLP (tritonforge.examples.build_digits) on the embedded Triton server; the digits test split
repeated to ``--rows`` rows as Parquet. In alternating rounds:

- **batch-infer**: ``tritonforge.batch.run_batch`` over every row (requests of the model's max batch,
  ``--concurrency`` in flight, Parquet shards written), its outputs checked against onnxruntime in-process;
- **naive loop**: the sync ``Client``, one row per call, over the first ``--naive-rows`` rows;
- **thread pool**: the same calls from ``--threads`` threads sharing one ``Client``;

then NVIDIA's perf_analyzer (C++; on PATH, ``$PERF_ANALYZER``, or ``../shared/tools/perf_analyzer`` next to
the project; the column is skipped when absent) at the same batch size over concurrency 1..16, its best
inferences/s. Rows per second: median of the rounds, with min-max; ratios are taken per round.

``--text`` instead runs the text pipeline (``text_embedding`` ensemble: tokenizer -> MiniLM -> pooling) from
a built repository (``tritonforge build``) over ``--sentences`` sentences and compares the embeddings with
the same pipeline in-process (cosine).

    python benchmarks/batch_infer.py --rows 20000 --rounds 3          # quick
    python benchmarks/batch_infer.py --rows 1000000 --rounds 1        # the full-size run
    python benchmarks/batch_infer.py --text --repo model_repository --sentences 3000

Figures from a shared machine are noisy; re-measure on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import find_perf_analyzer  # noqa: E402  (beside this file, not a package)


def perf_analyzer_best(
    exe: str, url: str, model: str, batch: int, seconds: float
) -> tuple[float, int] | None:
    """perf_analyzer's best inferences/s (and the concurrency that gave it) at batch ``batch``."""
    best: tuple[float, int] | None = None
    for concurrency in (1, 2, 4, 8, 16):
        args = [
            exe,
            "-m",
            model,
            "-u",
            url,
            "-i",
            "grpc",
            "-b",
            str(batch),
            "--shape",
            "input:64",
            "--concurrency-range",
            f"{concurrency}:{concurrency}",
            "-p",
            str(int(seconds * 1000)),
            "--max-trials",
            "6",
            "--stability-percentage",
            "50",
        ]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            print(f"perf_analyzer failed at concurrency {concurrency}: {proc.stderr.strip()[-300:]}")
            continue
        found = re.findall(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", proc.stdout)
        if found:
            value = float(found[-1])
            if best is None or value > best[0]:
                best = (value, concurrency)
    return best


def write_dataset(x: np.ndarray, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"input": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 64)}),
        path,
        row_group_size=65_536,
    )


def in_process_labels(repo: Path, model: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(x), 65_536):
        out.append(session.run(["label"], {"input": x[i : i + 65_536]})[0])
    return np.concatenate(out)


def naive(url: str, model: str, x: np.ndarray) -> float:
    from tritonforge.client import Client

    with Client(url) as client:
        client.infer(model, {"input": x[:1]})
        t0 = time.perf_counter()
        for row in x:
            client.infer(model, {"input": row[None]})
        return len(x) / (time.perf_counter() - t0)


def thread_pool(url: str, model: str, x: np.ndarray, threads: int) -> float:
    from tritonforge.client import Client

    with Client(url) as client, ThreadPoolExecutor(threads) as pool:
        client.infer(model, {"input": x[:1]})
        t0 = time.perf_counter()
        list(pool.map(lambda row: client.infer(model, {"input": row[None]}), x))
        return len(x) / (time.perf_counter() - t0)


def digits(args: argparse.Namespace) -> None:
    from tritonforge.batch import read_outputs, run_batch
    from tritonforge.examples import build_digits
    from tritonforge.server import EmbeddedServer

    work = Path(tempfile.mkdtemp(prefix="tf-batch-bench-"))
    try:
        repo = args.repo or work / "repo"
        if args.repo is None:
            build_digits.build(repo, kinds=("mlp",))
        _, x_test, _, _ = build_digits.digits_split()
        x = np.resize(x_test.astype(np.float32), (args.rows, 64))
        data = work / "digits.parquet"
        write_dataset(x, data)
        want = in_process_labels(repo, args.model, x)
        exe = None if args.no_perf_analyzer else find_perf_analyzer()
        with EmbeddedServer(repo, load_models=[args.model], model_control="explicit") as server:
            url = server.grpc_url
            rounds: dict[str, list[float]] = {
                "batch-infer": [],
                "naive loop": [],
                f"thread pool ({args.threads})": [],
            }
            batch_size = None
            for r in range(args.rounds):
                out = work / f"out-{r}"
                result = run_batch(
                    args.model,
                    url,
                    data,
                    out,
                    concurrency=args.concurrency,
                    shard_rows=args.shard_rows,
                    max_errors=0,
                )
                got = read_outputs(out).column("label").to_numpy()
                assert result.exit_code == 0 and np.array_equal(got, want), "outputs differ from in-process"
                shutil.rmtree(out)
                rounds["batch-infer"].append(result.rows_per_s)
                rounds["naive loop"].append(naive(url, args.model, x[: args.naive_rows]))
                rounds[f"thread pool ({args.threads})"].append(
                    thread_pool(url, args.model, x[: args.naive_rows], args.threads)
                )
                print(
                    f"round {r + 1}: "
                    + ", ".join(f"{k} {v[-1]:,.0f} rows/s" for k, v in rounds.items())
                    + f" (batch-infer p50 {result.latencies_ms['p50']:.1f} ms, "
                    f"p99 {result.latencies_ms['p99']:.1f} ms "
                    f"per request; {result.requests} requests)"
                )
                batch_size = round((result.rows_ok) / max(1, result.requests))
            pa_best = (
                perf_analyzer_best(exe, url, args.model, batch_size or 64, args.pa_seconds) if exe else None
            )
        print(
            f"\n{args.model}, {args.rows:,} rows (naive loops over {args.naive_rows:,}); outputs equal to "
            f"onnxruntime in-process in every round; perf_analyzer: {exe or 'ABSENT (not measured)'}"
        )
        header = f"{'method':<22} {'rows/s (median)':>16} {'min':>10} {'max':>10} {'batch-infer vs it':>18}"
        print(header)
        print("-" * len(header))
        bi = rounds["batch-infer"]
        for name, values in rounds.items():
            ratio = statistics.median(b / v for b, v in zip(bi, values, strict=True))
            print(
                f"{name:<22} {statistics.median(values):>16,.0f} {min(values):>10,.0f} {max(values):>10,.0f} "
                f"{ratio:>17.2f}x"
            )
        if pa_best is not None:
            print(
                f"{'perf_analyzer best':<22} {pa_best[0]:>16,.0f} {'':>10} {'':>10} "
                f"{statistics.median(bi) / pa_best[0]:>17.2f}x  "
                f"(batch {batch_size}, concurrency {pa_best[1]})"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def text(args: argparse.Namespace) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tritonforge.batch import read_outputs, run_batch
    from tritonforge.examples import minilm
    from tritonforge.examples.pipelines_demo import _text_in_process
    from tritonforge.server import EmbeddedServer

    if args.repo is None:
        raise SystemExit("--text needs --repo: a repository built by `tritonforge build`")
    work = Path(tempfile.mkdtemp(prefix="tf-batch-text-"))
    try:
        sentences = minilm.sentences(args.sentences)
        pq.write_table(pa.table({"TEXT": sentences}), work / "sentences.parquet")
        with EmbeddedServer(args.repo) as server:
            result = run_batch(
                "text_embedding",
                server.grpc_url,
                work / "sentences.parquet",
                work / "out",
                concurrency=args.concurrency,
                batch_size=16,
                max_errors=0,
            )
        got = np.stack(read_outputs(work / "out").column("EMBEDDING").to_numpy(zero_copy_only=False))
        local = np.concatenate(
            [_text_in_process(args.repo, sentences[i : i + 64]) for i in range(0, len(sentences), 64)]
        )
        cos = np.sum(got * local, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(local, axis=1)
        print(
            f"text_embedding over {len(sentences):,} sentences: {result.rows_per_s:,.1f} rows/s, "
            f"{result.rows_failed} failed; vs in-process cosine min {cos.min():.6f}, mean {cos.mean():.6f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--naive-rows", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--shard-rows", type=int, default=50_000)
    parser.add_argument("--model", default="digits_mlp")
    parser.add_argument("--repo", type=Path, default=None, help="an existing repository (default: build one)")
    parser.add_argument("--pa-seconds", type=float, default=2.0, help="perf_analyzer measurement window")
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument("--text", action="store_true", help="the text pipeline instead of digits")
    parser.add_argument("--sentences", type=int, default=3000)
    args = parser.parse_args()
    (text if args.text else digits)(args)


if __name__ == "__main__":
    main()
