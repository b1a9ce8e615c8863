"""Client overhead: tritonforge's AsyncClient / Client against raw tritonclient.grpc(.aio) and perf_analyzer.

One embedded Triton server, one tiny ONNX model (x[1, 8] -> probs[1, 3], dynamic batching), the same
requests from every client, at concurrency 1, 16 and 64. The AsyncClient runs three times: as users get
it (client-side batching on: concurrent calls go out as one request), with ``coalesce=False`` (every call
its own request, like the raw clients; every call a grpc.aio call) and with ``coalesce=False,
streams=True`` (every call a message of its streams, opt-in; at concurrency 16 at most, see
``STREAMS_MAX_CONCURRENCY``); a bare grpc.aio call (cached request
bytes, the answer parsed to numpy, nothing else) shows the floor of any asyncio client in Python.
Printed per client and concurrency:
throughput, p50/p99 latency, client CPU per request (``time.process_time`` of this process, which holds the
client and its gRPC threads but not the server; perf_analyzer's from its own process rusage), and the ratios
to raw tritonclient and to perf_analyzer. perf_analyzer runs inside the alternating rounds, so every ratio
is taken within a round and reported as its median and min-max over the rounds; the last lines give the
aim's figures (``coalesce=False`` vs perf_analyzer). Speed is compared only as ratios within one run.

    python benchmarks/client_overhead.py                 # ~5 min on 2 cores
    python benchmarks/client_overhead.py --rounds 1 --concurrency 1 64

perf_analyzer runs when one is found (``--perf-analyzer PATH``, ``$PERF_ANALYZER``, on ``PATH``, or
``../shared/tools/perf_analyzer`` beside the project); otherwise the table says it is absent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from _common import alternating, find_perf_analyzer, spread  # benchmarks/ is on sys.path when a script runs
from onnx import TensorProto, helper, numpy_helper

from tritonforge import AsyncClient, Client
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

MODEL = "mlp"
X = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)


@dataclass
class Result:
    client: str
    concurrency: int
    requests: int
    seconds: float
    cpu_s: float
    p50_ms: float
    p99_ms: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def cpu_us(self) -> float:
        return 1e6 * self.cpu_s / max(1, self.requests)


def build_repository(root: Path) -> Path:
    rng = np.random.default_rng(1)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = root / "mlp.onnx"
    onnx.save(model, str(path))
    repo = root / "repo"
    add_model(repo, MODEL, path, max_batch_size=64, max_queue_delay_us=100)
    return repo


def _summary(name: str, concurrency: int, latencies: list[float], seconds: float, cpu_s: float) -> Result:
    lat = np.array(latencies) * 1e3 if latencies else np.array([0.0])
    return Result(
        name,
        concurrency,
        len(latencies),
        seconds,
        cpu_s,
        float(np.percentile(lat, 50)),
        float(np.percentile(lat, 99)),
    )


# -- asyncio clients ------------------------------------------------------------------------------------


async def _async_run(
    name: str, concurrency: int, seconds: float, warmup_s: float, call: Callable[[], object]
) -> Result:
    latencies: list[float] = []
    measuring = False
    stop_at = time.perf_counter() + warmup_s + seconds

    async def worker() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            await call()  # type: ignore[misc]
            if measuring:
                latencies.append(time.perf_counter() - t0)

    tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    measuring = True
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*tasks)
    return _summary(name, concurrency, latencies, time.perf_counter() - wall0, time.process_time() - cpu0)


ASYNC_ALONE = "tritonforge AsyncClient, coalesce=False, streams=True"
#: the client's streams at most at this concurrency: at 64, Triton 2.51's stream handler segfaulted the
#: server within seconds (``TRITONSERVER_InferenceRequestDelete``; the reason streams are opt-in)
STREAMS_MAX_CONCURRENCY = 16
ASYNC_GRPC = "tritonforge AsyncClient, coalesce=False"


async def bench_tritonforge_async(
    url: str, concurrency: int, seconds: float, warmup_s: float, coalesce: bool = True, streams: bool = False
) -> Result:
    async with AsyncClient(url, coalesce=coalesce, streams=streams) as client:
        inputs = {"x": X}

        def call() -> object:
            return client.infer(MODEL, inputs)

        name = "tritonforge AsyncClient" if coalesce else ASYNC_ALONE if streams else ASYNC_GRPC
        return await _async_run(name, concurrency, seconds, warmup_s, call)


async def bench_raw_async(url: str, concurrency: int, seconds: float, warmup_s: float) -> Result:
    import tritonclient.grpc.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    try:

        async def call() -> np.ndarray:
            item = aioclient.InferInput("x", list(X.shape), "FP32")
            item.set_data_from_numpy(X)
            result = await client.infer(MODEL, [item])
            return result.as_numpy("probs")

        return await _async_run("raw tritonclient.grpc.aio", concurrency, seconds, warmup_s, call)
    finally:
        await client.close()


BARE_ASYNC = "bare grpc.aio (bytes in, protobuf out)"


async def bench_bare_async(url: str, concurrency: int, seconds: float, warmup_s: float) -> Result:
    """The floor of any asyncio client in Python: grpc.aio's own per-call cost and nothing else (the
    request framed from cached bytes, the answer parsed to numpy); no checks, retries or metrics."""
    import grpc.aio
    from tritonclient.grpc import service_pb2 as pb

    from tritonforge.client._codec import decode_response, frame, request_header

    channel = grpc.aio.insecure_channel(url)
    method = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=None,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    header = request_header(MODEL, None, (("x", "FP32", X.shape),), None)
    try:

        async def call() -> dict[str, np.ndarray]:
            return decode_response(await method(frame(header, [X.tobytes()]), timeout=30.0))

        return await _async_run(BARE_ASYNC, concurrency, seconds, warmup_s, call)
    finally:
        await channel.close()


# -- blocking clients -----------------------------------------------------------------------------------


def _threaded_run(
    name: str, concurrency: int, seconds: float, warmup_s: float, call: Callable[[], object]
) -> Result:
    per_thread: list[list[float]] = [[] for _ in range(concurrency)]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup_s, start + warmup_s + seconds

    def worker(out: list[float]) -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            call()
            if t0 >= measure_from:
                out.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    time.sleep(max(0.0, measure_from - time.perf_counter()))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.join()
    latencies = [x for out in per_thread for x in out]
    return _summary(name, concurrency, latencies, time.perf_counter() - wall0, time.process_time() - cpu0)


def bench_tritonforge_sync(url: str, concurrency: int, seconds: float, warmup_s: float) -> Result:
    with Client(url) as client:
        inputs = {"x": X}
        return _threaded_run(
            "tritonforge Client", concurrency, seconds, warmup_s, lambda: client.infer(MODEL, inputs)
        )


def bench_raw_sync(url: str, concurrency: int, seconds: float, warmup_s: float) -> Result:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)

    def call() -> np.ndarray:
        item = grpcclient.InferInput("x", list(X.shape), "FP32")
        item.set_data_from_numpy(X)
        return client.infer(MODEL, [item]).as_numpy("probs")

    try:
        return _threaded_run("raw tritonclient.grpc", concurrency, seconds, warmup_s, call)
    finally:
        client.close()


# -- perf_analyzer --------------------------------------------------------------------------------------


def bench_perf_analyzer(exe: str, url: str, concurrency: int, seconds: float) -> Result | None:
    """perf_analyzer's own figures; its CPU per request from its process rusage over the requests it sent
    (throughput x its run time: warm-up and stabilisation windows included, a slight overestimate)."""
    window_ms = max(1000, int(seconds * 1000 / 2))
    args = [
        exe,
        "-m",
        MODEL,
        "-u",
        url,
        "-i",
        "grpc",
        "-b",
        "1",
        "--shape",
        "x:8",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "-p",
        str(window_ms),
        "--percentile",
        "99",
        "--max-trials",
        "3",
        # rounds alternate and their spread is reported, so one window per run is enough: accept any
        "--stability-percentage",
        "999",
        "-v",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = proc.stdout
    passes = re.findall(r"Pass \[\d+\] throughput: ([\d.]+) infer/sec", out)
    if proc.returncode != 0 and not passes:
        print(f"perf_analyzer failed at concurrency {concurrency}: {proc.stderr.strip()[-400:]}")
        return None
    found = re.findall(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec, latency (\d+) usec", out)
    if proc.returncode == 0 and found:
        throughput = float(found[-1][0])
    else:  # no stable window on a noisy machine: the windows' median
        throughput = float(np.median([float(p) for p in passes]))
    p50 = re.findall(r"p50 latency: (\d+) usec", out)
    p99 = re.findall(r"p99 latency: (\d+) usec", out)
    cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    requests = max(1, round(throughput * elapsed))
    return Result(
        "perf_analyzer (C++)",
        concurrency,
        requests,
        requests / throughput,
        cpu_s,
        float(p50[-1]) / 1e3 if p50 else float("nan"),
        float(p99[-1]) / 1e3 if p99 else float("nan"),
    )


# -- the run --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument(
        "--rounds", type=int, default=7, help="alternating rounds per client (median reported)"
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument(
        "--perf-analyzer", default=None, help="path (else $PERF_ANALYZER, PATH, ../shared/tools/)"
    )
    parser.add_argument("--no-perf-analyzer", action="store_true")
    args = parser.parse_args()

    exe = None if args.no_perf_analyzer else find_perf_analyzer(args.perf_analyzer)
    results: list[Result] = []
    paired: dict[tuple[str, int], Paired] = {}
    with (
        tempfile.TemporaryDirectory(prefix="tf-bench-") as tmp,
        EmbeddedServer(build_repository(Path(tmp))) as server,
    ):
        url = server.grpc_url
        print(
            f"server {url}, model {MODEL} x[1, 8] FP32, {os.cpu_count()} cores; "
            f"perf_analyzer: {exe or 'ABSENT (not measured)'}"
        )
        for c in args.concurrency:
            runs: dict[str, Callable[[], Result | None]] = {
                "tf-async": lambda c=c: asyncio.run(
                    bench_tritonforge_async(url, c, args.seconds, args.warmup)
                ),
                # streams only up to STREAMS_MAX_CONCURRENCY: above it Triton 2.51 crashed (see the doc)
                "tf-async-alone": lambda c=c: (
                    asyncio.run(
                        bench_tritonforge_async(
                            url, c, args.seconds, args.warmup, coalesce=False, streams=True
                        )
                    )
                    if c <= STREAMS_MAX_CONCURRENCY
                    else None
                ),
                "tf-async-grpc": lambda c=c: asyncio.run(
                    bench_tritonforge_async(url, c, args.seconds, args.warmup, coalesce=False, streams=False)
                ),
                "raw-async": lambda c=c: asyncio.run(bench_raw_async(url, c, args.seconds, args.warmup)),
                "bare-async": lambda c=c: asyncio.run(bench_bare_async(url, c, args.seconds, args.warmup)),
                "tf-sync": lambda c=c: bench_tritonforge_sync(url, c, args.seconds, args.warmup),
                "raw-sync": lambda c=c: bench_raw_sync(url, c, args.seconds, args.warmup),
            }
            if exe:
                runs["pa"] = lambda c=c: bench_perf_analyzer(exe, url, c, args.seconds)
            # Rounds alternate the clients (reversed every other round) so load from elsewhere on a shared
            # machine falls on all of them; each client's median round by throughput is reported; each
            # ratio is taken within a round (to the raw client, to perf_analyzer): median over rounds.
            rounds: dict[str, list[Result | None]] = {k: [] for k in runs}
            for order in alternating(args.rounds, list(runs)):
                for key in order:
                    r = runs[key]()
                    rounds[key].append(r)
                    if r is not None:
                        print(
                            f"  {r.client:38s} c={c:<3d} {r.throughput:8.0f} req/s  "
                            f"cpu {r.cpu_us:6.0f} us/req",
                            flush=True,
                        )
            for key in runs:
                done = sorted((r for r in rounds[key] if r is not None), key=lambda r: r.throughput)
                if done:
                    results.append(done[len(done) // 2])
            for ours, raw in (
                ("tf-async", "raw-async"),
                ("tf-async-alone", "raw-async"),
                ("tf-async-grpc", "raw-async"),
                ("bare-async", "raw-async"),
                ("tf-sync", "raw-sync"),
                ("raw-async", None),
                ("raw-sync", None),
            ):
                if not any(rounds[ours]):
                    continue  # not run at this concurrency
                paired[(_name(rounds[ours]), c)] = Paired(
                    _ratios(rounds[ours], rounds[raw]) if raw else None,
                    _ratios(rounds[ours], rounds["pa"]) if exe else None,
                )
    print()
    print(table(results, paired, perf_analyzer_present=exe is not None))
    if exe:
        print()
        for c in args.concurrency:
            for name in (ASYNC_ALONE, ASYNC_GRPC):
                ratios = paired.get((name, c))
                if ratios is not None and ratios.vs_pa is not None:
                    thr, cpu = ratios.vs_pa
                    print(
                        f"{name} vs perf_analyzer, concurrency {c}, {len(thr)} rounds, median (min-max): "
                        f"throughput {spread(thr)}x, CPU per request {spread(cpu)}x"
                    )


@dataclass
class Paired:
    """Per-round ratios (throughput, CPU per request) of a client to the raw client and to perf_analyzer."""

    vs_raw: tuple[list[float], list[float]] | None
    vs_pa: tuple[list[float], list[float]] | None


def _name(rounds: list[Result | None]) -> str:
    return next(r.client for r in rounds if r is not None)


def _ratios(ours: list[Result | None], other: list[Result | None]) -> tuple[list[float], list[float]] | None:
    pairs = [(a, b) for a, b in zip(ours, other, strict=True) if a is not None and b is not None]
    if not pairs:
        return None
    return [a.throughput / b.throughput for a, b in pairs], [a.cpu_us / b.cpu_us for a, b in pairs]


def _ratio_cell(values: list[float] | None) -> str:
    if not values:
        return ""
    low, high = min(values), max(values)
    return f"{float(np.median(values)):.2f}x ({low:.2f}-{high:.2f})"


def table(
    results: list[Result], paired: dict[tuple[str, int], Paired], *, perf_analyzer_present: bool
) -> str:
    """The figures: the median round of each client; every ratio is the median over rounds of the ratio to
    the run beside it in the same round (min-max over rounds in brackets), which cancels load that comes and
    goes on a shared machine."""
    lines = [
        "| client | conc | req/s | p50 ms | p99 ms | CPU us/req | thr. vs raw | CPU vs raw | thr. vs PA "
        "| CPU vs PA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratios = paired.get((r.client, r.concurrency))
        raw = (ratios.vs_raw if ratios else None) or ([], [])
        pa = (ratios.vs_pa if ratios else None) or ([], [])
        lines.append(
            f"| {r.client} | {r.concurrency} | {r.throughput:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
            f"{r.cpu_us:.0f} | {_ratio_cell(raw[0])} | {_ratio_cell(raw[1])} "
            f"| {_ratio_cell(pa[0])} | {_ratio_cell(pa[1])} |"
        )
    if not perf_analyzer_present:
        lines.append("\nperf_analyzer is absent on this machine: its rows and ratios are not measured.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
