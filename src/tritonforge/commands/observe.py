"""``tritonforge monitor``, ``tritonforge slo`` and ``tritonforge drift``: watching models in production."""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from tritonforge.commands import fail
from tritonforge.commands._options import json_flag, out_option
from tritonforge.commands._output import make_console
from tritonforge.commands._renamed import deprecated, renamed
from tritonforge.commands._rows import MATCH, TABLE_ROWS, limit_option, rows_shown
from tritonforge.commands.access import with_access
from tritonforge.errors import TritonForgeError

console = make_console()


_fail = fail  # one way to report errors for every verb (tritonforge.commands)
_JSON_TABLE = json_flag("JSON instead of a table.")  # drift and cost


class MonitorSort(str, Enum):
    name = "name"
    requests = "requests"
    failures = "failures"
    p99 = "p99"
    latency = "latency"
    queue = "queue"
    busy = "busy"


@renamed({"--grpc": "--url", "--interval": "--interval-s"})
@with_access
def monitor(
    ctx: typer.Context,
    metrics_url: list[str] = typer.Option(
        [], help="A Triton metrics endpoint (HOST:PORT, default path /metrics); repeat for several."
    ),
    url: list[str] = typer.Option(
        [], help="The servers' gRPC HOST:PORT (same order) for batch sizes from the statistics API."
    ),
    interval_s: float = typer.Option(2.0, help="Seconds between readings."),
    once: bool = typer.Option(False, help="One interval, then exit."),
    as_json: bool = json_flag("JSON (one object per interval) instead of a table."),
    price_per_hour: float | None = typer.Option(
        None, help="The hourly price of one server: adds the cost of 1,000 inferences per model."
    ),
    active: bool = typer.Option(False, help="Only models that served requests in the interval."),
    match: list[str] = MATCH,
    sort: MonitorSort = typer.Option(
        MonitorSort.name,
        help="Order the models by name, or by a figure of their totals (largest first): requests/s, "
        "failures/s, p99, mean latency, queue time, busy instances.",
    ),
    limit: int | None = limit_option("models"),
    gpu: bool = typer.Option(
        False,
        "--gpu",
        help="Also each server's GPUs: utilization, memory used/total (Triton's nv_gpu_* gauges).",
    ),
    access: object = None,
) -> None:
    """Requests/s, failures, latency, queue vs compute, batch size of every model on --metrics-url, live."""
    from rich.console import Group
    from rich.live import Live

    from tritonforge.observe.monitor import Snapshot, render, render_gpus, select, snapshot

    def narrowed(snap: Snapshot) -> Snapshot:
        shown = rows_shown(limit, table=not as_json)
        return select(snap, match=match, sort=sort.value, limit=shown, active_only=active)

    def shown(snap: Snapshot) -> Table | Group:
        table = render(narrowed(snap))
        return Group(table, render_gpus(snap)) if gpu else table

    if ctx.args:  # endpoints given as arguments: the deprecated spelling of --metrics-url
        deprecated("URL...", "--metrics-url URL", command=ctx.command_path)
    urls, grpc, interval = [*ctx.args, *metrics_url], url, interval_s
    if not urls:
        raise _fail(ValueError("give the server's metrics endpoint: --metrics-url HOST:8002"), code=2)
    if interval <= 0:
        raise _fail(ValueError(f"--interval-s must be > 0, not {interval}"))
    stop = threading.Event()
    if not once:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        snap, last = snapshot(
            urls, interval_s=interval, grpc_urls=grpc, price_per_hour=price_per_hour, auth=access, gpu=gpu
        )
        if once or as_json:
            while True:
                if as_json:
                    print(json.dumps(narrowed(snap).as_dict()), flush=True)
                else:
                    console.print(shown(snap))
                if once or stop.wait(interval):
                    return
                snap, last = snapshot(
                    urls, grpc_urls=grpc, price_per_hour=price_per_hour, previous=last, auth=access, gpu=gpu
                )
        with Live(shown(snap), console=console, auto_refresh=False) as live:
            while not stop.wait(interval):
                snap, last = snapshot(
                    urls, grpc_urls=grpc, price_per_hour=price_per_hour, previous=last, auth=access, gpu=gpu
                )
                live.update(shown(snap), refresh=True)
    except (TritonForgeError, ValueError) as exc:
        raise _fail(exc) from None


