"""FP32 vs INT8 vs FP16 MiniLM encoder on CPU: latency, throughput, file size, cosine vs FP32.

Builds the three artifacts exactly as ``tritonforge.examples.build_minilm`` does (FP16 with onnxruntime's own
converter, inputs/outputs kept FP32), then times each in-process with onnxruntime at batch 1/16/64 and
sequence 32/128 (real sentences, padded to the length), in the two layouts a server can use on this CPU:

- *latency*: one session using every core for each call (intra-op threads), one call at a time;
- *throughput*: one single-threaded session per core, all running at once (Triton's instance group
  ``count: N`` with ``intra_op_thread_count: 1``): sentences per second with every core busy.

A model's throughput is the better of the two layouts (FP32's is the same in both on 2 cores; INT8's
matrix products are short enough that splitting each across cores costs more than it gains). Calls are
interleaved model by model, and the best round is reported (with the median beside it): on a shared
machine it is the figure other work disturbs least.

    python benchmarks/quantization.py [--rounds 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tritonforge.examples import build_minilm, minilm  # noqa: E402

BATCHES = (1, 16, 64)
SEQUENCES = (32, 128)


def build_artifacts(work: Path) -> dict[str, Path]:
    from tritonforge.quantize import Tolerance, to_fp16

    held = build_minilm.holdout()
    fp32 = build_minilm.export_fp32(minilm.load_encoder(), work, held)
    int8 = build_minilm.quantize_int8(fp32.path, work, held)
    fp16 = to_fp16(
        fp32.path,
        work / "fp16.onnx",
        holdout=held,
        mask_input="attention_mask",
        tolerance=Tolerance(min_cosine_mean=0.99),
    )
    return {"FP32": fp32.path, "INT8": int8.path, "FP16": fp16.path}


def sentence_cosines(models: dict[str, Path]) -> dict[str, tuple[float, float]]:
    held = build_minilm.holdout()
    out = {}
    for name, path in models.items():
        report = build_minilm.sentence_report(models["FP32"], path, held)
        out[name] = (report.cosine_mean, report.cosine_min)
    return out


def time_models(
    models: dict[str, Path], rounds: int, threads: int
) -> dict[tuple[str, int, int], tuple[float, float]]:
    """(best, median) seconds per batch for each (model, batch, sequence).

    Calls are interleaved one by one (FP32, INT8, FP16, FP32, ...), so a burst of load from elsewhere hits
    every model alike; the best call is the figure least disturbed by other work (as ``timeit`` does),
    the median is shown beside it.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    sessions = {
        n: ort.InferenceSession(str(p), sess_options=options, providers=["CPUExecutionProvider"])
        for n, p in models.items()
    }
    texts = minilm.sentences(256, seed=3)
    out: dict[tuple[str, int, int], tuple[float, float]] = {}
    for batch in BATCHES:
        for seq in SEQUENCES:
            feeds = minilm.encode((texts * 2)[:batch], max_length=seq, pad_to=seq)
            for session in sessions.values():
                session.run(None, feeds)  # warm up
            calls = rounds * max(1, 64 // batch) * (2 if seq == 32 else 1)
            samples: dict[str, list[float]] = {n: [] for n in sessions}
            for _ in range(calls):
                for name, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, feeds)
                    samples[name].append(time.perf_counter() - start)
            for name, times in samples.items():
                out[(name, batch, seq)] = (min(times), statistics.median(times))
    return out


