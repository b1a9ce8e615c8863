"""What an idle model costs on the embedded Triton: processes, memory (RSS and PSS), time to ready, load time.

Two parts, each repeated ``--rounds`` times with the spread reported:

- **tiny ONNX models**: a repository of N small ONNX models (one 64x16 MatMul each, dynamic batching, one
  instance) served by one embedded Triton, for each N of ``--models``. Per round: the server is started
  with every model loaded (time to ready, from launch to ready), left idle for ``--settle-s``, then
  measured over the server and all its children (``/proc/<pid>/smaps_rollup``): processes, RSS, PSS, and
  PSS per model (the whole tree's PSS / N, and the stubs' alone / N), USS per model (the tree's private
  pages / N: PSS also depends on what else maps the same library files), threads per stub and in the server,
  and PSS again once each model has answered one request (what a stub loads for its first request). Then one
  model is unloaded and loaded again ``--loads`` times (the load API call's wall time: one model's load,
  nothing else loading). The first round also prints where one stub's PSS goes, mapping by mapping
  (``/proc/<pid>/smaps``). ``--server-arg`` passes tritonserver options to this part's servers.
- **digits_vote vs hand-built**: the repositories of ``digits_vote_vs_handbuilt.py`` (the built
  ``digits_vote``, fused; the same unfused; the pipeline written by hand), each served alone, loading only
  its pipeline, in alternating rounds: time to ready, processes and idle PSS, and the ratios built/hand.

Timing figures are comparable only within one run, on a quiet machine.

    python benchmarks/model_cost.py [--models 10,50] [--rounds 3] [--loads 5] [--part tiny|digits|all]
        [--server-arg=ARG ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import (  # benchmarks/ is on sys.path when a script runs
    alternating,
    machine_stamp,
    spread,
    tree_memory_mib,
    wide_console,
)
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tritonforge.server import EmbeddedServer

CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [{{ name: "x" data_type: TYPE_FP32 dims: [64] }}]
output [{{ name: "y" data_type: TYPE_FP32 dims: [16] }}]
dynamic_batching {{}}
instance_group [{{ count: 1 kind: KIND_CPU }}]
"""