def slo(
    spec: Path = typer.Argument(..., help="The SLO file (see observe/slo.example.yaml)."),
    out: Path = out_option(None, "Folder for rules.yml and dashboard.json."),
) -> None:
    """Turn per-model objectives into Prometheus rules (DIR/rules.yml) and a Grafana dashboard."""
    from tritonforge.observe.slo import DASHBOARD_ROWS, load_slo, rules, write

    try:
        parsed = load_slo(spec)
        written = write(parsed, out)
    except TritonForgeError as exc:
        raise _fail(exc) from None
    groups = rules(parsed)["groups"]
    listed = parsed.rows[:TABLE_ROWS]  # every model is in the files; the table stays a screenful
    table = Table(
        title=f"SLOs from {spec}",
        caption=f"{len(parsed.rows) - len(listed)} more rows in {written['dashboard'].parent}"
        if len(parsed.rows) > len(listed)
        else None,
    )
    longest = max(len(name) for row in listed for name in row if name)
    table.add_column("model", no_wrap=True, min_width=longest)
    table.add_column("in pipeline", no_wrap=True, min_width=longest)
    table.add_column("objectives")
    by_model = {o.model: o for o in parsed.objectives}
    for model, parent in listed:
        o = by_model.get(model)
        shown = ""
        if o is not None:
            shown = ", ".join(
                f"{k}={getattr(o, k):g}"
                for k in ("p99_latency_ms", "mean_latency_ms", "error_rate", "queue_ms", "max_drift_psi")
                if getattr(o, k) is not None
            )
        table.add_row(model, parent or "", shown or "(dashboard only)")
    console.print(table)
    layout = (
        f"{len(parsed.rows)} rows"
        if len(parsed.rows) <= DASHBOARD_ROWS
        else f"{len(parsed.rows)} models: the top 10 and a row per model picked in its model variable"
    )
    console.print(
        f"{len(groups[0]['rules'])} recording rules, {len(groups[1]['rules'])} alerts -> {written['rules']}\n"
        f"dashboard ({layout}) -> {written['dashboard']}"
    )


#: ``tritonforge drift`` exits 3 when part of the traffic or of the features could not be judged.
EXIT_INCOMPLETE = 3


