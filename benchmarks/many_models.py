"""Many models on one server through the model cache: more models than may be loaded at once.

A repository of ``--models`` tiny ONNX models (``m0000`` answers ``x + 0``, ``m0001`` ``x + 1``, ...) is
served by the embedded Triton with the cache (``--budget`` models loaded at most, or ``--budget-memory``
of PSS). Through the tritonforge client (a missing model is a miss: the coordinator loads it, the call
is retried once):

1. every model answers once, in random order, and answers right (nearly every call a cold load);
2. Zipf-distributed traffic over all models (exponent ``--zipf-s``) at ``--concurrency``: zero failed
   requests allowed; the p99 of the ``--hot`` most popular models is compared with
3. a server without the cache that has only those hot models loaded, sent the same requests for them
   at the same concurrency (the warmed-up second half, the two servers in alternating rounds);
4. the hot path: one loaded model's throughput (perf_analyzer, NVIDIA's C++ load generator, or the
   tritonforge client in closed loop when it is not found) on a server with the cache against one without
   it, both fresh and holding the models the cache's server held after its traffic (alternating rounds,
   the pair started twice, each side first once): what the cache costs a loaded model.

Printed: cold-load latency (p50/p99), evictions, the most models loaded at once (sampled from the
repository index every 0.2 s) and the peak PSS of tritonserver and its children (sampled from /proc),
against the budget. Take figures on a quiet machine; on a shared one the p99s are noisy.

    python benchmarks/many_models.py                              # 500 models, budget 50 (long)
    python benchmarks/many_models.py --models 60 --budget 10 --requests 600   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
from _common import (  # benchmarks/ is on sys.path when a script runs
    alternating,
    find_perf_analyzer,
    machine_stamp,
    run_perf_analyzer,
    spread,
    wide_console,
)
from onnx import TensorProto, helper, numpy_helper
from rich.progress import Progress
from rich.table import Table

from tritonforge.cache import CACHE_MODEL, CacheBudget, parse_size, write_cache_repository
from tritonforge.client import Client
from tritonforge.repository import RepositoryWrite
from tritonforge.server import EmbeddedServer

WIDTH = 4


def add_onnx(path: Path, constant: float) -> Path:
    """x[N, 4] float32 -> y = x + constant."""
    c = numpy_helper.from_array(np.full((WIDTH,), constant, dtype=np.float32), "c")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=[c],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def build_repository(root: Path, models: int) -> tuple[Path, list[str]]:
    names = [f"m{i:04d}" for i in range(models)]
    work = root / "_onnx"
    work.mkdir(parents=True)
    repo = root / "repo"
    with RepositoryWrite(repo) as write:
        for i, name in enumerate(names):
            write.add_model(name, add_onnx(work / f"{name}.onnx", i), max_batch_size=8)
    return repo, names


def pss_bytes(pid: int) -> int:
    """PSS of ``pid`` and its descendants (smaps_rollup; shared pages split between their users)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, ()))
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


class Sampler:
    """Peak PSS and the most models loaded at once, sampled every ``interval_s`` in a thread."""

    def __init__(self, server: EmbeddedServer, interval_s: float = 0.2) -> None:
        self.server, self.interval_s = server, interval_s
        self.peak_pss = 0
        self.peak_loaded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        assert self.server.pid is not None
        with Client(self.server.grpc_url) as client:
            while not self._stop.wait(self.interval_s):
                self.peak_pss = max(self.peak_pss, pss_bytes(self.server.pid))
                index = client.repository_index()
                live = sum(1 for m in index if m.get("state") in ("READY", "UNLOADING"))
                self.peak_loaded = max(self.peak_loaded, live - 1)  # the coordinator not counted


def check(name: str, out: dict[str, np.ndarray], sent: np.ndarray) -> None:
    want = sent + float(int(name[1:]))
    if not np.allclose(out["y"], want):
        raise AssertionError(f"{name} answered {out['y']} for {sent}, not {want}")


