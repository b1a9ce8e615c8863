"""CLI verbs on a repository's versions: models, promote, rollback."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tritonforge.commands import fail, print_error
from tritonforge.commands._options import (
    ON_GATE_FAIL,
    REASON,
    REPO_ARGUMENT,
    json_flag,
    no_worse_than_serving_flag,
    require_option,
)
from tritonforge.commands._output import make_console, plain, print_json
from tritonforge.commands._rows import MATCH, hidden_line, limit_option, matching, rows_shown
from tritonforge.commands.access import with_access
from tritonforge.errors import RepositoryError, TritonForgeError

console = make_console()
_fail = fail


def _figures(manifest: Mapping[str, Any]) -> str:
    """The few numbers that say how good a version is: its task metric and its distance from its source."""
    parts = []
    metrics = manifest.get("metrics") or {}
    if "test_accuracy" in metrics:
        parts.append(f"acc {metrics['test_accuracy']:.4f}")
    if "sentence_cosine_mean" in metrics:
        parts.append(f"cos {metrics['sentence_cosine_mean']:.4f} (min {metrics['sentence_cosine_min']:.4f})")
    verification = manifest.get("verification") or {}
    outputs = list((verification.get("outputs") or {}).values())
    if outputs:
        parts.append(f"max|Δ| {max(o.get('max_abs', 0.0) for o in outputs):.2g}")
        if "sentence_cosine_mean" not in metrics:
            parts.append(f"cos≥{min(o.get('cosine_min', 1.0) for o in outputs):.4f}")
    if verification.get("passed") is False:
        parts.append("[red]FAILED (forced)[/]")
    return ", ".join(parts)


class ModelSort(str, Enum):
    name = "name"
    created = "created"
    size = "size"


def models(
    repo: Path = REPO_ARGUMENT,
    as_json: bool = json_flag("Every version with its manifest, as JSON."),
    match: list[str] = MATCH,
    sort: ModelSort = typer.Option(
        ModelSort.name, help="Order: by model name and version, newest first, or largest first."
    ),
    limit: int | None = limit_option("versions"),
) -> None:
    """List the models and versions in REPO with their figures and which version is served; a model in
    the middle of a rollout shows its phase, step and share (its twin is not listed as a model)."""
    from tritonforge.registry import list_models
    from tritonforge.rollout.state import rollouts_in

    try:
        if not repo.is_dir():
            raise RepositoryError(f"{repo} is not a model repository (no such folder)")
        rollouts = rollouts_in(repo)
        twins = {state.twin for state in rollouts.values()}
        folders = (p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
        # only the models asked for are read: a --match in a repository of 500 reads its few
        chosen = [n for n in matching(folders, match) if n not in twins]
        rows = list_models(repo, names=chosen)
    except TritonForgeError as exc:
        raise _fail(exc) from None
    if sort is ModelSort.created:
        rows.sort(key=lambda r: str(r.manifest.get("created_at", "")), reverse=True)
    elif sort is ModelSort.size:
        rows.sort(key=lambda r: (r.manifest.get("artifact") or {}).get("bytes") or 0, reverse=True)
    total, model_count = len(rows), len({r.model for r in rows})
    shown = rows_shown(limit, table=not as_json)
    rows = rows[:shown] if shown is not None else rows
    if as_json:
        if total > len(rows):
            print_error(hidden_line(total - len(rows), total, "versions"), prefix="note")
        print_json(
            [
                {"model": r.model, "version": r.version, "served": r.served, "variant": r.variant}
                | ({"rollout": _rollout_of(r.version, rollouts[r.model])} if r.model in rollouts else {})
                | {"manifest": r.manifest}
                for r in rows
            ]
        )
        return
    narrowed = f" matching {' or '.join(match)}" if match else ""
    table = Table(
        title=f"{repo}: {model_count} models{narrowed}, {total} versions",
        caption=hidden_line(total - len(rows), total, "versions") or None,
    )
    for column in ("model", "version", "served", "variant", "size MB", "figures", "created"):
        table.add_column(column, no_wrap=column != "figures")
    for r in rows:
        size = (r.manifest.get("artifact") or {}).get("bytes")
        table.add_row(
            plain(r.model),
            str(r.version),
            _served(r.served, r.version, rollouts.get(r.model)),
            r.variant,
            "" if size is None else f"{size / 1e6:.1f}",
            _figures(r.manifest),
            str(r.manifest.get("created_at", ""))[:16].replace("T", " "),
        )
    console.print(table)


def _rollout_of(version: int, state: Any) -> dict[str, Any] | None:
    """A rollout in progress as it concerns ``version`` (None for a version it does not touch)."""
    if version not in (state.stable, state.candidate):
        return None
    candidate = version == state.candidate
    return {
        "role": "candidate" if candidate else "stable",
        "share": state.weight if candidate else (100 if state.shadow else 100 - state.weight),
        "shadow": state.shadow,
        "phase": state.phase,
        "step": state.step_label,
    }


def _served(served: bool, version: int, state: Any) -> str:
    """ "yes"/"no", or for the two versions of a rollout in progress its share, phase and step."""
    if state is None or version not in (state.stable, state.candidate):
        return "[green]yes[/]" if served else "no"
    if version == state.candidate:
        kind = "shadow" if state.shadow else "rollout"
        share = state.weight
    else:
        kind, share = "rollout", (100 - state.weight if not state.shadow else 100)
    return f"[yellow]{kind} {share:g}%[/] ({state.phase}, {state.step_label})"


# promote and rollback: the same model, the same override, the same live reload and the same JSON
_NAME = typer.Argument(..., help="The model.")
_FORCE = typer.Option(False, help="Even if an ensemble pins another version of NAME.")
_RELOAD_URL = typer.Option(None, help="Also reload it on this running server (no downtime).")
_JSON_EVENT = json_flag("Print the audit event as JSON.")


@with_access
def promote(
    repo: Path = REPO_ARGUMENT,
    name: str = _NAME,
    version: int = typer.Argument(..., help="The version to serve."),
    reason: str | None = REASON,
    force: bool = _FORCE,
    url: str | None = _RELOAD_URL,
    require: list[str] = require_option("VERSION's"),
    no_worse_than_serving: bool = no_worse_than_serving_flag("VERSION's"),
    on_gate_fail: str | None = ON_GATE_FAIL,
    as_json: bool = _JSON_EVENT,
    access: object = None,
) -> None:
    """Serve VERSION of NAME (its config's version policy), and record it in the audit log."""
    from tritonforge.registry import promote as do_promote

    try:
        from tritonforge.rollout.live import refuse_during_rollout

        refuse_during_rollout(repo, name, "promote")
        if require or no_worse_than_serving:
            from tritonforge.rollout.gates import check_gates

            check_gates(
                repo,
                name,
                version,
                require=require,
                no_worse_than_serving=no_worse_than_serving,
                hook=on_gate_fail,
                action="promote",
            )
        if url:
            from tritonforge.rollout.live import promote_live

            event = promote_live(
                repo,
                url,
                name,
                version,
                reason=reason,
                force=force,
                auth=access,  # type: ignore[arg-type]
            )
        else:
            event = do_promote(repo, name, version, reason=reason, force=force)
    except (TritonForgeError, ValueError) as exc:
        if isinstance(exc, ValueError):
            exc = TritonForgeError(str(exc))
        raise _fail(exc) from None
    _print_event(name, event, as_json)


@with_access
def rollback(
    repo: Path = REPO_ARGUMENT,
    name: str = _NAME,
    to: int | None = typer.Option(None, help="The version to serve (default: the one served before)."),
    reason: str | None = REASON,
    force: bool = _FORCE,
    url: str | None = _RELOAD_URL,
    as_json: bool = _JSON_EVENT,
    access: object = None,
) -> None:
    """Serve the version NAME served before (or --to), and record it in the audit log."""
    from tritonforge.registry import rollback as do_rollback

    try:
        from tritonforge.rollout.live import refuse_during_rollout, rollback_live

        refuse_during_rollout(repo, name, "roll back")
        if url:
            event = rollback_live(
                repo,
                url,
                name,
                to=to,
                reason=reason,
                force=force,
                auth=access,  # type: ignore[arg-type]
            )
        else:
            event = do_rollback(repo, name, to=to, reason=reason, force=force)
    except TritonForgeError as exc:
        raise _fail(exc) from None
    _print_event(name, event, as_json)


def _print_event(name: str, event: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(dict(event))
    else:
        console.print(f"[bold]{name}[/]: served versions {event['from']} -> {event['to']}")


def register(app: typer.Typer) -> None:
    app.command()(models)
    app.command()(promote)
    app.command()(rollback)
