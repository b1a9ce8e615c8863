"""``tritonforge bench`` and ``tritonforge tune``: sweeps and the config tuner from the command line."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tritonforge.errors import TritonForgeError

console = Console()
err_console = Console(stderr=True)


def _fail(exc: TritonForgeError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
    return typer.Exit(code=1)


@contextlib.contextmanager
def _progress(total_levels: int, what: str) -> Iterator[Any]:
    """A progress bar over levels, with the current level's windows in its description."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
        console=console,
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
            elif kind == "done":
                progress.update(task, completed=progress.tasks[0].total)

        yield on_event


def _levels_table(result: Any) -> Table:
    table = Table(title=f"{result.model} ({result.label})" if result.label else result.model)
    for column in (
        result.mode.replace("_", " "),
        "infer/s",
        "Triton's /s",
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
            f"{lv.throughput_rps:,.1f}",
            "" if lv.server_throughput_rps is None else f"{lv.server_throughput_rps:,.1f}",
            *(f"{lv.latency_ms[p]:.2f}" for p in ("p50", "p90", "p95", "p99")),
            str(lv.errors),
            "yes" if lv.stable else "[yellow]no[/]",
        )
    return table


def bench_command(
    model: str = typer.Argument(..., help="The model (or ensemble) to sweep."),
    url: str | None = typer.Option(
        None, help="A running server's gRPC HOST:PORT (default: start the embedded server on --repository)."
    ),
    repository: Path = typer.Option(Path("model_repository"), help="The repository for the embedded server."),
    concurrency: str | None = typer.Option(None, help="Closed-loop levels: '1,2,4' or '1:16' (powers of 2)."),
    request_rate: str | None = typer.Option(None, help="Open-loop levels in requests/s: '100,200,400'."),
    output: Path = typer.Option(Path("bench_results"), help="Where sweep.csv, sweep.json, report.html go."),
    window_s: float = typer.Option(2.0, help="Length of one measurement window."),
    stability_percent: float = typer.Option(10.0, help="Windows agree when within this percentage."),
    max_windows: int = typer.Option(10, help="Give up on stability after this many windows per level."),
    batch: int = typer.Option(1, help="Rows per request (for inputs generated from the config)."),
    data: Path | None = typer.Option(None, help="Real inputs: an .npz with one array per input name."),
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
        err_console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(code=2) from None
    inputs = load_payloads(data) if data is not None else None
    try:
        with _progress(len(settings.levels), f"bench {model}") as on_event:
            result = bench(
                model,
                settings=settings,
                url=url,
                repository=repository,
                output=output,
                inputs=inputs,
                batch=batch,
                on_event=on_event,
            )
            on_event("done", {})
    except TritonForgeError as exc:
        raise _fail(exc) from None
    console.print(_levels_table(result))
    if result.stopped_at:
        err_console.print(f"[bold red]stopped early:[/] {result.stopped_at} (partial results kept)")
    console.print(f"wrote {output / 'sweep.csv'}, {output / 'sweep.json'}, {output / 'report.html'}")
    raise typer.Exit(code=0 if result.complete else 1)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
