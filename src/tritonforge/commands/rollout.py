"""``tritonforge rollout start|status|pause|resume|abort``, ``evaluate``, ``audit``: canary rollouts,
evaluation gates and the audit trail."""

from __future__ import annotations

import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from typer.core import TyperGroup

from tritonforge.commands import err_console, fail, print_error
from tritonforge.commands._options import (
    ON_GATE_FAIL,
    REASON,
    REPO_ARGUMENT,
    json_flag,
    no_worse_than_serving_flag,
    repo_option,
    require_option,
)
from tritonforge.commands._output import make_console, plain, print_json
from tritonforge.commands._renamed import deprecated, renamed
from tritonforge.commands.access import with_access
from tritonforge.errors import TritonForgeError

console = make_console()


_fail = fail  # one way to report errors for every verb (tritonforge.commands)


class OnSignal(str, enum.Enum):
    """What SIGINT/SIGTERM do to a rollout the controller drives."""

    pause = "pause"
    abort = "abort"


_LEGACY_MODES = {"--pause": "pause", "--resume": "resume", "--abort": "abort", "--status": "status"}


class _RolloutGroup(TyperGroup):
    """``rollout start|status|pause|resume|abort``; the older ``rollout MODEL --to V`` and ``rollout MODEL
    --pause|--resume|--abort|--status`` still work, each with one deprecation line on stderr."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            modes = [a for a in args if a in _LEGACY_MODES]
            if len(modes) > 1:
                raise _fail(ValueError(f"give at most one of {', '.join(modes)}"))
            verb = _LEGACY_MODES[modes[0]] if modes else "start"
            rest = [a for a in args if a not in _LEGACY_MODES]
            shown = modes[0] if modes else "MODEL --to V"
            deprecated(f"tritonforge rollout {shown}", f"tritonforge rollout {verb} MODEL ...")
            args = [verb, *rest]
        return super().parse_args(ctx, args)


rollout_app = typer.Typer(
    cls=_RolloutGroup,
    no_args_is_help=True,
    help="Move a model's live traffic to a candidate version in judged steps: start, status, pause, "
    "resume, abort.",
)


def register(app: typer.Typer) -> None:
    app.add_typer(rollout_app, name="rollout")
    app.command("evaluate")(evaluate_command)
    app.command("audit")(audit_command)


_MODEL = typer.Argument(..., help="The model whose traffic moves (apps keep calling this name).")
_URL = typer.Option("localhost:8001", "--url", help="The Triton server's gRPC address (HOST:PORT).")
_REPO = repo_option("The model repository the server serves.")
_ON_SIGNAL = typer.Option(
    OnSignal.pause, "--on-signal", help="What Ctrl-C / SIGTERM do to the rollout: pause it or abort it."
)
_JSON_OUTCOME = json_flag("Print the outcome as JSON (the event lines go to stderr).")


def _driver(
    model: str,
    url: str,
    repo: Path,
    access: object,
    on_signal: OnSignal = OnSignal.pause,
    as_json: bool = False,
) -> Any:
    from tritonforge.rollout import Rollout

    out = err_console if as_json else console  # with --json, stdout holds the JSON alone
    return Rollout(
        repo,
        url,
        model,
        on_event=lambda line: out.print(line, highlight=False, soft_wrap=True, markup=False),
        auth=access,  # type: ignore[arg-type]
        on_signal=on_signal.value,
        continue_hint=f"tritonforge rollout resume {model} --repo {repo} --url {url}",
    )


@rollout_app.command("start")
@renamed({"--hold": "--hold-s", "--max-hold": "--max-hold-s"})
@with_access
def start_command(
    model: str = _MODEL,
    to: int | None = typer.Option(None, "--to", help="The candidate version."),
    url: str = _URL,
    repo: Path = _REPO,
    steps: str = typer.Option("5,25,50,100", help="Percent of traffic on the candidate at each step."),
    hold_s: float = typer.Option(60.0, "--hold-s", help="Seconds each step is held and judged."),
    max_hold_s: float | None = typer.Option(
        None, "--max-hold-s", help="Longest a step waits for enough traffic (default 10x --hold-s)."
    ),
    shadow: bool = typer.Option(
        True,
        "--shadow/--no-shadow",
        help="First a shadow step: the candidate gets the first step's share as mirrored traffic and is "
        "judged while users get stable's answers.",
    ),
    max_error_rate: float | None = typer.Option(
        None, help="Largest failed share of candidate calls (0.01 = 1%)."
    ),
    max_p99_ms: float | None = typer.Option(
        None, "--max-p99-ms", help="Largest candidate p99 latency in ms."
    ),
    min_agreement: float | None = typer.Option(
        None, help="Smallest share of mirrored rows equal to stable's."
    ),
    min_requests: int | None = typer.Option(None, help="Candidate calls needed before a step is judged."),
    candidate_timeout_ms: float | None = typer.Option(
        None, help="A candidate call slower than this is answered by stable (and counted as an error)."
    ),
    thresholds: Path | None = typer.Option(None, help="Thresholds from a JSON/YAML file (flags override)."),
    require: list[str] = require_option("the candidate's"),
    no_worse_than_serving: bool = no_worse_than_serving_flag("candidate's"),
    on_gate_fail: str | None = ON_GATE_FAIL,
    on_signal: OnSignal = _ON_SIGNAL,
    reason: str | None = REASON,
    as_json: bool = _JSON_OUTCOME,
    access: object = None,
) -> None:
    """Move MODEL's live traffic to version --to: a shadow step, then the steps, each judged on live evidence;
    a breach rolls back at once, passing every step promotes."""
    from tritonforge.rollout import Thresholds
    from tritonforge.rollout.gates import check_gates

    if to is None:
        raise _fail(ValueError(f"give the candidate version: tritonforge rollout start {model} --to V"))
    try:
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
        outcome = _driver(model, url, repo, access, on_signal, as_json).start(
            to,
            steps=_steps(steps),
            hold_s=hold_s,
            thresholds=limits,
            reason=reason,
            max_hold_s=max_hold_s,
            shadow=shadow,
        )
    except (TritonForgeError, ValueError) as exc:
        raise _fail(exc) from None
    _finish(outcome, as_json)


@rollout_app.command("status")
def status_command(
    model: str = _MODEL,
    repo: Path = _REPO,
    as_json: bool = json_flag("Print the state as JSON."),
    url: str | None = typer.Option(None, "--url", hidden=True),
) -> None:
    """Show MODEL's rollout in progress: phase, step, share, and whether a live controller drives it."""
    from tritonforge.rollout.state import load_state, read_heartbeat

    try:
        state = load_state(repo, model)
    except TritonForgeError as exc:
        raise _fail(exc) from None
    if state is None:
        if as_json:
            typer.echo(json.dumps(None))
        else:
            console.print(f"no rollout of {model} in progress in {repo}", markup=False)
        return
    last = read_heartbeat(repo, model)
    controller = {
        "alive": bool(last and last.alive),
        "pid": last.pid if last else None,
        "last_beat_age_s": round(last.age_s, 1) if last else None,
    }
    if as_json:
        record = {k: v for k, v in state.as_dict().items() if k != "original_config"}
        record["controller"] = controller
        typer.echo(json.dumps(record, indent=2, sort_keys=True, default=str))
        return
    if last is None:
        who = "no controller (paused or stopped cleanly)"
    elif last.alive:
        who = f"driven by pid {last.pid}, last heartbeat {last.age_s:.1f} s ago"
    else:
        who = f"NO live controller: pid {last.pid} died (last heartbeat {last.age_s:.0f} s ago)"
    console.print(
        f"{model}: v{state.stable} -> v{state.candidate}, {state.phase}, {state.step_label}, "
        f"{state.weight:g}% to the candidate{' (mirrored only)' if state.shadow else ''}; {who}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if (last is not None and not last.alive) or (last is None and state.phase != "paused"):
        console.print(
            f"continue with `tritonforge rollout resume {model} --repo {repo}` or roll back with "
            f"`tritonforge rollout abort {model} --repo {repo}`",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


@rollout_app.command("pause")
@with_access
def pause_command(
    model: str = _MODEL,
    url: str = _URL,
    repo: Path = _REPO,
    as_json: bool = json_flag("Print the request as JSON."),
    access: object = None,
) -> None:
    """Hold MODEL's rollout at its current step until `rollout resume`."""
    try:
        _driver(model, url, repo, access).pause()
    except TritonForgeError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps({"model": model, "result": "pause requested"}))
        return
    console.print(
        f"{model}: pause requested; continue with `tritonforge rollout resume {model}`", markup=False
    )


@rollout_app.command("resume")
@with_access
def resume_command(
    model: str = _MODEL,
    url: str = _URL,
    repo: Path = _REPO,
    on_signal: OnSignal = _ON_SIGNAL,
    as_json: bool = _JSON_OUTCOME,
    access: object = None,
) -> None:
    """Carry on MODEL's paused or interrupted rollout (the split is loaded again first)."""
    try:
        outcome = _driver(model, url, repo, access, on_signal, as_json).resume()
    except TritonForgeError as exc:
        raise _fail(exc) from None
    _finish(outcome, as_json)


@rollout_app.command("abort")
@with_access
def abort_command(
    model: str = _MODEL,
    url: str = _URL,
    repo: Path = _REPO,
    reason: str | None = REASON,
    as_json: bool = _JSON_OUTCOME,
    access: object = None,
) -> None:
    """Roll MODEL's rollout back now: all traffic to stable, the model as it was."""
    try:
        outcome = _driver(model, url, repo, access, as_json=as_json).abort(reason or "aborted by operator")
    except TritonForgeError as exc:
        raise _fail(exc) from None
    _finish(outcome, as_json)


def _finish(outcome: Any, as_json: bool = False) -> None:
    """The verdicts, then one line (or the outcome as JSON); exit 2 for a breach, 128+N when signal N
    paused the controller."""
    if as_json:
        typer.echo(json.dumps(dataclasses.asdict(outcome), indent=2, sort_keys=True, default=str))
        if outcome.result == "rolled_back":
            raise typer.Exit(code=2)
        if outcome.result == "paused" and outcome.signal is not None:
            raise typer.Exit(code=128 + int(outcome.signal))
        return
    _print_verdicts(outcome)
    model = outcome.model
    if outcome.result == "rolled_back":
        err_console.print(
            f"[bold red]rolled back[/] {model} to v{outcome.stable}: {outcome.reason}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=2)
    if outcome.result == "aborted":
        console.print(f"{model}: aborted, serving v{outcome.stable} again ({outcome.reason})", markup=False)
        return
    if outcome.result == "resumed":
        console.print(f"{model}: the running controller was asked to resume", markup=False)
        return
    if outcome.result == "paused":
        if outcome.signal is not None:
            raise typer.Exit(code=128 + int(outcome.signal))
        return
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
    url: str = _URL,
    repo: Path = repo_option("The repository whose manifest records it."),
    output: str | None = typer.Option(
        None, "--output-name", help="The output to score (default: the model's first)."
    ),
    batch_size: int = typer.Option(64, help="Rows per request."),
    as_json: bool = json_flag("Print the figures as JSON instead of a table."),
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
    repo: Path = REPO_ARGUMENT,
    as_json: bool = json_flag("Print the events as a JSON list."),
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