def drift(
    store: Path = typer.Option(..., help="The sampler's store (the folder given to Sampler)."),
    model: str = typer.Option(..., help="The model whose traffic is judged."),
    repo: Path | None = typer.Option(None, help="The model repository holding the reference profile."),
    profile: Path | None = typer.Option(None, help="A drift_profile.json (instead of --repo)."),
    version: str | None = typer.Option(None, help="Reference version (default: newest with a profile)."),
    traffic_version: str | None = typer.Option(
        None,
        help="Only traffic sampled for this version ('default': calls that named no version). Needed when "
        "traffic of several versions was sampled: versions are never mixed.",
    ),
    limit: int | None = typer.Option(None, min=1, help="Judge only the newest N sampled rows."),
    since_s: float | None = typer.Option(
        None, "--since-s", min=0.0, help="Judge only rows sampled in the last N seconds."
    ),
    alpha: float = typer.Option(0.01, help="False discovery rate over the features (Benjamini-Hochberg)."),
    min_psi: float = typer.Option(0.1, help="Smallest PSI that counts as drift."),
    html: Path | None = typer.Option(None, help="Write an HTML report with plots to this file."),
    metrics_file: Path | None = typer.Option(
        None, help="Write the scores as Prometheus gauges (textfile-collector format) here."
    ),
    as_json: bool = _JSON_TABLE,
) -> None:
    """Compare sampled traffic with the model's reference profile.

    Exit 0: no drift; 1: drifted (like diff); 3: incomplete (sample files left out, reference features
    missing from the traffic, non-finite values: never read as no drift); 2: could not compare.
    """
    import math
    import time

    from tritonforge.observe.drift import (
        check_thresholds,
        compare,
        html_report,
        read_profile,
        write_metrics_file,
    )
    from tritonforge.observe.sampler import SampleStore

    if (repo is None) == (profile is None):
        raise _fail(ValueError("give the reference as --repo REPO or --profile FILE (one of them)"), 2)
    try:
        check_thresholds(alpha, min_psi)
        if since_s is not None and not math.isfinite(since_s):
            raise ValueError(f"--since-s must be a finite number of seconds, not {since_s}")
        if html is not None and html.is_dir():
            raise ValueError(
                f"--html {html} is a folder: give the report a file name, e.g. {html / 'drift.html'}"
            )
        reference = read_profile(profile) if profile is not None else read_profile(repo, model, version)  # type: ignore[arg-type]
        since = None if since_s is None else time.time() - since_s
        samples = SampleStore(store).read(model, traffic_version, since_s=since, limit=limit)
        if samples.problems and not samples.tensors:
            raise _fail(
                ValueError(
                    f"incomplete: none of the {samples.files} sample file(s) of {model!r} is usable: "
                    + " | ".join(samples.problems)
                ),
                EXIT_INCOMPLETE,
            )
        report = compare(reference, samples.tensors, alpha=alpha, min_psi=min_psi, problems=samples.problems)
        if html is not None:
            html_report(report, html)
        if metrics_file is not None:
            write_metrics_file([report], metrics_file)
    except (TritonForgeError, ValueError) as exc:
        raise _fail(exc, 2) from None
    code = {"drifted": 1, "incomplete": EXIT_INCOMPLETE}.get(report.verdict, 0)
    if as_json:
        print(json.dumps({**report.as_dict(), "skipped": samples.skipped}))
        raise typer.Exit(code=code)
    verdict = {
        "drifted": "[bold red]DRIFTED[/]",
        "incomplete": "[bold yellow]INCOMPLETE[/]",
        "no drift": "[green]no drift[/]",
    }[report.verdict]
    table = Table(
        title=f"{model} v{reference.version}: {len(report.moved)} of {len(report.features)} features moved",
    )
    for column in ("feature", "role", "PSI", "KS", "p (BH)", "ref mean", "now mean"):
        table.add_column(column, justify="left" if column in ("feature", "role") else "right", no_wrap=True)
    shown = report.moved or sorted(report.features, key=lambda f: -f.psi)[:5]
    for f in shown[:30]:
        table.add_row(
            f.feature,
            f.role,
            f"{f.psi:.3f}",
            f"{f.ks:.3f}",
            f"{f.p_adjusted:.1e}",
            f"{f.ref_mean:.3g}",
            f"{f.cur_mean:.3g}",
            style="red" if f.drifted else None,
        )
    console.print(table)
    for line in [*report.problems, *samples.skipped]:
        console.print(Text(f"not judged: {line}"), soft_wrap=True)
    console.print(
        f"{verdict}: {report.current_rows} sampled rows vs {report.reference_rows} reference rows, "
        f"largest PSI {report.max_psi:.3f}"
        + (f"; {len(report.problems)} problem(s) above" if report.problems else "")
        + (f"; report {html}" if html else "")
    )
    raise typer.Exit(code=code)


def cost(
    sweep: Path = typer.Argument(
        ..., help="The sweep.json `tritonforge bench` / `tune` wrote (or its folder)."
    ),
    price_per_hour: float = typer.Option(..., help="What the server costs per hour (any currency)."),
    p99_budget_ms: float | None = typer.Option(None, help="Only levels whose p99 stays within this."),
    as_json: bool = _JSON_TABLE,
) -> None:
    """Cost of 1,000 inferences per model, configuration and load level of a bench run."""
    from tritonforge.observe.cost import bench_costs, cheapest, read_sweeps

    try:
        rows = bench_costs(read_sweeps(sweep), price_per_hour)
    except (TritonForgeError, ValueError) as exc:
        raise _fail(exc) from None
    best = cheapest(rows, p99_budget_ms)
    if as_json:
        print(
            json.dumps(
                {
                    "price_per_hour": price_per_hour,
                    "levels": [dataclasses.asdict(r) for r in rows],
                    "cheapest": [dataclasses.asdict(r) for r in best.values()],
                }
            )
        )
        return
    table = Table(title=f"cost per 1,000 inferences at {price_per_hour:g}/hour")
    for column in ("model", "config", "level", "req/s", "inf/s", "p99 ms", "errors", "per 1k", ""):
        table.add_column(
            column, justify="left" if column in ("model", "config", "") else "right", no_wrap=True
        )
    for r in rows:
        mark = "cheapest" if best.get((r.model, r.config)) == r else ""
        table.add_row(
            r.model,
            r.config,
            f"{r.level:g}",
            f"{r.requests_per_s:,.1f}",
            f"{r.inferences_per_s:,.1f}",
            "-" if r.p99_ms is None else f"{r.p99_ms:.2f}",
            str(r.errors),
            "-" if r.cost_per_1k is None else f"{r.cost_per_1k:.6f}",
            mark,
            style="bold" if mark else ("red" if r.errors else None),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True})(monitor)
    app.command()(slo)
    app.command()(drift)
    app.command()(cost)
