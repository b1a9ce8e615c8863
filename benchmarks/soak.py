"""Soak: the AsyncClient at full tilt for minutes against one server — zero errors and flat memory.

One embedded Triton server serving the real digits MLP (scikit-learn, built by
``tritonforge.examples.build_digits`` into a temp repository), ``--concurrency`` calls always in flight from
one ``AsyncClient`` at its defaults (client-side batching on), each call one real test digit whose answer
is checked against the label the model gives in-process for that digit (so a wrong answer counts as an
error too). Every ``--every`` seconds it samples the resident memory of this process and of the server's
whole process group. Printed: requests, errors, throughput, and memory at start / middle / end with the
slope over the second half (MiB per minute; "flat" means within noise of 0).

    python benchmarks/soak.py                       # 3 minutes at concurrency 64
    python benchmarks/soak.py --seconds 30 --concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from _common import wide_console  # benchmarks/ is on sys.path
from rich.table import Table

from tritonforge.client import AsyncClient
from tritonforge.examples.build_digits import build, digits_split
from tritonforge.server import EmbeddedServer

MODEL = "digits_mlp"


def rss_mib(processes: list[psutil.Process]) -> float:
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total / 2**20


def server_processes(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


async def soak(url: str, server_pid: int, seconds: float, concurrency: int, every: float) -> dict:
    _, x_test, _, _ = digits_split()
    me = [psutil.Process()]
    samples: list[tuple[float, float, float]] = []  # (t, client MiB, server MiB)
    counts = {"requests": 0, "errors": 0, "wrong": 0}
    async with AsyncClient(url) as client:
        # the model's own answer for every test digit, one call each, before the clock starts
        expected = []
        for row in x_test:
            out = await client.infer(MODEL, {"input": row[None, :]})
            expected.append(int(np.asarray(out["label"]).reshape(-1)[0]))
        stop = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                row = k % len(x_test)
                k += concurrency
                try:
                    out = await client.infer(MODEL, {"input": x_test[row][None, :]})
                    if int(np.asarray(out["label"]).reshape(-1)[0]) != expected[row]:
                        counts["wrong"] += 1
                except Exception:
                    counts["errors"] += 1
                counts["requests"] += 1

        async def sampler() -> None:
            started = time.perf_counter()
            while time.perf_counter() < stop:
                samples.append(
                    (time.perf_counter() - started, rss_mib(me), rss_mib(server_processes(server_pid)))
                )
                await asyncio.sleep(every)

        started = time.perf_counter()
        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {**counts, "seconds": elapsed, "samples": samples}


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, MiB) over the second half of the run, in MiB per minute."""
    half = samples[len(samples) // 2 :]
    if len(half) < 2:
        return 0.0
    t = np.array([s[0] for s in half])
    y = np.array([s[1] for s in half])
    return float(np.polyfit(t, y, 1)[0] * 60)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--every", type=float, default=5.0, help="memory sampling interval (s)")
    args = parser.parse_args()
    console = wide_console()  # names unbroken when piped
    with tempfile.TemporaryDirectory(prefix="tritonforge-soak-") as work:
        repo = Path(work) / "repo"
        with console.status("building the digits MLP"):
            build(repo, kinds=("mlp",))
        with EmbeddedServer(repo) as server:
            assert server.pid is not None
            result = asyncio.run(
                soak(server.grpc_url, server.pid, args.seconds, args.concurrency, args.every)
            )
    samples = result["samples"]
    client_mem = [(t, c) for t, c, _ in samples]
    server_mem = [(t, s) for t, _, s in samples]
    table = Table(title=f"soak: AsyncClient, {MODEL}, concurrency {args.concurrency}")
    for column in ("requests", "errors", "wrong answers", "req/s", "seconds"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{result['requests']:,}",
        str(result["errors"]),
        str(result["wrong"]),
        f"{result['requests'] / result['seconds']:,.0f}",
        f"{result['seconds']:.0f}",
    )
    console.print(table)
    memory = Table(title=f"resident memory (MiB), sampled every {args.every:g} s")
    for column in ("process", "start", "middle", "end", "max", "slope 2nd half (MiB/min)"):
        memory.add_column(column, justify="right")
    for name, series in (("client", client_mem), ("server group", server_mem)):
        values = [v for _, v in series]
        memory.add_row(
            name,
            f"{values[0]:.0f}",
            f"{statistics.median(values):.0f}",
            f"{values[-1]:.0f}",
            f"{max(values):.0f}",
            f"{slope_mib_per_min(series):+.2f}",
        )
    console.print(memory)
    return 0 if result["errors"] == 0 and result["wrong"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
