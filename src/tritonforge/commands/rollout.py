"""``tritonforge rollout | evaluate | audit``: canary rollouts, evaluation gates and the audit trail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tritonforge.commands import err_console, fail, print_error
from tritonforge.commands._output import make_console, plain, print_json
from tritonforge.commands._renamed import renamed
from tritonforge.commands.access import with_access
from tritonforge.errors import TritonForgeError

console = make_console()


_fail = fail  # one way to report errors for every verb (tritonforge.commands)


def register(app: typer.Typer) -> None:
    app.command("rollout")(rollout_command)
    app.command("evaluate")(evaluate_command)
    app.command("audit")(audit_command)


@with_access
def rollout_command(
    model: str = typer.Argument(..., help="The model whose traffic moves (apps keep calling this name)."),
    to: int | None = typer.Option(None, "--to", help="The candidate version."),
    url: str = typer.Option("localhost:8001", help="The Triton server's gRPC address."),
    repo: Path = typer.Option(Path("model_repository"), help="The model repository the server serves."),
    steps: str = typer.Option("5,25,50,100", help="Percent of traffic on the candidate at each step."),
    hold: float = typer.Option(60.0, help="Seconds each step is held and judged."),
    max_hold: float | None = typer.Option(
        None, help="Longest a step waits for enough traffic (default 10x hold)."
    ),
    max_error_rate: float | None = typer.Option(
        None, help="Largest failed share of candidate calls (0.01 = 1%)."
    ),
    max_p99_ms: float | None = typer.Option(None, help="Largest candidate p99 latency in ms."),
    min_agreement: float | None = typer.Option(
        None, help="Smallest share of mirrored rows equal to stable's."
    ),
    min_requests: int | None = typer.Option(None, help="Candidate calls needed before a step is judged."),
    candidate_timeout_ms: float | None = typer.Option(
        None, help="A candidate call slower than this is answered by stable (and counted as an error)."
    ),
    thresholds: Path | None = typer.Option(None, help="Thresholds from a JSON/YAML file (flags override)."),
    require: list[str] = typer.Option([], help="Gate on the candidate's evaluation, e.g. 'accuracy>=0.97'."),
    no_worse_than_serving: bool = typer.Option(False, help="Gate: candidate's figures >= the served one's."),
    on_gate_fail: str | None = typer.Option(None, help="A command run when a gate fails (retraining hook)."),
    reason: str | None = typer.Option(None, help="Why (kept in the audit log)."),
    pause: bool = typer.Option(False, "--pause", help="Hold the current step until --resume."),
    resume: bool = typer.Option(False, "--resume", help="Carry on a paused or interrupted rollout."),
    abort: bool = typer.Option(False, "--abort", help="Roll back now."),
    status: bool = typer.Option(False, "--status", help="Show the rollout in progress, if any."),
    access: object = None,
) -> None:
    """Move MODEL's live traffic to version --to in steps, judging each on live evidence; a breach rolls
    back at once, passing every step promotes."""
    from tritonforge.rollout import Rollout, Thresholds
    from tritonforge.rollout.gates import check_gates

    if sum([pause, resume, abort, status]) > 1:
        raise _fail(ValueError("give at most one of --pause, --resume, --abort, --status"))
    driver = Rollout(
        repo,
        url,
        model,
        on_event=lambda line: console.print(line, highlight=False, soft_wrap=True),
        auth=access,  # type: ignore[arg-type]
    )
    try:
        if status:
            state = driver.status()
            if state is None:
                console.print(f"no rollout of {model} in progress")
                return
            console.print(
                json.dumps(
                    {k: v for k, v in state.as_dict().items() if k != "original_config"},
                    indent=2,
                    default=str,
                ),
                markup=False,
                highlight=False,
            )
            return
        if pause:
            driver.pause()
            console.print(f"{model}: pause requested")
            return
        if abort:
            outcome = driver.abort(reason or "aborted by operator")
        elif resume:
            outcome = driver.resume()
        else:
            if to is None:
                raise _fail(
                    ValueError("give the candidate version with --to V (or --resume/--abort/--pause)")
                )
            overrides: dict[str, Any] = {
                "max_error_rate": max_error_rate,
                "max_p99_ms": max_p99_ms,
                "min_agreement": min_agreement,
                "min_requests": min_requests,
                "candidate_timeout_ms": candidate_timeout_ms,
            }
            if thresholds is not None:
                limits = Thresholds.from_file(thresholds, **overrides)
            else:
                limits = Thresholds(**{k: v for k, v in overrides.items() if v is not None})
            if require or no_worse_than_serving:
                check_gates(
                    repo,
                    model,
                    to,
                    require=require,
                    no_worse_than_serving=no_worse_than_serving,
                    hook=on_gate_fail,
                    action="rollout",
                )
            outcome = driver.start(
                to, steps=_steps(steps), hold_s=hold, thresholds=limits, reason=reason, max_hold_s=max_hold
            )
    except (TritonForgeError, ValueError) as exc:
        raise _fail(exc) from None
    _print_verdicts(outcome)
    if outcome.result == "rolled_back":
        err_console.print(
            f"[bold red]rolled back[/] {model} to v{outcome.stable}: {outcome.reason}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=2)
    console.print(
        f"{model}: {outcome.result.replace('_', ' ')} (v{outcome.stable} -> v{outcome.candidate})",
        highlight=False,
    )


def _steps(text: str) -> list[float]:
    from tritonforge.rollout import parse_steps

    return parse_steps(text)


def _print_verdicts(outcome: object) -> None:
    verdicts = getattr(outcome, "verdicts", ())
    if not verdicts:
        return
    table = Table(title=f"{getattr(outcome, 'model', '')}: steps")
    for column in (
        "step",
        "weight %",
        "verdict",
        "cand calls",
        "error rate",
        "cand p99 ms",
        "stable p99 ms",
        "agreement",
        "why",
    ):
        table.add_column(column, overflow="fold")
    for v in verdicts:
        e = v.get("evidence", {})
        table.add_row(
            str(v.get("step")),
            f"{v.get('weight', 0):g}",
            v.get("verdict", ""),
            str(e.get("candidate_calls", "")),
            str(e.get("error_rate", "")),
            str(e.get("candidate_p99_ms", "")),
            str(e.get("stable_p99_ms", "")),
            str(e.get("agreement", "")),
            v.get("reasons", ""),
        )
    console.print(table)


@renamed({"--output": "--output-name"})
@with_access
def evaluate_command(
    model: str = typer.Argument(..., help="The model to evaluate."),
    data: Path = typer.Option(..., help="A labelled holdout (.npz with the model's inputs and 'labels')."),
    version: int | None = typer.Option(None, help="The version (default: the served one)."),
    url: str = typer.Option("localhost:8001", help="The Triton server's gRPC address."),
    repo: Path = typer.Option(Path("model_repository"), help="The repository whose manifest records it."),
    output: str | None = typer.Option(
        None, "--output-name", help="The output to score (default: the model's first)."
    ),
    batch_size: int = typer.Option(64, help="Rows per request."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON instead of a table."),
    access: object = None,
) -> None:
    """Run a labelled holdout through the server and record the figures in the version's manifest."""
    from tritonforge.rollout.gates import evaluate

    try:
        result = evaluate(
            repo,
            url,
            model,
            data,
            version=version,
            output=output,
            batch_size=batch_size,
            auth=access,  # type: ignore[arg-type]
        )
    except (TritonForgeError, ValueError) as exc:
        raise _fail(exc) from None
    if as_json:
        print_json({"model": model, "version": result.version, "data": data, "figures": result.figures})
        return
    table = Table(title=f"{model} v{result.version} on {data.name}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in result.figures.items():
        table.add_row(name, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def audit_command(
    repo: Path = typer.Argument(..., help="The model repository."),
    as_json: bool = typer.Option(False, "--json", help="Print the events as a JSON list."),
    model: str | None = typer.Option(None, help="Only this model's events."),
    last: int | None = typer.Option(None, min=1, help="Only the last N events (N >= 1)."),
) -> None:
    """Show REPO's audit log: who changed what, when and why."""
    from tritonforge.registry import AUDIT_LOG, read_audit_log

    if not repo.is_dir():
        raise _fail(ValueError(f"{repo} is not a model repository (no such folder)"))
    try:
        log = read_audit_log(repo)
    except TritonForgeError as exc:
        raise _fail(exc) from None
    warning = log.summary(repo / AUDIT_LOG)
    if warning:  # on stderr, so that --json stays one JSON document
        print_error(warning, prefix="warning")
    events = log.events
    if model:
        events = [e for e in events if e.get("model") == model]
    if last is not None:
        events = events[-last:]
    if as_json:
        typer.echo(json.dumps(events, indent=2, sort_keys=True, default=str))
        return
    # every field is data from a file (a reason, $TRITONFORGE_USER): never markup, never an escape
    table = Table(title=plain(f"{repo}: {len(events)} event(s)"))
    for column in ("at", "by", "action", "model", "what", "why"):
        table.add_column(column, overflow="fold", no_wrap=column in ("action", "model"))
    for e in events:
        table.add_row(
            plain(e.get("at", "")),
            plain(e.get("by", "")),
            plain(e.get("action", "")),
            plain(e.get("model", "")),
            plain(_what(e)),
            plain(e.get("reason", "")),
        )
    console.print(table)


_SHOWN = {"at", "by", "action", "model", "reason"}


def _what(event: dict[str, Any]) -> str:
    parts = []
    for key in sorted(set(event) - _SHOWN):
        value = event[key]
        if key == "evidence" and isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items() if k != "disagreements" and v is not None)
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
        parts.append(f"{key}={value}")
    return "; ".join(parts)
