"""Run every benchmark (``benchmarks/*.py``) and write one machine-stamped results file.

Each benchmark compares its paths within one run, in alternating rounds where it takes ``--rounds``
(the median of the rounds and their spread are in its output); one without rounds of its own is run
``--repeat`` times. The results file (``benchmarks/results/<UTC time>-<host>.json``, git-ignored) holds
the machine stamp (host, CPUs, CPU model, load average, library versions), and per benchmark its command
line, exit code, duration, full output and, where the benchmark writes them, its figures as JSON.
The figures in docs/benchmarks.md come from such files, taken on a quiet machine.

    python benchmarks/run_all.py                     # full rounds
    python benchmarks/run_all.py --quick             # a smoke run: every benchmark, minimal rounds
    python benchmarks/run_all.py --only digits_vote_vs_handbuilt backend_vs_python_floor
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from _common import find_perf_analyzer, machine_stamp  # benchmarks/ is on sys.path when a script runs

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
RESULTS = HERE / "results"
LIBRARIES = ("tritonforge", "nvidia-pytriton", "tritonclient", "onnxruntime", "torch", "numpy", "grpcio")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How run_all drives one benchmark."""

    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ()
    rounds: bool = False  # takes --rounds (alternates internally)
    json: bool = False  # takes --json PATH
    repo: bool = False  # needs the example repository (--repo) with its pipelines
    perf_analyzer: bool = False  # needs perf_analyzer


PLANS: dict[str, Plan] = {
    "backend_overhead": Plan(quick=("--duration-s", "1"), json=True),
    "batch_infer": Plan(quick=("--rows", "20000", "--naive-rows", "200"), rounds=True),
    "backend_vs_python_floor": Plan(quick=("--window-ms", "500"), rounds=True, json=True, perf_analyzer=True),
    "client_overhead": Plan(
        quick=("--seconds", "0.5", "--warmup", "0.2", "--concurrency", "1", "16"), rounds=True
    ),
    "digits_vote_vs_handbuilt": Plan(
        quick=("--window-ms", "500"), rounds=True, json=True, perf_analyzer=True
    ),
    "ensemble_vs_client_chain": Plan(quick=("--duration-s", "0.5"), rounds=True, json=True, repo=True),
    "loadgen_capacity": Plan(quick=("--duration-s", "3"), json=True),  # locust needs whole seconds
    "many_models": Plan(
        quick=(
            *("--models", "30", "--budget", "6", "--requests", "300"),
            *("--duration-s", "1", "--rounds", "1", "--p99-rounds", "2"),
        ),
        json=True,
    ),
    "model_cost": Plan(quick=("--models", "4", "--loads", "1", "--settle-s", "0.5"), rounds=True, json=True),
    "quantization": Plan(quick=("--batch", "1", "--seq", "16"), rounds=True),
    "sampler_overhead": Plan(quick=("--seconds", "0.5"), rounds=True),
    "response_cache": Plan(
        quick=("--duration-s", "0.5", "--distinct", "200"), rounds=True, json=True, repo=True
    ),
    "toolchain_scale": Plan(quick=("--sizes", "20,50", "--repeat", "1", "--validate-live", "5"), json=True),
    "tokenizer_wordpiece": Plan(quick=("--texts", "256"), rounds=True, json=True),
    "token_packing": Plan(quick=("--seconds", "0.3"), rounds=True, json=True, repo=True),
    "tuner_search": Plan(quick=("--window-s", "0.3", "--confirm", "1", "--concurrency", "4"), json=True),
}


def benchmarks() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.py") if not p.stem.startswith("_") and p.stem != "run_all")


def versions() -> dict[str, str]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def command(name: str, plan: Plan, args: argparse.Namespace, json_out: Path) -> list[str]:
    argv = [sys.executable, str(HERE / f"{name}.py"), *(plan.quick if args.quick else plan.full)]
    if plan.rounds:
        argv += ["--rounds", str(1 if args.quick else args.rounds)]
    if plan.json:
        argv += ["--json", str(json_out)]
    if plan.repo:
        argv += ["--repo", str(args.repo)]
    return argv


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: minimal rounds and windows")
    parser.add_argument("--rounds", type=int, default=5, help="rounds for benchmarks that alternate")
    parser.add_argument("--repeat", type=int, default=2, help="runs of a benchmark without rounds")
    parser.add_argument("--repo", type=Path, default=PROJECT / "model_repository", help="the built examples")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="only these benchmarks")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: benchmarks/results/)")
    args = parser.parse_args()
    names = benchmarks()
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            sys.exit(f"no benchmark named {unknown}; they are {names}")
        names = [n for n in names if n in args.only]
    stamp = machine_stamp()
    stamp["libraries"] = versions()
    stamp["perf_analyzer"] = find_perf_analyzer()
    with_repo = (args.repo / "text_embedding" / "config.pbtxt").is_file()
    record: dict[str, Any] = {"machine": stamp, "quick": args.quick, "benchmarks": {}}
    RESULTS.mkdir(exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", stamp["host"] or "host")
    out = args.out or RESULTS / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{host}.json"
    for name in names:
        plan = PLANS.get(name)
        runs: list[dict[str, Any]] = []
        record["benchmarks"][name] = runs
        if plan is None:
            print(f"[run_all] {name}: no plan in run_all.PLANS, run with its defaults", flush=True)
            plan = Plan()
        if plan.repo and not with_repo:
            runs.append({"skipped": f"{args.repo} has no text_embedding pipeline; run `tritonforge build`"})
            print(f"[run_all] {name}: skipped ({runs[-1]['skipped']})", flush=True)
            continue
        if plan.perf_analyzer and stamp["perf_analyzer"] is None:
            runs.append({"skipped": "perf_analyzer not found"})
            print(f"[run_all] {name}: skipped (perf_analyzer not found)", flush=True)
            continue
        for attempt in range(1 if plan.rounds or args.quick else args.repeat):
            with tempfile.TemporaryDirectory(prefix="tritonforge-runall-") as scratch:
                json_out = Path(scratch) / "figures.json"
                argv = command(name, plan, args, json_out)
                print(f"[run_all] {name} (run {attempt + 1}): {' '.join(argv[1:])}", flush=True)
                started = time.perf_counter()
                proc = subprocess.run(argv, cwd=PROJECT, capture_output=True, text=True)
                run: dict[str, Any] = {
                    "argv": argv[1:],
                    "returncode": proc.returncode,
                    "seconds": round(time.perf_counter() - started, 1),
                    "output": proc.stdout,
                    "errors": proc.stderr[-5000:],
                }
                if json_out.is_file():
                    run["figures"] = json.loads(json_out.read_text())
                runs.append(run)
                state = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"[run_all] {name}: {state} in {run['seconds']} s", flush=True)
                if proc.returncode != 0:
                    print(proc.stderr[-1500:], file=sys.stderr)
        out.write_text(json.dumps(record, indent=2))  # after each benchmark: a partial run is kept
    out.write_text(json.dumps(record, indent=2))
    failed = [n for n, runs in record["benchmarks"].items() if any(r.get("returncode") for r in runs)]
    print(f"[run_all] results: {out}" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