def tiny_repository(root: Path, count: int) -> Path:
    """``count`` small ONNX models (``m0``...): y = x @ W, W of 64x16, each its own folder."""
    from onnx import TensorProto, helper, numpy_helper, save

    weights = numpy_helper.from_array(np.random.default_rng(0).random((64, 16), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    repo = root / f"tiny-{count}"
    for i in range(count):
        (repo / f"m{i}" / "1").mkdir(parents=True)
        save(model, repo / f"m{i}" / "1" / "model.onnx")
        (repo / f"m{i}" / "config.pbtxt").write_text(CONFIG.format(name=f"m{i}"))
    return repo


def _mapping_kind(name: str) -> str:
    if name == "[heap]":
        return "heap (malloc: onnxruntime's static registries, sessions, C++ allocations)"
    if name in ("", "[anon]"):
        return "anonymous (Python objects and code, thread stacks, large mallocs)"
    if name.startswith("[stack"):
        return "main stack"
    if "/dev/shm/" in name:
        return "Python backend's shared memory with the server"
    base = os.path.basename(name)
    if "onnxruntime" in name:
        return "onnxruntime's libraries"
    if "/numpy" in name:
        return "numpy's libraries"
    if base.startswith("libpython"):
        return "libpython"
    if base == "triton_python_backend_stub":
        return "stub binary"
    if name.startswith("["):
        return "kernel ([vdso], [vvar]...)"
    return "other files (libc, libstdc++, stdlib modules...)"


def stub_breakdown(pid: int) -> dict[str, float]:
    """One process's PSS by kind of mapping, MiB, from ``/proc/<pid>/smaps``."""
    kinds: collections.Counter[str] = collections.Counter()
    kind = ""
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and not parts[0].endswith(":"):
                kind = _mapping_kind(parts[5] if len(parts) > 5 else "")
            elif parts[0] == "Pss:":
                kinds[kind] += int(parts[1]) / 1024
    return dict(kinds.most_common())


def stub_pids(server_pid: int) -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process(server_pid).children(recursive=True)]


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def answer_each(server: EmbeddedServer, count: int) -> None:
    """One request to each model, its answer checked (y = x @ W for the same W in every model)."""
    import tritonclient.grpc as grpcclient

    x = np.ones((1, 64), dtype=np.float32)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        answers = []
        for i in range(count):
            item = grpcclient.InferInput("x", [1, 64], "FP32")
            item.set_data_from_numpy(x)
            answers.append(client.infer(f"m{i}", [item]).as_numpy("y"))
    finally:
        client.close()
    if any(a is None or a.shape != (1, 16) or not np.allclose(a, answers[0]) for a in answers):
        raise SystemExit("the tiny models did not all answer alike")


def tiny_round(
    repo: Path, count: int, loads: int, settle_s: float, breakdown: bool, server_args: list[str]
) -> dict[str, Any]:
    started = time.perf_counter()
    server = EmbeddedServer(repo, model_control="explicit", load_models=["*"], extra_args=server_args).start()
    try:
        ready_s = time.perf_counter() - started
        time.sleep(settle_s)
        assert server.pid is not None
        memory = tree_memory_mib(server.pid)
        stubs = stub_pids(server.pid)
        figures: dict[str, Any] = {
            "models": count,
            "ready_s": ready_s,
            **memory,
            "pss_per_model": memory["pss"] / count,
            "stub_pss_per_model": memory["stubs_pss"] / count,
            "uss_per_model": memory["uss"] / count,
            "threads_per_stub": float(np.median([threads_of(p) for p in stubs])) if stubs else 0,
            "server_threads": threads_of(server.pid),
        }
        if breakdown and stubs:
            figures["breakdown"] = stub_breakdown(stubs[-1])
        answer_each(server, count)  # a model that has answered costs more: its stub loads more then
        time.sleep(settle_s)
        figures["pss_per_model_answered"] = tree_memory_mib(server.pid)["pss"] / count
        load_s = []
        for _ in range(loads):
            server.unload_model("m0")
            began = time.perf_counter()
            server.load_model("m0")
            load_s.append(time.perf_counter() - began)
        figures["load_s"] = load_s
        return figures
    finally:
        server.stop()


def tiny_part(console: Console, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    counts = [int(c) for c in args.models.split(",")]
    rounds: list[dict[str, Any]] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("tiny models", total=len(counts) * args.rounds)
        for count in counts:
            repo = tiny_repository(root, count)
            for r in range(args.rounds):
                progress.update(task, description=f"{count} tiny models, round {r + 1}/{args.rounds}")
                rounds.append(tiny_round(repo, count, args.loads, args.settle_s, r == 0, args.server_arg))
                progress.advance(task)
    memory = Table(
        title=f"idle memory of N tiny ONNX models: median of {args.rounds} rounds (min-max, ±half-range)"
    )
    times = Table(
        title=f"time to ready and one model's load: median of {args.rounds} rounds (min-max, ±half-range)"
    )
    for column in (
        "models",
        "processes",
        "threads/stub",
        "server threads",
        "RSS MiB",
        "PSS MiB",
        "PSS/model",
        "stub PSS/model",
        "USS/model",
        "PSS/model, each answered once",
    ):
        memory.add_column(column, justify="right")
    for column in ("models", "time to ready s", f"one model's load s ({args.loads} per round)"):
        times.add_column(column, justify="right")
    for count in counts:
        mine = [x for x in rounds if x["models"] == count]
        memory.add_row(
            str(count),
            spread([x["processes"] for x in mine]),
            spread([x["threads_per_stub"] for x in mine]),
            spread([x["server_threads"] for x in mine]),
            spread([x["rss"] for x in mine]),
            spread([x["pss"] for x in mine]),
            spread([x["pss_per_model"] for x in mine]),
            spread([x["stub_pss_per_model"] for x in mine]),
            spread([x["uss_per_model"] for x in mine]),
            spread([x["pss_per_model_answered"] for x in mine]),
        )
        times.add_row(
            str(count),
            spread([x["ready_s"] for x in mine]),
            spread([s for x in mine for s in x["load_s"]]) if args.loads else "",
        )
    console.print(memory)
    console.print(times)
    first = next((x for x in rounds if "breakdown" in x), None)
    if first is not None:
        parts = Table(title=f"where one stub's PSS goes ({first['models']} models loaded, first round)")
        parts.add_column("mapping")
        parts.add_column("PSS MiB", justify="right")
        for kind, mib in first["breakdown"].items():
            if mib >= 0.05:
                parts.add_row(kind, f"{mib:.2f}")
        parts.add_row("total", f"{sum(first['breakdown'].values()):.2f}")
        console.print(parts)
    return rounds


def digits_part(console: Console, args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    # the repositories, exactly as the throughput comparison builds them
    from digits_vote_vs_handbuilt import BUILT, ENSEMBLE, HAND, SIDES, UNFUSED, build_built, build_hand

    with console.status("training the digits models and compiling digits_vote ..."):
        built, unfused = build_built(root)
        hand = build_hand(root, built)
    repos = {BUILT: built, UNFUSED: unfused, HAND: hand}
    rounds: list[dict[str, Any]] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("digits_vote", total=args.rounds * len(SIDES))
        for r, order in enumerate(alternating(args.rounds, list(SIDES))):
            for side in order:
                progress.update(task, description=f"round {r + 1}/{args.rounds}: {side}")
                started = time.perf_counter()
                server = EmbeddedServer(
                    repos[side], model_control="explicit", load_models=[ENSEMBLE[side]]
                ).start()
                try:
                    ready_s = time.perf_counter() - started
                    time.sleep(args.settle_s)
                    assert server.pid is not None
                    rounds.append(
                        {"round": r + 1, "side": side, "ready_s": ready_s, **tree_memory_mib(server.pid)}
                    )
                finally:
                    server.stop()
                progress.advance(task)
    table = Table(
        title=f"digits_vote built vs hand-built at rest: median of {args.rounds} alternating rounds "
        "(min-max, ±half-range)"
    )
    for column in (
        "side",
        "processes",
        "idle RSS MiB",
        "idle PSS MiB",
        "idle USS MiB",
        "time to ready s",
        "PSS vs hand",
        "ready vs hand",
    ):
        table.add_column(column, justify="left" if column == "side" else "right")
    by = {side: [x for x in rounds if x["side"] == side] for side in SIDES}
    for side in SIDES:
        pss_ratio = [s["pss"] / h["pss"] for s, h in zip(by[side], by[HAND], strict=True)]
        ready_ratio = [s["ready_s"] / h["ready_s"] for s, h in zip(by[side], by[HAND], strict=True)]
        table.add_row(
            side,
            spread([x["processes"] for x in by[side]]),
            spread([x["rss"] for x in by[side]]),
            spread([x["pss"] for x in by[side]]),
            spread([x["uss"] for x in by[side]]),
            spread([x["ready_s"] for x in by[side]]),
            "" if side == HAND else spread(pss_ratio) + "x",
            "" if side == HAND else spread(ready_ratio) + "x",
        )
    console.print(table)
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--models", default="10,50", help="repository sizes to measure, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="server starts per size / per side")
    parser.add_argument("--loads", type=int, default=5, help="unload+load cycles of one model per round")
    parser.add_argument("--settle-s", type=float, default=2.0, help="idle time before memory is read")
    parser.add_argument("--part", choices=("tiny", "digits", "all"), default="all")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an argument for tritonserver in the tiny part (repeat for more), e.g. "
        "--server-arg=--backend-config=python,thread-pool-size=1",
    )
    parser.add_argument("--json", type=Path, help="also write the rounds here")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("model_cost reads /proc/<pid>/smaps_rollup: run it on Linux")
    console = wide_console()
    stamp = machine_stamp()
    console.print(
        f"{stamp['at']} on {stamp['host']} ({stamp.get('cpu_model', '?')}, "
        f"{stamp['cpus_usable']} CPUs usable, "
        f"load average {', '.join(f'{x:.1f}' for x in stamp['loadavg'] or ())})",
        highlight=False,
    )
    console.print(
        "command: python " + shlex.join(["benchmarks/model_cost.py", *sys.argv[1:]]), highlight=False
    )
    root = Path(tempfile.mkdtemp(prefix="tritonforge-bench-cost-"))
    record: dict[str, Any] = {"machine": stamp, "argv": sys.argv[1:]}
    try:
        if args.part in ("tiny", "all"):
            record["tiny"] = tiny_part(console, args, root)
        if args.part in ("digits", "all"):
            record["digits"] = digits_part(console, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
