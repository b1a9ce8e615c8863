"""The tuner's search against trying every config, on the digits MLP (tritonforge.examples.build_digits).

1. **Exhaustive**: every config of the search space (24) is loaded and swept.
2. **The search, replayed** over those very measurements (coordinate search from the served config,
   budget a third of the space): which configs it would try and which it would pick. Same data, so this
   isolates the search from measurement noise.
3. **The search, for real**: ``Tuner`` as ``tritonforge tune`` runs it, fresh measurements.
4. **Confirmation**: a single sweep per config favours whichever config had a lucky window (the best of
   24 noisy figures is biased upwards — the winner's curse). So the exhaustive winner and the searches'
   picks are re-measured, alternating, ``--confirm`` times each, and compared by their median throughput:
   "within 5%" means the search's pick reaches at least 0.95x the exhaustive winner's.

    python benchmarks/tuner_search.py [--budget-ms 25] [--window-s 1.0] [--confirm 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SPACE = {
    "max_batch_size": (8, 32),
    "max_queue_delay_us": (0, 500, 2000),
    "instances": (1, 2),
    "preferred": ("none", "max"),
    # one intra-op thread per instance: the grid of the figures in docs/benchmarks.md (the tuner also
    # searches threads, which would make it 54 configs on 2 CPUs)
    "intra_op_threads": (1,),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-ms", type=float, default=25.0, help="p99 latency budget")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--window-s", type=float, default=1.0)
    parser.add_argument("--confirm", type=int, default=5, help="re-measurements per config compared")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)

    from _common import wide_console  # benchmarks/ is on sys.path
    from rich.progress import Progress
    from rich.table import Table

    from tritonforge.examples import build_digits
    from tritonforge.loadtest import SweepSettings
    from tritonforge.loadtest.search import SearchSpace
    from tritonforge.loadtest.tune import Tuner
    from tritonforge.server import EmbeddedServer

    console = wide_console()  # names unbroken when piped
    settings = SweepSettings(
        concurrency=tuple(args.concurrency),
        window_s=args.window_s,
        warmup_s=0.5,
        stability_percent=10,
        max_windows=6,
    )
    space = SearchSpace(**SPACE)
    with tempfile.TemporaryDirectory(prefix="tritonforge-tune-bench-") as scratch:
        repo = Path(scratch) / "repo"
        with console.status("training and exporting the digits MLP ..."):
            build_digits.build(repo, kinds=("mlp",))
        with (
            EmbeddedServer(repo, model_control="explicit", load_models=["digits_mlp"]) as server,
            Progress(console=console, transient=True) as progress,
        ):

            def tuner(exhaustive: bool, what: str) -> Tuner:
                t = Tuner(
                    server,
                    repo,
                    "digits_mlp",
                    p99_budget_ms=args.budget_ms,
                    space=space,
                    settings=settings,
                    exhaustive=exhaustive,
                )
                total = t.space_size if exhaustive else t.max_trials
                task = progress.add_task(what, total=total)
                t.on_trial = lambda trial: progress.advance(task)
                return t

            every = tuner(True, "exhaustive: every config")
            exhaustive = every.run()
            measured = every.trials_by_point
            budget = math.ceil(every.space_size / 3)
            replayed = every.replay_search(budget)
            point_of = {id(t): p for p, t in measured.items()}
            best = point_of[id(exhaustive.winner)]
            replay_pick = max(replayed, key=lambda p: measured[p].score())

            search = tuner(False, "the search (tritonforge tune)")
            searched = search.run()
            search_pick = next(p for p, t in search.trials_by_point.items() if t is searched.winner)

            picks = {"exhaustive winner": best, "search, replayed": replay_pick, "search, fresh": search_pick}
            distinct = list(dict.fromkeys(picks.values()))
            confirm = {p: [] for p in distinct}
            task = progress.add_task(
                "re-measuring the picks, alternately", total=args.confirm * len(distinct)
            )
            for _ in range(args.confirm):
                for point in distinct:
                    trial = every.measure(point)
                    confirm[point].append(trial.throughput_rps or 0.0)
                    progress.advance(task)

    table = Table(title=f"every config (digits MLP, p99 budget {args.budget_ms:g} ms), best first")
    for column in ("config", "req/s", "p99 ms at best", "replayed search tried"):
        table.add_column(column, justify="right")
    for point, trial in sorted(measured.items(), key=lambda kv: kv[1].score(), reverse=True):
        level = trial.best_level
        table.add_row(
            every.label(point),
            f"{trial.throughput_rps:,.0f}" if trial.throughput_rps else "over budget",
            f"{level.p99_ms:.1f}" if level else "",
            "yes" if point in replayed else "",
        )
    console.print(table)
    medians = {p: statistics.median(v) for p, v in confirm.items()}
    summary = Table(title=f"the picks, re-measured {args.confirm}x each (alternating); median req/s")
    for column in ("pick", "config", "its first sweep req/s", "median req/s", "vs exhaustive winner"):
        summary.add_column(column, justify="right")
    for name, point in picks.items():
        source = search.trials_by_point if name == "search, fresh" else measured
        single = source[point].single_rps or 0.0
        summary.add_row(
            name,
            every.label(point),
            f"{single:,.0f}",
            f"{medians[point]:,.0f}",
            f"{medians[point] / medians[best]:.3f}x",
        )
    console.print(summary)
    console.print(
        f"exhaustive: {exhaustive.tried}/{exhaustive.space_size} configs; replayed search: "
        f"{len(replayed)}/{every.space_size} ({len(replayed) / every.space_size:.0%}); fresh search: "
        f"{searched.tried}/{searched.space_size} ({searched.fraction_tried:.0%})"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "trials": {every.label(p): t.throughput_rps for p, t in measured.items()},
                    "picks": {k: every.label(p) for k, p in picks.items()},
                    "confirm": {every.label(p): v for p, v in confirm.items()},
                    "tried": {"replayed": len(replayed), "fresh": searched.tried, "space": every.space_size},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