def one(client: Client, name: str, timeout_s: float) -> float:
    x = np.random.default_rng().standard_normal((1, WIDTH)).astype(np.float32)
    start = time.perf_counter()
    out = client.infer(name, {"x": x}, timeout_s=timeout_s)
    took = time.perf_counter() - start
    check(name, out, x)
    return took


def zipf_names(names: list[str], length: int, s: float, seed: int) -> tuple[list[str], list[str]]:
    """``length`` model names drawn by Zipf(s) over a random ranking of ``names``; and the ranking."""
    rng = np.random.default_rng(seed)
    ranking = [names[i] for i in rng.permutation(len(names))]
    weights = 1.0 / np.arange(1, len(names) + 1) ** s
    picks = rng.choice(len(names), size=length, p=weights / weights.sum())
    return [ranking[i] for i in picks], ranking


def traffic(
    server: EmbeddedServer, sequence: list[str], concurrency: int, timeout_s: float, label: str, console: Any
) -> tuple[dict[str, list[float]], list[str], float]:
    """Send ``sequence`` at ``concurrency``; latencies per model, failures, and the wall time."""
    latencies: dict[str, list[float]] = {}
    failures: list[str] = []
    lock = threading.Lock()
    with Client(server.grpc_url) as client, Progress(console=console, transient=True) as progress:
        task = progress.add_task(label, total=len(sequence))

        def send(name: str) -> None:
            try:
                took = one(client, name, timeout_s)
            except Exception as exc:  # every failure is a finding
                with lock:
                    failures.append(f"{name}: {exc}")
            else:
                with lock:
                    latencies.setdefault(name, []).append(took)
            progress.advance(task)

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(send, sequence))
        wall = time.perf_counter() - start
    return latencies, failures, wall


class Steady(NamedTuple):
    """The warmed-up half of the Zipf traffic, on the cache's server and on the only-hot one."""

    cache: dict[str, list[float]]  # latencies per model
    cache_failures: list[str]
    cache_wall_s: float
    only_hot: dict[str, list[float]]
    only_hot_failures: list[str]
    round_p99_ratios: list[float]  # each round's hot p99, cache / only-hot


def steady_rounds(
    server: EmbeddedServer,
    repo: Path,
    sequence: list[str],
    hot: set[str],
    args: argparse.Namespace,
    console: Any,
) -> Steady:
    """The warmed-up part of the Zipf traffic against a server with only the ``hot`` models loaded, in
    ``args.p99_rounds`` alternating rounds (ABBA...): each round sends one slice of ``sequence`` to the
    cache's ``server`` and the same slice's requests for hot models to the other, at the same concurrency,
    so both sides meet the machine's ups and downs alike."""
    steady = Steady({}, [], 0.0, {}, [], [])
    wall = 0.0
    slices = np.array_split(np.arange(len(sequence)), args.p99_rounds)
    load = (args.concurrency, args.timeout_s)
    with EmbeddedServer(repo, model_control="explicit", load_models=sorted(hot)) as plain:
        for k, order in enumerate(alternating(args.p99_rounds, ["cache", "only-hot"])):
            part = [sequence[i] for i in slices[k]]
            p99s: dict[str, float] = {}
            for side in order:
                label = f"round {k + 1}/{args.p99_rounds}: {side}"
                if side == "cache":
                    got, failures, took = traffic(server, part, *load, label, console)
                    latencies, failed = steady.cache, steady.cache_failures
                    wall += took
                else:
                    wanted = [n for n in part if n in hot]
                    got, failures, _ = traffic(plain, wanted, *load, label, console)
                    latencies, failed = steady.only_hot, steady.only_hot_failures
                failed += failures
                for name, values in got.items():
                    latencies.setdefault(name, []).extend(values)
                p99s[side] = p([t for m in hot for t in got.get(m, [])], 99)
            steady.round_p99_ratios.append(p99s["cache"] / p99s["only-hot"])
    return steady._replace(cache_wall_s=wall)


