"""How many requests per second each load generator can send from one core, against a trivial model.

The server runs on one core, the generator on the other (CPU affinity), one generator at a time, each for
the same duration at the same concurrency, against an identity ONNX model (4 floats in, the same out):

- perf_analyzer (NVIDIA's C++ tool; ``$PERF_ANALYZER``, on ``PATH``, or ``../shared/tools/``), the
  reference; the output says so when it is absent;
- raw ``tritonclient.grpc.aio``, N coroutines in a closed loop (the floor of any Python generator);
- our sweep (``tritonforge.loadtest.sweep``) over the same raw aio client, and over
  ``tritonforge.AsyncClient``;
- our locust ``TritonUser`` (one locust process, N users, no wait), on ``tritonforge.Client``.

Figures are requests/s and ratios against perf_analyzer (or, without it, raw tritonclient) measured in
the same run: these machines are shared and noisy, ratios travel better than absolutes.

    python benchmarks/loadgen_capacity.py [--duration-s 8] [--concurrency 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import onnx
from _common import find_perf_analyzer, wide_console  # benchmarks/ is on sys.path when a script runs
from onnx import TensorProto, helper
from rich.table import Table

from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
PERF_ANALYZER = find_perf_analyzer()
MODEL = "identity"


def build_repository(root: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        MODEL,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = root / "src" / "identity.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    repo = root / "repo"
    add_model(repo, MODEL, path, max_batch_size=8)
    return repo


def pin_server(server: EmbeddedServer, cpu: int) -> None:
    """Move the server and its backend stubs (its process group) onto ``cpu``."""
    assert server.pid is not None
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == server.pid:
                    os.sched_setaffinity(int(entry.name), {cpu})


def run_pinned(
    args: list[str], cpu: int, timeout_s: float, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["taskset", "-c", str(cpu), *args], capture_output=True, text=True, timeout=timeout_s, **kwargs
    )  # type: ignore[call-overload]


# Each Python generator runs in its own pinned subprocess and prints two figures: requests/s answered (bound
# by the server when it is the slower side), and requests per CPU-second the generator itself spent (its
# capacity on one core, whoever is the bottleneck).
RAW_AIO = textwrap.dedent(
    """
    import asyncio, sys, time
    import numpy as np
    import tritonclient.grpc.aio as aio
    from tritonclient.grpc import InferInput
    url, n, duration = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    async def main():
        client = aio.InferenceServerClient(url)
        item = InferInput("x", [1, 4], "FP32"); item.set_data_from_numpy(np.ones((1, 4), np.float32))
        for _ in range(50):
            await client.infer("identity", [item])
        done = 0
        stop = time.perf_counter() + duration
        async def worker():
            nonlocal done
            while time.perf_counter() < stop:
                await client.infer("identity", [item]); done += 1
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*[worker() for _ in range(n)])
        print(done / (time.perf_counter() - start), done / (time.process_time() - cpu))
        await client.close()
    asyncio.run(main())
    """
)

SWEEP = textwrap.dedent(
    """
    import asyncio, sys, time
    import numpy as np
    from tritonforge.loadtest.sweep import SweepSettings, run_sweep
    from tritonforge.loadtest.target import open_target
    url, n, duration, kind = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    settings = SweepSettings(concurrency=(n,), window_s=duration / 3, warmup_s=0.5, max_windows=3)
    async def main():
        done = 0
        def counted(send):
            async def wrapped():
                nonlocal done
                await send(); done += 1
            return wrapped
        if kind == "raw":
            async with open_target(url, "identity") as target:
                cpu = time.process_time()
                result = await run_sweep(counted(target.send), settings, model="identity", stats=target.stats)
                cpu = time.process_time() - cpu
        else:
            from tritonforge import AsyncClient
            from tritonforge.client import RetryPolicy
            x = {"x": np.ones((1, 4), np.float32)}
            async with open_target(url, "identity") as target, AsyncClient(
                url, retry=RetryPolicy.none(), metrics=False, shared_memory="off", coalesce=False
            ) as client:
                async def send():
                    await client.infer("identity", x)
                await client.infer("identity", x)
                cpu = time.process_time()
                result = await run_sweep(counted(send), settings, model="identity", stats=target.stats)
                cpu = time.process_time() - cpu
        level = result.levels[0]
        print(level.throughput_rps, done / cpu)
    asyncio.run(main())
    """
)


def python_generator(code: str, url: str, concurrency: int, duration_s: float, *extra: str) -> list[float]:
    run = run_pinned(
        [sys.executable, "-c", code, url, str(concurrency), str(duration_s), *extra],
        0,
        timeout_s=duration_s * 4 + 120,
        cwd=ROOT,
    )
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    return [float(v) for v in run.stdout.split()]


LOCUST_CPU = textwrap.dedent(
    """
    import json, os, time
    from locust import events
    from any_model import AnyModelUser  # noqa: F401  (the user class locust runs)
    state = {"count": 0}
    @events.request.add_listener
    def _count(**kwargs):
        state["count"] += 1
    @events.spawning_complete.add_listener
    def _start(**kwargs):
        state["cpu"], state["at"] = time.process_time(), state["count"]
    @events.test_stop.add_listener
    def _stop(**kwargs):
        cpu = time.process_time() - state.get("cpu", 0.0)
        with open(os.environ["CPU_OUT"], "w") as f:
            json.dump({"requests": state["count"] - state.get("at", 0), "cpu_s": cpu}, f)
    """
)


def locust_generator(url: str, concurrency: int, duration_s: float, work: Path) -> list[float]:
    prefix = work / "locust"
    locustfile = work / "capacity_probe.py"
    locustfile.write_text(LOCUST_CPU)
    cpu_out = work / "locust_cpu.json"
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "TRITONFORGE_MODEL": MODEL,
        "CPU_OUT": str(cpu_out),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "loadtests"), os.environ.get("PYTHONPATH", "")]),
    }
    args = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(locustfile),
        "--host",
        url,
        "--headless",
        "-u",
        str(concurrency),
        "-r",
        str(concurrency * 10),
        "-t",
        f"{int(duration_s)}s",
        "--csv",
        str(prefix),
        "--only-summary",
        "--reset-stats",
    ]
    run = run_pinned(args, 0, timeout_s=duration_s * 4 + 120, cwd=ROOT, env=env)
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-2000:])
    with Path(f"{prefix}_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    cpu = json.loads(cpu_out.read_text())
    return [float(rows[MODEL]["Requests/s"]), cpu["requests"] / cpu["cpu_s"]]


def perf_analyzer(url: str, concurrency: int, duration_s: float) -> list[float] | None:
    if PERF_ANALYZER is None:
        return None
    window_ms = int(duration_s * 1000 / 3)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    run = run_pinned(
        [
            PERF_ANALYZER,
            "-m",
            MODEL,
            "-u",
            url,
            "-i",
            "grpc",
            "-b",
            "1",
            "--shape",
            "x:4",
            "--concurrency-range",
            f"{concurrency}:{concurrency}",
            "-p",
            str(window_ms),
            "--max-trials",
            "10",
            "-s",
            "25",
        ],
        0,
        timeout_s=duration_s * 10 + 300,
    )
    match = re.search(r"Throughput: ([\d.]+) infer/sec", run.stdout)
    if run.returncode != 0 or not match:
        raise RuntimeError((run.stdout + run.stderr)[-2000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    throughput = float(match.group(1))
    # it sends all along its windows at about that rate: requests ~ throughput x its running time
    return [throughput, throughput * (time.perf_counter() - started) / cpu_s]


@contextlib.contextmanager
def serving(repo: Path) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(repo) as server:
        pin_server(server, 1)
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs two cores: one for the server, one for the load generator")
    console = wide_console()  # names unbroken when piped
    work = Path(tempfile.mkdtemp(prefix="tritonforge-loadgen-"))
    rows: dict[str, list[float] | None] = {}
    notes: list[str] = []
    pa_name = "perf_analyzer (C++)"
    try:
        repo = build_repository(work)
        with serving(repo) as server:
            url, n, d = server.grpc_url, args.concurrency, args.duration_s
            steps = [
                (pa_name, lambda: perf_analyzer(url, n, d)),
                ("raw tritonclient.grpc.aio", lambda: python_generator(RAW_AIO, url, n, d)),
                ("tritonforge sweep (raw aio send)", lambda: python_generator(SWEEP, url, n, d, "raw")),
                (
                    "tritonforge sweep (AsyncClient send)",
                    lambda: python_generator(SWEEP, url, n, d, "client"),
                ),
                ("tritonforge locust TritonUser (Client)", lambda: locust_generator(url, n, d, work)),
            ]
            for name, step in steps:
                with console.status(f"{name} ..."):
                    time.sleep(1)
                    try:
                        rows[name] = step()
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        rows[name] = None
                        notes.append(f"{name} failed: {str(exc).strip()[-300:]}")
            if rows[pa_name] is None and not any(note.startswith(pa_name) for note in notes):
                notes.append(
                    f"perf_analyzer is absent ({PERF_ANALYZER} not found): ratios are against raw "
                    "tritonclient"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base_name = pa_name if rows.get(pa_name) else "raw tritonclient.grpc.aio"
    base = rows.get(base_name) or [math.nan, math.nan]
    table = Table(
        title=f"load generator capacity: identity model, concurrency {args.concurrency}, generator "
        f"pinned to 1 core, server to the other, {args.duration_s:g} s each"
    )
    for column in (
        "generator",
        "answered/s",
        "vs " + base_name,
        "requests per generator CPU-s",
        "vs " + base_name + " ",
    ):
        table.add_column(column, justify="left" if column == "generator" else "right")
    for name, value in rows.items():
        if value is None:
            table.add_row(name, "absent", "-", "-", "-")
            continue
        table.add_row(
            name,
            f"{value[0]:,.0f}",
            f"{value[0] / base[0]:.2f}x",
            f"{value[1]:,.0f}",
            f"{value[1] / base[1]:.2f}x",
        )
    console.print(table)
    console.print(
        "answered/s is bounded by the server's one core when the generator is faster; requests per "
        "generator CPU-second is what the generator could send from a whole core."
    )
    for note in notes:
        console.print(f"[yellow]note:[/] {note}")
    if args.json:
        data = {
            "concurrency": args.concurrency,
            "duration_s": args.duration_s,
            "baseline": base_name,
            "generators": {
                k: None if v is None else {"answered_per_s": v[0], "requests_per_cpu_s": v[1]}
                for k, v in rows.items()
            },
            "notes": notes,
        }
        args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