def throughput_models(
    models: dict[str, Path], rounds: int, workers: int
) -> dict[tuple[str, int, int], tuple[float, float]]:
    """(best, median) sentences/s for each (model, batch, sequence) with ``workers`` single-threaded
    sessions running side by side (onnxruntime releases the GIL while it runs)."""
    import threading

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    sessions = {
        n: [
            ort.InferenceSession(str(p), sess_options=options, providers=["CPUExecutionProvider"])
            for _ in range(workers)
        ]
        for n, p in models.items()
    }
    texts = minilm.sentences(256, seed=3)
    out: dict[tuple[str, int, int], tuple[float, float]] = {}
    for batch in BATCHES:
        for seq in SEQUENCES:
            feeds = minilm.encode((texts * 2)[:batch], max_length=seq, pad_to=seq)
            calls = max(1, 32 // batch) * (2 if seq == 32 else 1)
            for group in sessions.values():
                for session in group:
                    session.run(None, feeds)  # warm up
            rates: dict[str, list[float]] = {n: [] for n in sessions}

            def work(session: Any, feeds: dict[str, Any] = feeds, calls: int = calls) -> None:
                for _ in range(calls):
                    session.run(None, feeds)

            for _ in range(rounds):
                for name, group in sessions.items():
                    threads = [threading.Thread(target=work, args=(s,)) for s in group]
                    start = time.perf_counter()
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    rates[name].append(workers * calls * batch / (time.perf_counter() - start))
            for name, values in rates.items():
                out[(name, batch, seq)] = (max(values), statistics.median(values))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    parser.add_argument("--keep", type=Path, help="keep the built models here and reuse them next time")
    parser.add_argument("--batch", type=int, action="append", help="only these batch sizes (repeatable)")
    parser.add_argument("--seq", type=int, action="append", help="only these sequence lengths (repeatable)")
    args = parser.parse_args(argv)
    global BATCHES, SEQUENCES
    BATCHES = tuple(args.batch or BATCHES)
    SEQUENCES = tuple(args.seq or SEQUENCES)
    from _common import wide_console  # benchmarks/ is on sys.path
    from rich.table import Table

    console = wide_console()  # names unbroken when piped
    with tempfile.TemporaryDirectory(prefix="tritonforge-bench-") as scratch:
        work = args.keep or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        cached = {"FP32": work / "fp32.onnx", "INT8": work / "int8.onnx", "FP16": work / "fp16.onnx"}
        if args.keep and all(p.is_file() for p in cached.values()):
            models = cached
        else:
            with console.status("building FP32, INT8 and FP16 encoders ..."):
                models = build_artifacts(work)
        sizes = {n: p.stat().st_size for n, p in models.items()}
        with console.status("cosine similarity of sentence embeddings vs FP32 (256 held-out sentences) ..."):
            cosines = sentence_cosines(models)
        with console.status(f"timing one call at a time ({args.rounds} rounds) ..."):
            seconds = time_models(models, args.rounds, args.threads)
        workers = os.cpu_count() or 1
        with console.status(f"throughput, {workers} single-threaded sessions at once ..."):
            parallel = throughput_models(models, args.rounds, workers)
    summary = Table(title=f"MiniLM-L6 encoder variants (CPU, {os.cpu_count()} cores)")
    for column in ("model", "file MB", "size vs FP32", "cosine mean", "cosine min"):
        summary.add_column(column, justify="right")
    for name in models:
        summary.add_row(
            name,
            f"{sizes[name] / 1e6:.1f}",
            f"{sizes[name] / sizes['FP32']:.1%}",
            f"{cosines[name][0]:.4f}",
            f"{cosines[name][1]:.4f}",
        )
    console.print(summary)
    table = Table(
        title="latency layout: one call at a time on every core — best ms/batch (median), sentences/s"
    )
    for column in (
        "batch",
        "seq",
        *(f"{n} ms" for n in models),
        *(f"{n} /s" for n in models),
        *(f"{n} ratio" for n in models if n != "FP32"),
    ):
        table.add_column(column, justify="right")
    for batch in BATCHES:
        for seq in SEQUENCES:
            best = {n: seconds[(n, batch, seq)][0] for n in models}
            median = {n: seconds[(n, batch, seq)][1] for n in models}
            table.add_row(
                str(batch),
                str(seq),
                *(f"{best[n] * 1e3:.1f} ({median[n] * 1e3:.0f})" for n in models),
                *(f"{batch / best[n]:.0f}" for n in models),
                *(f"{best['FP32'] / best[n]:.2f}x" for n in models if n != "FP32"),
            )
    console.print(table)
    table = Table(
        title=f"throughput: sentences/s, the better of the latency layout and {workers} single-threaded "
        "sessions at once (best round, median); ratio = vs FP32's best"
    )
    for column in (
        "batch",
        "seq",
        *(f"{n} 1x{workers}" for n in models),
        *(f"{n} {workers}x1" for n in models),
        *(f"{n} ratio" for n in models if n != "FP32"),
    ):
        table.add_column(column, justify="right")
    for batch in BATCHES:
        for seq in SEQUENCES:
            single = {n: batch / seconds[(n, batch, seq)][0] for n in models}
            split = {n: parallel[(n, batch, seq)] for n in models}
            top = {n: max(single[n], split[n][0]) for n in models}
            table.add_row(
                str(batch),
                str(seq),
                *(f"{single[n]:.0f}" for n in models),
                *(f"{split[n][0]:.0f} ({split[n][1]:.0f})" for n in models),
                *(f"{top[n] / top['FP32']:.2f}x" for n in models if n != "FP32"),
            )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