def closed_loop(server: EmbeddedServer, name: str, concurrency: int, duration_s: float) -> float:
    """Requests/s one loaded model answers, ``concurrency`` callers back to back for ``duration_s``."""
    count = [0] * concurrency
    stop_at = time.perf_counter() + duration_s
    with Client(server.grpc_url) as client:
        one(client, name, 30)

        def loop(index: int) -> None:
            x = np.ones((1, WIDTH), dtype=np.float32)
            while time.perf_counter() < stop_at:
                client.infer(name, {"x": x})
                count[index] += 1

        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(loop, range(concurrency)))
        return sum(count) / (time.perf_counter() - start)


def loaded_models(server: EmbeddedServer) -> list[str]:
    """The models ``server`` has ready, the coordinator not counted."""
    with Client(server.grpc_url) as client:
        index = client.repository_index()
    return sorted(m["name"] for m in index if m.get("state") == "READY" and m["name"] != CACHE_MODEL)


def hot_path_rps(server: EmbeddedServer, name: str, args: argparse.Namespace, exe: str | None) -> float:
    """One round of ``name``'s throughput at ``server``: perf_analyzer when found, else the client."""
    if exe is None:
        return closed_loop(server, name, args.concurrency, args.duration_s)
    return run_perf_analyzer(
        exe, server.grpc_url, name, args.concurrency, window_ms=int(args.duration_s * 1000)
    )


def hot_path(
    repo: Path,
    cache: Path,
    resident: list[str],
    hottest: str,
    args: argparse.Namespace,
    exe: str | None,
    console: Any,
) -> tuple[list[float], list[float]]:
    """``hottest``'s throughput on a server with the cache and on one without it, both holding the models
    ``resident`` (what the cache's server held after its traffic): the rounds of each side.

    Two servers started one after the other do not serve alike: on this machine the one started second
    answered 3-4 % more (two identical servers, alternating rounds). So the pair is started twice, each
    side first once, with ``args.rounds`` alternating rounds each time, and the bias cancels out."""
    rounds: dict[str, list[float]] = {"cache": [], "plain": []}

    def start(side: str) -> EmbeddedServer:
        if side == "cache":
            return EmbeddedServer(
                [repo, cache], model_control="explicit", load_models=[CACHE_MODEL, *resident]
            )
        return EmbeddedServer(repo, model_control="explicit", load_models=resident)

    for first, second in (("cache", "plain"), ("plain", "cache")):
        console.print(f"hot path: {first} server started first")
        with start(first) as one_server, start(second) as other:
            servers = {first: one_server, second: other}
            for order in alternating(args.rounds, list(rounds)):
                for side in order:
                    rounds[side].append(hot_path_rps(servers[side], hottest, args, exe))
    return rounds["cache"], rounds["plain"]


def ask_status(server: EmbeddedServer) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        tensor = grpcclient.InferInput("MODEL", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([b""], dtype=np.object_))
        return dict(json.loads(client.infer(CACHE_MODEL, [tensor]).as_numpy("STATE")[0]))
    finally:
        client.close()


