"""Sampler overhead: client throughput with the traffic sampler at 1% (and 100%) against none.

One embedded Triton server, the tiny ONNX MLP of ``client_overhead.py`` (x[1, 8] -> probs[1, 3]), the sync
``Client`` in a closed loop from ``--threads`` threads. Each round runs the three variants back to back on
the same client (no hooks; the hook ``Sampler(share=0.01)``; ``share=1.0``) for ``--seconds`` each, the six
orders of the three taken in turn so drift of the machine's load favours none, and each sampler's pending
writes flushed after its turn (uncounted) so they never spill into the next variant's. With a hook the
client builds a ``ClientEvent`` per call (tensors by reference), so its cost is counted too. Printed: every
round's throughput per variant, then per variant the median ratio to "none" and its spread (min..max over
rounds). The sampler's writes (Parquet, on its own thread) land in a temp dir that is removed at the end.

    python benchmarks/sampler_overhead.py                      # 12 rounds x 3 variants x 3 s
    python benchmarks/sampler_overhead.py --rounds 3 --seconds 2

Figures from a shared machine are noise; re-measure on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from client_overhead import MODEL, build_repository

from tritonforge.client import Client, ClientEvent
from tritonforge.observe.sampler import Sampler
from tritonforge.server import EmbeddedServer

VARIANTS = ("none", "1%", "100%")


def run(client: object, threads: int, seconds: float) -> float:
    """Calls per second over ``seconds`` from ``threads`` closed-loop threads."""
    x = np.random.default_rng(0).random((1, 8), dtype=np.float32)
    counts = [0] * threads
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            client.infer(MODEL, {"x": x})  # type: ignore[attr-defined]
            counts[i] += 1

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for t in pool:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tritonforge-sampler-bench-") as tmp:
        repo = build_repository(Path(tmp))
        with EmbeddedServer(repo) as server, Client(server.grpc_url, metrics=False) as client:
            samplers = {
                "1%": Sampler(Path(tmp) / "s1", share=0.01, seed=0),
                "100%": Sampler(Path(tmp) / "s100", share=1.0, seed=0),
            }
            hooks = {"none": [], **{k: [s] for k, s in samplers.items()}}
            run(client, args.threads, 1.0)  # warm-up
            rows: dict[str, list[float]] = {v: [] for v in VARIANTS}
            orders = list(itertools.permutations(VARIANTS))
            for r in range(args.rounds):
                for variant in orders[r % len(orders)]:
                    client.hooks[:] = hooks[variant]
                    rows[variant].append(run(client, args.threads, args.seconds))
                    client.hooks[:] = []
                    if variant in samplers:  # its writes land before the next variant, not during it
                        samplers[variant].flush()
                print(
                    f"round {r + 1}: " + "  ".join(f"{v} {rows[v][-1]:,.0f}/s" for v in VARIANTS), flush=True
                )
            for s in samplers.values():
                s.close()
    print(f"\n{args.rounds} rounds x {args.seconds:g}s, {args.threads} threads; vs no sampler")
    print(f"{'sampler':<8} {'median calls/s':>15} {'ratio (median)':>15} {'spread':>16}")
    for v in VARIANTS:
        ratios = [x / base for x, base in zip(rows[v], rows["none"], strict=True)]
        print(
            f"{v:<8} {statistics.median(rows[v]):>15,.0f} {statistics.median(ratios):>15.3f} "
            f"{min(ratios):>7.3f}..{max(ratios):<7.3f}"
        )
    kept = {k: s.stats for k, s in samplers.items()}
    print("sampler stats: " + "; ".join(f"{k}: {v}" for k, v in kept.items()))
    micro(statistics.median(rows["none"]) / args.threads)


def micro(calls_per_s_per_thread: float, n: int = 200_000) -> None:
    """The sampler hook's own CPU per call (the client's ``ClientEvent`` plus ``sampler(event)`` at 1%, the
    writer thread's Parquet writes included), next to a call's time: steadier than throughput ratios on a
    busy machine."""
    x = {"x": np.random.default_rng(0).random((1, 8), dtype=np.float32)}
    y = {"probs": np.zeros((1, 3), np.float32)}
    with tempfile.TemporaryDirectory(prefix="tritonforge-sampler-micro-") as tmp:
        sampler = Sampler(tmp, share=0.01, seed=0)
        started = time.process_time()
        for i in range(n):
            sampler(
                ClientEvent(
                    "request",
                    MODEL,
                    "1",
                    "127.0.0.1:8001",
                    1e-3,
                    None,
                    1,
                    request_id=str(i),
                    inputs=x,
                    outputs=y,
                )
            )
        sampler.close()
        cpu_us = (time.process_time() - started) / n * 1e6
    call_us = 1e6 / calls_per_s_per_thread
    print(
        f"event + sampler hook at 1%: {cpu_us:.2f} us CPU per call ({n:,} calls, writes included) = "
        f"{cpu_us / call_us:.2%} of a call ({call_us:,.0f} us per call per thread in the rounds above)"
    )


if __name__ == "__main__":
    main()
