"""What the benchmarks share: summarising latencies, running perf_analyzer, server CPU, rounds and spread."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: perf_analyzer beside the project (a checkout next to a ``shared/tools/`` folder)
BESIDE_PROJECT = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "perf_analyzer"


def wide_console() -> Any:
    """A rich console wide enough that no table of ours wraps a name, in a terminal or piped into a log."""
    from rich.console import Console

    return Console(width=200)


def find_perf_analyzer(given: str | None = None) -> str | None:
    """perf_analyzer: ``given``, ``$PERF_ANALYZER``, on ``PATH`` or in ``../shared/tools/``; else None."""
    # ``shared/tools/`` beside the checkout, or beside a folder holding it (a worktree in ``wt/<name>``)
    beside = [str(p / "shared" / "tools" / "perf_analyzer") for p in Path(__file__).resolve().parents[1:4]]
    found = (
        given,
        os.environ.get("PERF_ANALYZER"),
        shutil.which("perf_analyzer"),
        str(BESIDE_PROJECT),
        *beside,
    )
    for candidate in found:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def summary(latencies: list[float], duration_s: float) -> dict[str, float]:
    """Throughput (requests/s over the window) and p50/p99 in milliseconds of latencies in seconds."""
    ms = np.array(latencies) * 1e3
    return {
        "throughput": len(latencies) / duration_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


# -- shared by the perf_analyzer benchmarks ---------------------------------------------------------------


def run_perf_analyzer(
    exe: str,
    url: str,
    model: str,
    concurrency: int,
    *,
    window_ms: int = 2000,
    batch: int = 1,
    extra: Sequence[str] = (),
) -> float:
    """One perf_analyzer run (gRPC, requests of ``batch`` rows, one concurrency level): its infer/s.

    Raises:
        RuntimeError: perf_analyzer failed (its stderr's tail is in the message).
    """
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
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "-p",
        str(window_ms),
        "--max-trials",
        "3",
        # rounds alternate and their spread is reported, so one window per run is enough: accept any
        "--stability-percentage",
        "999",
        "-v",
        *extra,
    ]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    passes = re.findall(r"Pass \[\d+\] throughput: ([\d.]+) infer/sec", proc.stdout)
    if proc.returncode != 0 and "stable" in proc.stderr + proc.stdout and passes:
        return float(np.median([float(p) for p in passes]))  # noisy machine: the windows' median
    if proc.returncode != 0:
        raise RuntimeError(
            f"perf_analyzer failed on {model} at concurrency {concurrency}: "
            f"{(proc.stderr or proc.stdout).strip()[-600:]}"
        )
    found = re.findall(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", proc.stdout)
    if not found:
        found = re.findall(r"Throughput: ([\d.]+) infer/sec", proc.stdout)
    if not found:
        raise RuntimeError(f"no throughput in perf_analyzer's output: {proc.stdout[-600:]}")
    return float(found[-1])


def process_tree(pid: int) -> list[Any]:
    """The psutil processes of ``pid`` and all its descendants (a server and its backend stubs)."""
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its living descendants."""
    import psutil

    total = 0.0
    for proc in process_tree(pid):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    """One process's memory totals from ``/proc/<pid>/smaps_rollup`` (Rss, Pss, Private_Dirty, ...), KiB."""
    figures: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                figures[parts[0].rstrip(":")] = int(parts[1])
    return figures


def tree_memory_mib(pid: int) -> dict[str, float]:
    """Memory of ``pid`` and its descendants, MiB: ``rss`` (shared pages counted in every process),
    ``pss`` (each shared page split among the processes that map it: what the tree really costs; other
    programs mapping the same library files lower it), ``uss`` (pages private to each process: what no
    other process shares, whatever else runs), ``processes``, and ``stubs_pss`` (the descendants alone:
    the Python-backend stubs of a server)."""
    import psutil

    totals = {"rss": 0.0, "pss": 0.0, "uss": 0.0, "processes": 0.0, "stubs_pss": 0.0}
    for proc in process_tree(pid):
        try:
            rollup = smaps_rollup_kib(proc.pid)
        except (OSError, psutil.Error):
            continue
        totals["rss"] += rollup.get("Rss", 0) / 1024
        totals["pss"] += rollup.get("Pss", 0) / 1024
        totals["uss"] += (rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)) / 1024
        totals["processes"] += 1
        if proc.pid != pid:
            totals["stubs_pss"] += rollup.get("Pss", 0) / 1024
    return totals


def model_stats(http_url: str, model: str) -> dict[str, Any]:
    """Triton's statistics of one model (all versions' first entry), from the HTTP statistics API."""
    with urllib.request.urlopen(f"{http_url}/v2/models/{model}/stats", timeout=10) as response:
        return json.loads(response.read())["model_stats"][0]


def success_count(http_url: str, model: str) -> int:
    """Requests the model has answered successfully so far."""
    return int(model_stats(http_url, model)["inference_stats"]["success"]["count"])


def spread(values: Sequence[float]) -> str:
    """``median (min-max, ±half-range %)`` of a metric's rounds, for tables."""
    arr = np.asarray(values, dtype=float)
    med = float(np.median(arr))
    half = (arr.max() - arr.min()) / 2 / med * 100 if med else float("nan")
    return f"{med:,.4g} ({arr.min():,.4g}-{arr.max():,.4g}, ±{half:.0f}%)"


def alternating(rounds: int, names: Sequence[str]) -> list[list[str]]:
    """The order of the variants in each round: forwards, then backwards, and so on (ABBA...), so that
    neither side always runs first or right after the other."""
    return [list(names) if r % 2 == 0 else list(reversed(names)) for r in range(rounds)]


def machine_stamp() -> dict[str, Any]:
    """Where and when figures were taken: host, CPUs, load, libraries (for results files)."""
    import datetime
    import platform

    stamp: dict[str, Any] = {
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                stamp["cpu_model"] = line.split(":", 1)[1].strip()
                break
    return stamp


def perf_analyzer_run_args(doc: str | None, concurrency: str) -> tuple[Any, str, list[int]]:
    """The options every alternating perf_analyzer benchmark takes, parsed: (args, perf_analyzer, levels).

    Exits with a one-line message when perf_analyzer is not found.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--concurrency", default=concurrency)
    parser.add_argument("--perf-analyzer", default=None, help="path (else $PERF_ANALYZER, PATH, shared/)")
    parser.add_argument("--json", type=Path, help="also write the rounds and medians here")
    args = parser.parse_args()
    exe = find_perf_analyzer(args.perf_analyzer)
    if exe is None:
        sys.exit("perf_analyzer not found: pass --perf-analyzer PATH or set $PERF_ANALYZER")
    return args, exe, [int(c) for c in args.concurrency.split(",")]


def load_wordpiece() -> type:
    """The tokenizer block's standard-library ``WordPiece`` class, loaded from the file the block ships."""
    import importlib.util

    from tritonforge.ensemble.blocks import model_file

    spec = importlib.util.spec_from_file_location("wordpiece", model_file("wordpiece"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.WordPiece  # type: ignore[no-any-return]
