"""batch-infer against the loop a user would write, and against perf_analyzer, on the same model and server.

The digits MLP (tritonforge.examples.build_digits) on the embedded Triton server; the digits test split
repeated to ``--rows`` rows as Parquet. After a warm-up run (not measured: imports, channel, pyarrow's
first use, as perf_analyzer warms up too) and one sweep of perf_analyzer over concurrency 1..16 at the
batch size batch-infer sends (the model's max batch) to find its best concurrency, each round runs, in
alternating order (ABBA):

- **batch-infer**: ``tritonforge.batch.run_batch`` over every row (requests of the model's max batch,
  ``--concurrency`` in flight, Parquet shards of ``--shard-rows`` written and committed), its outputs
  checked against onnxruntime in-process; rows/s end to end (startup included) and after startup;
- **client calls**: the same run with ``streams=False`` (every request a grpc.aio call of the
  ``AsyncClient``, as batch-infer sent them before its lanes had streams of their own; ``--no-calls`` skips);
- **perf_analyzer** (C++; on PATH, ``$PERF_ANALYZER``, or ``../shared/tools/perf_analyzer`` next to the
  project; skipped when absent) at that batch size and its best concurrency, ``--pa-window-ms`` windows;

then the **naive loop** (the sync ``Client``, one row per call, over the first ``--naive-rows`` rows) and the
**thread pool** (the same calls from ``--threads`` threads sharing one ``Client``). Printed: rows/s per round
and their median (min-max, ±half-range), batch-infer's ratios per round, batch-infer's startup, and CPU
per row — of batch-infer's whole process, of perf_analyzer's process, and of the server's process tree,
each divided by the rows the server answered meanwhile (contention barely moves these).

``--text`` instead runs the text pipeline (``text_embedding`` ensemble: tokenizer -> MiniLM -> pooling) from
a built repository (``tritonforge build``) over ``--sentences`` sentences and compares the embeddings with
the same pipeline in-process (cosine).

    python benchmarks/batch_infer.py --rows 200000 --rounds 5     # the default size; startup ~2% of it
    python benchmarks/batch_infer.py --rows 1000000 --rounds 3    # the full-size run
    python benchmarks/batch_infer.py --text --repo model_repository --sentences 3000

Figures from a shared machine are noisy; re-measure on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402  (beside this file, not a package)
    alternating,
    find_perf_analyzer,
    model_stats,
    run_perf_analyzer,
    tree_cpu_s,
)


def perf_analyzer_at(exe: str, url: str, model: str, batch: int, concurrency: int, window_ms: int) -> float:
    """perf_analyzer's inferences/s at ``batch`` and ``concurrency`` (gRPC; ``_common.run_perf_analyzer``).

    Raises:
        RuntimeError: perf_analyzer failed (its output's tail in the message).
    """
    return run_perf_analyzer(
        exe, url, model, concurrency, window_ms=window_ms, batch=batch, extra=("--shape", "input:64")
    )


def perf_analyzer_best(
    exe: str, url: str, model: str, batch: int, window_ms: int
) -> tuple[float, int] | None:
    """perf_analyzer's best inferences/s (and the concurrency giving it) at ``batch``, concurrency 1-16."""
    best: tuple[float, int] | None = None
    for concurrency in (1, 2, 4, 8, 16):
        try:
            value = perf_analyzer_at(exe, url, model, batch, concurrency, window_ms)
        except RuntimeError as exc:
            print(exc)
            continue
        print(f"  perf_analyzer batch {batch}, concurrency {concurrency}: {value:,.0f} inferences/s")
        if best is None or value > best[0]:
            best = (value, concurrency)
    return best


class Meter:
    """CPU seconds of this process, of its finished children (perf_analyzer) and of the server's process
    tree, and the rows the server has answered: taken before and after a measurement."""

    def __init__(self, server_pid: int, http_url: str, model: str) -> None:
        self.server_pid, self.http_url, self.model = server_pid, http_url, model

    def take(self) -> tuple[float, float, float, int]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        rows = int(model_stats(self.http_url, self.model)["inference_count"])
        return (
            me.ru_utime + me.ru_stime,
            kids.ru_utime + kids.ru_stime,
            tree_cpu_s(self.server_pid),
            rows,
        )

    @staticmethod
    def per_row_us(before: tuple[float, float, float, int], after: tuple[float, float, float, int]) -> dict:
        rows = max(1, after[3] - before[3])
        return {
            "self_us": (after[0] - before[0]) / rows * 1e6,
            "children_us": (after[1] - before[1]) / rows * 1e6,
            "server_us": (after[2] - before[2]) / rows * 1e6,
            "rows": rows,
        }


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
        write_dataset(x[:2_000], work / "warm.parquet")
        want = in_process_labels(repo, args.model, x)
        exe = None if args.no_perf_analyzer else find_perf_analyzer()
        with EmbeddedServer(repo, load_models=[args.model], model_control="explicit") as server:
            url = server.grpc_url
            assert server.pid is not None
            meter = Meter(server.pid, server.http_url, args.model)
            options = {"concurrency": args.concurrency, "shard_rows": args.shard_rows, "max_errors": 0}
            # warm-up, not measured (perf_analyzer warms up too): imports, the channel, pyarrow's first use
            started: dict = {}
            run_batch(
                args.model,
                url,
                work / "warm.parquet",
                work / "warm",
                on_event=lambda kind, data: started.update(data) if kind == "start" else None,
                **options,
            )
            shutil.rmtree(work / "warm")
            batch = int(started["batch_size"])  # what batch-infer sends: the model's max batch
            pa_concurrency = None
            if exe:
                print(f"perf_analyzer's best concurrency at batch {batch} ({args.pa_window_ms} ms windows):")
                best = perf_analyzer_best(exe, url, args.model, batch, args.pa_window_ms)
                pa_concurrency = best[1] if best else None
            names = (
                ["batch-infer"]
                + ([] if args.no_calls else ["client calls (streams=False)"])
                + (["perf_analyzer"] if pa_concurrency else [])
            )
            rounds: dict[str, list[float]] = {
                "batch-infer": [],
                "batch-infer steady": [],
                "client calls (streams=False)": [],
                "perf_analyzer": [],
                "naive loop": [],
                f"thread pool ({args.threads})": [],
            }
            cpu: dict[str, list[dict]] = {
                "batch-infer": [],
                "client calls (streams=False)": [],
                "perf_analyzer": [],
            }
            startup: list[float] = []
            for r, order in enumerate(alternating(args.rounds, names)):
                for name in order:
                    before = meter.take()
                    if name in ("batch-infer", "client calls (streams=False)"):
                        out = work / f"out-{r}"
                        streams = name == "batch-infer"
                        result = run_batch(args.model, url, data, out, streams=streams, **options)
                        after = meter.take()
                        got = read_outputs(out).column("label").to_numpy()
                        assert result.exit_code == 0 and np.array_equal(got, want), "outputs differ"
                        shutil.rmtree(out)
                        rounds[name].append(result.rows_per_s)
                        if streams:
                            rows = result.rows_ok + result.rows_failed
                            rounds["batch-infer steady"].append(rows / (result.elapsed_s - result.startup_s))
                            startup.append(result.startup_s)
                    else:
                        assert pa_concurrency is not None and exe is not None
                        rounds["perf_analyzer"].append(
                            perf_analyzer_at(exe, url, args.model, batch, pa_concurrency, args.pa_window_ms)
                        )
                        after = meter.take()
                    cpu[name].append(Meter.per_row_us(before, after))
                rounds["naive loop"].append(naive(url, args.model, x[: args.naive_rows]))
                rounds[f"thread pool ({args.threads})"].append(
                    thread_pool(url, args.model, x[: args.naive_rows], args.threads)
                )
                line = ", ".join(f"{k} {v[-1]:,.0f}" for k, v in rounds.items() if v)
                print(
                    f"round {r + 1} ({' then '.join(order)}): {line} rows/s; batch-infer startup "
                    f"{startup[-1] * 1e3:.0f} ms, CPU {cpu['batch-infer'][-1]['self_us']:.2f} us/row"
                    + (
                        f", client calls CPU {cpu['client calls (streams=False)'][-1]['self_us']:.2f} us/row"
                        if cpu["client calls (streams=False)"]
                        else ""
                    )
                    + (
                        f", perf_analyzer CPU {cpu['perf_analyzer'][-1]['children_us']:.2f} us/row"
                        if cpu["perf_analyzer"]
                        else ""
                    )
                )
        report(args, rounds, cpu, startup, batch, pa_concurrency, exe)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(
    args: argparse.Namespace,
    rounds: dict[str, list[float]],
    cpu: dict[str, list[dict]],
    startup: list[float],
    batch: int,
    pa_concurrency: int | None,
    exe: str | None,
) -> None:
    print(
        f"\n{args.model}, {args.rows:,} rows, {args.rounds} rounds (naive loops over {args.naive_rows:,} "
        "rows); outputs equal to onnxruntime in-process in every round; "
        f"perf_analyzer: {exe or 'ABSENT (not measured)'}"
    )
    print(
        "rows/s: median (min-max, ±half-range %). CPU per row: batch-infer's whole process (reading, "
        "requests, writing), perf_analyzer's process, the server's process tree; divided by the rows the "
        "server answered meanwhile."
    )
    header = (
        f"{'method':<44} {'rows/s: median (min-max, ±%)':>32} {'client CPU':>11} {'server CPU':>11} "
        f"{'batch-infer vs it':>18}"
    )
    print(header)
    print(f"{'':<44} {'':>32} {'us/row':>11} {'us/row':>11} {'(end to end)':>18}")
    print("-" * len(header))
    bi = rounds["batch-infer"]
    labels = {
        "batch-infer": f"batch-infer, end to end (batch {batch}, {args.concurrency} in flight)",
        "batch-infer steady": "batch-infer, after startup",
        "client calls (streams=False)": "batch-infer, client calls (streams=False)",
        "perf_analyzer": f"perf_analyzer (batch {batch}, concurrency {pa_concurrency})",
    }
    for name, values in rounds.items():
        if not values:
            continue
        ratio = ""
        if not name.startswith("batch-infer"):
            ratios = [b / v for b, v in zip(bi, values, strict=True)]
            ratio = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        key = "batch-infer" if name.startswith("batch-infer") else name
        own = cpu.get(key, []) if name != "batch-infer steady" else []
        field = "children_us" if key == "perf_analyzer" else "self_us"
        client = f"{statistics.median(c[field] for c in own):.2f}" if own else ""
        srv = f"{statistics.median(c['server_us'] for c in own):.2f}" if own else ""
        print(f"{labels.get(name, name):<44} {_spread(values):>32} {client:>11} {srv:>11} {ratio:>18}")
    print(f"batch-infer startup (until its first request; in end-to-end time): {_spread(startup, 1e3)} ms")
    calls = cpu.get("client calls (streams=False)", [])
    if calls:
        mine = [c["self_us"] for c in cpu["batch-infer"]]
        theirs = [c["self_us"] for c in calls]
        print(
            "batch-infer's process CPU per row, rounds, streams vs client calls: "
            + ", ".join(f"{a:.2f} vs {b:.2f}" for a, b in zip(mine, theirs, strict=True))
            + f" (medians {statistics.median(mine):.2f} vs {statistics.median(theirs):.2f} us/row)"
        )
    if rounds["perf_analyzer"]:
        pa = rounds["perf_analyzer"]
        end = [b / p for b, p in zip(bi, pa, strict=True)]
        steady = [s / p for s, p in zip(rounds["batch-infer steady"], pa, strict=True)]
        print(
            f"batch-infer / perf_analyzer, rounds: end to end {', '.join(f'{v:.2f}' for v in end)} "
            f"(median {statistics.median(end):.2f}); after startup {', '.join(f'{v:.2f}' for v in steady)} "
            f"(median {statistics.median(steady):.2f})"
        )


def _spread(values: list[float], scale: float = 1.0) -> str:
    arr = [v * scale for v in values]
    med = statistics.median(arr)
    half = (max(arr) - min(arr)) / 2 / med * 100 if med else float("nan")
    return f"{med:,.0f} ({min(arr):,.0f}-{max(arr):,.0f}, ±{half:.0f}%)"


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
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--naive-rows", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--shard-rows", type=int, default=10_000, help="as batch-infer's default")
    parser.add_argument("--model", default="digits_mlp")
    parser.add_argument("--repo", type=Path, default=None, help="an existing repository (default: build one)")
    parser.add_argument("--pa-window-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--no-perf-analyzer", action="store_true")
    parser.add_argument(
        "--no-calls", action="store_true", help="skip the rounds of batch-infer with streams=False"
    )
    parser.add_argument("--text", action="store_true", help="the text pipeline instead of digits")
    parser.add_argument("--sentences", type=int, default=3000)
    args = parser.parse_args()
    (text if args.text else digits)(args)


if __name__ == "__main__":
    main()
