"""``tritonforge bench`` and ``tritonforge tune``: sweeps and the config tuner from the command line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tritonforge.commands import err_console, fail, print_error
from tritonforge.commands._options import json_flag, out_option, repo_option
from tritonforge.commands._output import make_console, print_json
from tritonforge.commands._renamed import renamed
from tritonforge.commands.access import with_access
from tritonforge.errors import TritonForgeError

console = make_console()
_fail = fail  # one way to report errors for every verb (tritonforge.commands)


class Sender(str, Enum):
    """What sends a sweep's requests."""

    tritonforge = "tritonforge"
    tritonclient = "tritonclient"


@contextlib.contextmanager
def _progress(total_levels: int, what: str, *, as_json: bool = False) -> Iterator[Any]:
    """A progress bar over levels, with the current level's windows in its description (on stderr when
    stdout carries ``--json``)."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=err_console if as_json else console,
        transient=False,
    ) as progress:
        task = progress.add_task(what, total=total_levels)
        state = {"prefix": ""}

        def on_event(kind: str, data: Mapping[str, Any]) -> None:
            if kind == "level":
                if data["index"]:
                    progress.advance(task)
                progress.update(task, description=f"{state['prefix']}{what} level {data['level']:g}")
            elif kind == "window":
                progress.update(
                    task,
                    description=f"{state['prefix']}{what} level {data['level']:g} "
                    f"window {data['window']}/{data['max_windows']} "
                    f"({data['throughput_rps']:,.0f}/s)",
                )
            elif kind == "config":
                state["prefix"] = f"config {data['index']}/{data['budget']} "
                progress.update(
                    task,
                    completed=data["index"] - 1,
                    total=data["budget"],
                    description=f"{state['prefix']}{data['label']}",
                )
            elif kind == "refine":
                state["prefix"] = f"re-measuring config {data['index']} "
                progress.update(task, description=f"{state['prefix']}{data['label']}")
            elif kind == "done":
                progress.update(task, completed=progress.tasks[0].total)

        yield on_event


def _levels_table(result: Any) -> Table:
    table = Table(title=f"{result.model} ({result.label})" if result.label else result.model)
    for column in (
        "conc" if result.mode == "concurrency" else "rate/s",
        "infer/s",
        "Triton/s",
        "p50 ms",
        "p90 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "stable",
    ):
        table.add_column(column, justify="right")
    for lv in result.levels:
        table.add_row(
            f"{lv.level:g}",
            f"{lv.throughput_rps:,.0f}",
            "" if lv.server_throughput_rps is None else f"{lv.server_throughput_rps:,.0f}",
            *(f"{lv.latency_ms[p]:.2f}" for p in ("p50", "p90", "p95", "p99")),
            str(lv.errors),
            "yes" if lv.stable else "[yellow]no[/]",
        )
    table.caption = "Triton/s: Triton's own request count over the same windows"
    return table


# how bench and tune measure a level: windows until they agree (each verb with its own defaults)
def _window_s(default: float) -> Any:
    return typer.Option(default, help="Length of one measurement window.")


def _stability_percent(default: float) -> Any:
    return typer.Option(default, help="Windows agree when within this percentage.")


def _max_windows(default: int) -> Any:
    return typer.Option(default, help="Give up on stability after this many windows per level.")


@renamed({"--repository": "--repo", "--output": "--out", "--batch": "--batch-size"})
@with_access
def bench_command(
    model: str = typer.Argument(..., help="The model (or ensemble) to sweep."),
    url: str | None = typer.Option(
        None, help="A running server's gRPC HOST:PORT (default: start the embedded server on --repo)."
    ),
    repo: Path = repo_option("The repository for the embedded server."),
    concurrency: str | None = typer.Option(None, help="Closed-loop levels: '1,2,4' or '1:16' (powers of 2)."),
    request_rate: str | None = typer.Option(None, help="Open-loop levels in requests/s: '100,200,400'."),
    out: Path = out_option(Path("bench_results"), "Where sweep.csv, sweep.json, report.html go."),
    window_s: float = _window_s(2.0),
    stability_percent: float = _stability_percent(10.0),
    max_windows: int = _max_windows(10),
    batch_size: int = typer.Option(1, help="Rows per request (for inputs generated from the config)."),
    data: Path | None = typer.Option(None, help="Real inputs: an .npz with one array per input name."),
    client: Sender = typer.Option(
        Sender.tritonforge, help="What sends: 'tritonforge' (AsyncClient) or 'tritonclient' (raw)."
    ),
    as_json: bool = json_flag("Print sweep.json's document instead of a table."),
    access: object = None,
) -> None:
    """Sweep MODEL over concurrency levels or request rates, like perf_analyzer; write CSV, JSON and HTML."""
    from tritonforge.loadtest.bench import bench, load_payloads, parse_levels
    from tritonforge.loadtest.sweep import SweepSettings

    if (concurrency is None) == (request_rate is None):
        concurrency = concurrency or ("1,2,4,8" if request_rate is None else None)
        if concurrency is not None and request_rate is not None:
            err_console.print("[bold red]error:[/] give --concurrency or --request-rate, not both")
            raise typer.Exit(code=2)
    try:
        settings = SweepSettings(
            concurrency=parse_levels(concurrency) if concurrency else (),
            request_rates=parse_levels(request_rate, float) if request_rate else (),
            window_s=window_s,
            stability_percent=stability_percent,
            max_windows=max_windows,
        )
    except ValueError as exc:
        raise fail(exc, code=2) from None
    inputs = load_payloads(data) if data is not None else None
    try:
        with _progress(len(settings.levels), f"bench {model}", as_json=as_json) as on_event:
            result = bench(
                model,
                settings=settings,
                url=url,
                repository=repo,
                output=out,
                inputs=inputs,
                batch=batch_size,
                on_event=on_event,
                client=client.value,
                auth=access,  # type: ignore[arg-type]
            )
            on_event("done", {})
    except TritonForgeError as exc:
        raise _fail(exc) from None
    if as_json:
        print_json(json.loads((out / "sweep.json").read_text()))
    else:
        console.print(_levels_table(result))
    if result.stopped_at:
        err_console.print(f"[bold red]stopped early:[/] {result.stopped_at} (partial results kept)")
    if not as_json:
        console.print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.json'}, {out / 'report.html'}")
    raise typer.Exit(code=0 if result.complete else 1)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@renamed({"--repository": "--repo", "--output": "--out"})
def tune_command(
    model: str = typer.Argument(..., help="The model (or ensemble: its composing models are tuned) to tune."),
    p99_budget_ms: float = typer.Option(..., help="The p99 latency every accepted config must meet."),
    repo: Path = repo_option("The repository (served by the embedded server with explicit model control)."),
    concurrency: str = typer.Option(
        "1,4,16", help="Levels swept per config (stops at the first over budget)."
    ),
    max_batch_size: str = typer.Option("8,16,32,64", help="Max batch sizes to try."),
    max_queue_delay_us: str = typer.Option("0,200,1000,5000", help="Max queue delays to try (µs)."),
    instances: str = typer.Option("1,2", help="Instance counts to try."),
    intra_op_threads: str = typer.Option(
        "",
        help="Intra-op threads per instance to try (ONNX / TorchScript models; default: 1, all CPUs and "
        "half of them). Candidates keep instances x threads within the CPUs.",
    ),
    preferred: str = typer.Option(
        "none,max", help="Preferred batch sizes: none, max (\\[mbs]), half (\\[mbs/2, mbs])."
    ),
    window_s: float = _window_s(1.0),
    stability_percent: float = _stability_percent(15.0),
    max_windows: int = _max_windows(6),
    max_trials: int | None = typer.Option(
        None, help="Configs to try at most (default: a third of the space)."
    ),
    exhaustive: bool = typer.Option(False, help="Try every config (for comparison with the search)."),
    refine: int = typer.Option(
        2, help="Re-measure the leading configs this many times and rank them by the median (0: never)."
    ),
    write: bool = typer.Option(
        False,
        help="Write the winning config(s) into the repository, and the layout chosen and why into the "
        "manifest of the version measured.",
    ),
    out: Path = out_option(Path("tune_results"), "Where tune.json, tune.csv and report.html go."),
    as_json: bool = json_flag("Print tune.json's document instead of a table."),
) -> None:
    """Find the config of MODEL with the highest throughput whose p99 stays within the budget."""
    from tritonforge.loadtest.search import PREFERRED_KINDS, SearchSpace
    from tritonforge.loadtest.sweep import SweepSettings
    from tritonforge.loadtest.tune import tune

    unknown = [kind for kind in preferred.split(",") if kind not in PREFERRED_KINDS]
    if unknown:
        kinds = ", ".join(PREFERRED_KINDS)
        print_error(f"--preferred {unknown[0]!r} is not one of {kinds} (a comma list, e.g. none,max)")
        raise typer.Exit(code=2)
    try:
        space = SearchSpace(
            max_batch_size=_ints(max_batch_size),
            max_queue_delay_us=_ints(max_queue_delay_us),
            instances=_ints(instances),
            preferred=tuple(preferred.split(",")),
            intra_op_threads=_ints(intra_op_threads) or None,
        )
        settings = SweepSettings(
            concurrency=_ints(concurrency),
            window_s=window_s,
            stability_percent=stability_percent,
            max_windows=max_windows,
        )
    except ValueError as exc:
        raise fail(exc, code=2) from None
    try:
        with _progress(1, f"tune {model}", as_json=as_json) as on_event:
            result = tune(
                model,
                repository=repo,
                p99_budget_ms=p99_budget_ms,
                space=space,
                settings=settings,
                max_trials=max_trials,
                exhaustive=exhaustive,
                refine=refine,
                write=write,
                output=out,
                on_event=on_event,
            )
            on_event("done", {})
    except TritonForgeError as exc:
        raise _fail(exc) from None
    if as_json:
        print_json(json.loads((out / "tune.json").read_text()))
        raise typer.Exit(code=0 if result.winner is not None and not result.stopped_at else 1)
    console.print(_trials_table(result))
    raise typer.Exit(code=_print_verdict(result, out))


def _trials_table(result: Any) -> Table:
    """Every config tried, with its figure within the budget and how it ranks."""
    table = Table(
        title=f"tune {result.model}: p99 budget {result.budget_ms:g} ms, tried {result.tried} of "
        f"{result.space_size} configs ({result.fraction_tried:.0%}), {result.strategy}"
    )
    for column in ("#", "config", "best infer/s within budget", "at concurrency", "lowest p99 ms", "note"):
        table.add_column(column)
    for t in result.trials:
        s = t.summary()
        note = "[green]winner[/]" if t is result.winner else ("default" if t is result.default else "")
        if t.repeats:
            note = f"{note} (median of {len(t.repeats) + 1} sweeps)".strip()
        if t.error:
            note = f"[red]{t.error[:60]}[/]"
        table.add_row(
            str(t.index),
            t.label,
            "-" if s["throughput_rps"] is None else f"{s['throughput_rps']:,.1f}",
            "-" if s["at_level"] is None else f"{s['at_level']:g}",
            "-" if s["min_p99_ms"] is None else f"{s['min_p99_ms']:.2f}",
            note,
        )
    return table


def _print_verdict(result: Any, output: Path) -> int:
    """Say how the tune ended (stopped, nothing within budget, or the winner); the exit code."""
    if result.stopped_at:
        err_console.print(
            f"[bold red]stopped early:[/] {result.stopped_at} (the configs tried before are kept; "
            "nothing written to the repository)"
        )
        console.print(f"wrote {output / 'tune.json'}, {output / 'report.html'}")
        return 1
    if result.winner is None:
        closest = result.closest
        where = f"; closest: {closest.label} with p99 {closest.min_p99_ms:.2f} ms" if closest else ""
        err_console.print(f"[bold red]no config met p99 <= {result.budget_ms:g} ms[/]{where}")
        console.print(f"wrote {output / 'tune.json'}, {output / 'report.html'}")
        return 1
    default = result.default.throughput_rps if result.default else None
    best = result.winner.throughput_rps or 0.0
    versus = f" ({best / default:.2f}x the default)" if default else " (the default met the budget nowhere)"
    console.print(f"[green]best:[/] {result.winner.label}: {best:,.1f} infer/s{versus}")
    if result.written:
        console.print(
            "wrote the winning config to " + ", ".join(result.written) + " (the layout chosen and why: "
            "'layout' in the manifest of the version measured)"
        )
    console.print(f"wrote {output / 'tune.json'}, {output / 'tune.csv'}, {output / 'report.html'}")
    return 0


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
    app.command("tune")(tune_command)