def p(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=500)
    parser.add_argument("--budget", type=int, default=50, help="models loaded at most")
    parser.add_argument("--budget-memory", default=None, help="a PSS budget instead (e.g. 2GiB)")
    parser.add_argument("--hot", type=int, default=10, help="the most popular models compared")
    parser.add_argument("--requests", type=int, default=4000, help="Zipf-distributed requests")
    parser.add_argument("--zipf-s", type=float, default=1.5)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=300.0, help="each call's deadline")
    parser.add_argument("--duration-s", type=float, default=5.0, help="each hot-path round")
    parser.add_argument("--rounds", type=int, default=6, help="hot-path rounds (alternating)")
    parser.add_argument(
        "--p99-rounds", type=int, default=4, help="alternating rounds of the warm half (cache / only-hot)"
    )
    parser.add_argument("--perf-analyzer", default=None, help="path (else $PERF_ANALYZER, PATH, shared/)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    console = wide_console()
    memory = None if args.budget_memory is None else parse_size(args.budget_memory, what="--budget-memory")
    budget = CacheBudget(max_models=None if memory else args.budget, max_memory_bytes=memory)
    root = Path(tempfile.mkdtemp(prefix="tfg-many-models-"))
    figures: dict[str, Any] = {"models": args.models, "budget": budget.describe(), "args": dict(vars(args))}
    figures["machine"] = machine_stamp()
    exe = find_perf_analyzer(args.perf_analyzer)
    figures["hot_path_tool"] = "perf_analyzer" if exe else "tritonforge client, closed loop"
    figures["args"]["json"] = str(args.json)
    try:
        start = time.perf_counter()
        repo, names = build_repository(root, args.models)
        figures["build_s"] = time.perf_counter() - start
        cache = write_cache_repository(root / "cache", budget)
        sequence, ranking = zipf_names(names, args.requests, args.zipf_s, args.seed)
        hot = set(ranking[: args.hot])
        console.print(f"{args.models} models built in {figures['build_s']:.1f} s; cache: {budget.describe()}")

        with EmbeddedServer([repo, cache], model_control="explicit", load_models=[CACHE_MODEL]) as server:
            assert server.pid is not None
            figures["idle_pss_mib"] = pss_bytes(server.pid) / 2**20
            with Sampler(server) as sampler:
                order = list(names)
                np.random.default_rng(args.seed).shuffle(order)
                cold, fails, wall = traffic(server, order, 1, args.timeout_s, "every model once", console)
                figures["once"] = {
                    "failures": fails,
                    "answered": sum(len(v) for v in cold.values()),
                    "wall_s": wall,
                    "p50_ms": p([t for v in cold.values() for t in v], 50),
                    "p99_ms": p([t for v in cold.values() for t in v], 99),
                }
                before = ask_status(server)
                half = len(sequence) // 2  # the first half warms the hot set up; the second is steady
                zipf, zfails, zwall = traffic(
                    server, sequence[:half], args.concurrency, args.timeout_s, "Zipf (warm-up)", console
                )
                rounds = steady_rounds(server, repo, sequence[half:], hot, args, console)
                steady = rounds.cache
                zfails += rounds.cache_failures
                zwall += rounds.cache_wall_s
                for name, values in steady.items():
                    zipf.setdefault(name, []).extend(values)
                figures["zipf"] = {
                    "failures": zfails,
                    "answered": sum(len(v) for v in zipf.values()),
                    "wall_s": zwall,
                    "hot_p50_ms": p([t for m in hot for t in zipf.get(m, [])], 50),
                    "hot_p99_ms": p([t for m in hot for t in zipf.get(m, [])], 99),
                    "all_p99_ms": p([t for v in zipf.values() for t in v], 99),
                    "steady_hot_p50_ms": p([t for m in hot for t in steady.get(m, [])], 50),
                    "steady_hot_p99_ms": p([t for m in hot for t in steady.get(m, [])], 99),
                }
                base = [t for v in rounds.only_hot.values() for t in v]
                figures["plain"] = {
                    "failures": rounds.only_hot_failures,
                    "hot_p50_ms": p(base, 50),
                    "hot_p99_ms": p(base, 99),
                }
                figures["steady_round_p99_ratios"] = rounds.round_p99_ratios
                status = ask_status(server)
                figures["zipf"]["loads"] = status["loads"] - before["loads"]
            figures["cache"] = {
                k: status[k] for k in ("loads", "evictions", "failures", "load_s", "peak_memory_bytes")
            }
            figures["peak_loaded"] = sampler.peak_loaded
            figures["peak_pss_mib"] = sampler.peak_pss / 2**20
            hottest = ranking[0]
            with Client(server.grpc_url) as client:
                one(client, hottest, args.timeout_s)  # loaded already, or a miss loads it
            resident = sorted(loaded_models(server))
        cached_rounds, plain_rounds = hot_path(repo, cache, resident, hottest, args, exe, console)
        figures["hot_path_loaded"] = len(resident)
        figures["hot_path"] = {"cache_rps": cached_rounds, "plain_rps": plain_rounds}
    finally:
        shutil.rmtree(root, ignore_errors=True)

    ratio = figures["zipf"]["hot_p99_ms"] / figures["plain"]["hot_p99_ms"]
    steady_ratio = figures["zipf"]["steady_hot_p99_ms"] / figures["plain"]["hot_p99_ms"]
    figures["steady_hot_p99_ratio"] = steady_ratio
    throughput = float(np.median(cached_rounds) / np.median(plain_rounds))
    paired = [c / b for c, b in zip(cached_rounds, plain_rounds, strict=True)]
    figures["hot_path_paired_ratios"] = paired
    figures["hot_p99_ratio"], figures["hot_path_ratio"] = ratio, throughput
    table = Table(title=f"Many models: {args.models} ONNX models, cache {budget.describe().split(';')[0]}")
    for column in ("figure", "value"):
        table.add_column(column)
    once, zipf_f, cache_f = figures["once"], figures["zipf"], figures["cache"]
    rows = [
        ("every model once: answered right / failed", f"{once['answered']} / {len(once['failures'])}"),
        ("  cold call p50 / p99 (ms)", f"{once['p50_ms']:,.0f} / {once['p99_ms']:,.0f}"),
        (
            f"Zipf s={args.zipf_s}, {args.requests} requests at {args.concurrency}: answered / failed",
            f"{zipf_f['answered']} / {len(zipf_f['failures'])}",
        ),
        (
            f"  hot {args.hot} models p50 / p99 (ms)",
            f"{zipf_f['hot_p50_ms']:.2f} / {zipf_f['hot_p99_ms']:.2f}",
        ),
        (
            "  hot models, 2nd half (warmed up) p50 / p99 (ms)",
            f"{zipf_f['steady_hot_p50_ms']:.2f} / {zipf_f['steady_hot_p99_ms']:,.2f}",
        ),
        ("  every model p99 (ms, cold loads included)", f"{zipf_f['all_p99_ms']:,.0f}"),
        ("  loads during the Zipf traffic", f"{zipf_f['loads']}"),
        (
            "server with only the hot models: p50 / p99 (ms)",
            f"{figures['plain']['hot_p50_ms']:.2f} / {figures['plain']['hot_p99_ms']:.2f}",
        ),
        ("hot p99, cache / only-hot (goal <= 1.2): all / 2nd half", f"{ratio:.2f} / {steady_ratio:.2f}"),
        ("  2nd half, round by round", spread(figures["steady_round_p99_ratios"])),
        (
            "loads / evictions / load failures",
            f"{cache_f['loads']} / {cache_f['evictions']} / {cache_f['failures']}",
        ),
        ("mean load (s, evictions included)", f"{cache_f['load_s'] / max(1, cache_f['loads']):.2f}"),
        (
            "most models loaded at once (sampled; budget, ceiling)",
            f"{figures['peak_loaded']} ({budget.max_models}, {budget.ceiling})",
        ),
        (
            "peak PSS, sampled / at the cache's decisions (MiB)",
            f"{figures['peak_pss_mib']:,.0f} / {cache_f['peak_memory_bytes'] / 2**20:,.0f}",
        ),
        ("idle server with the cache only (MiB PSS)", f"{figures['idle_pss_mib']:,.0f}"),
        ("models loaded for the hot path, on both servers", f"{figures['hot_path_loaded']}"),
        (f"hot path req/s ({figures['hot_path_tool']}): cache", spread(cached_rounds)),
        ("hot path req/s: no cache", spread(plain_rounds)),
        ("hot path, cache / no cache (goal >= 0.95): medians", f"{throughput:.3f}"),
        ("  the same, round by round", spread(paired)),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for failure in (once["failures"] + zipf_f["failures"] + figures["plain"]["failures"])[:10]:
        console.print(f"failed: {failure}", markup=False)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
