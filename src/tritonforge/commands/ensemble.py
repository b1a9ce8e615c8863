"""``tritonforge ensemble check|compile``: pipeline specs checked (every issue at once) and compiled."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.text import Text

from tritonforge.commands import print_error
from tritonforge.commands._options import SPECS, json_flag, repo_option
from tritonforge.commands._output import make_console, print_json, print_problems

if TYPE_CHECKING:
    from tritonforge.ensemble import Issue

console = make_console()

ensemble_app = typer.Typer(
    help="Multi-model pipelines: check and compile ensembles/*.yaml.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(ensemble_app, name="ensemble")


def _print_issues(issues: Sequence[Issue]) -> None:
    problems = []
    for issue in issues:
        where = "/".join(part for part in (issue.pipeline, issue.step) if part)
        if issue.tensor and f"'{issue.tensor}'" not in issue.message:
            where += f" (tensor '{issue.tensor}')"
        problems.append((f"{issue.source}: {where}" if issue.source else where, issue.message, issue.fix))
    # The report goes to stdout like validate's; stderr gets the one error line every verb gives.
    print_problems(
        console,
        f"{len(issues)} problem(s)",
        problems,
        columns=("pipeline", "step", "tensor", "problem", "fix"),
        # Text, not markup: a message quoting a bad value may hold brackets
        rows=[
            tuple(Text(c) for c in (i.pipeline, i.step or "", i.tensor or "", i.message, i.fix))
            for i in issues
        ],
    )


@ensemble_app.command()
def check(
    specs: list[Path] = SPECS,
    repo: Path = repo_option("The model repository the steps come from."),
    as_json: bool = json_flag("The pipelines and problems as JSON."),
) -> None:
    """Check SPECS against REPO and print every problem found (not only the first)."""
    from tritonforge.ensemble import check_specs

    resolved, issues = check_specs(specs, repo)
    if as_json:
        print_json(
            {
                "ok": not issues,
                "pipelines": [] if issues else [_pipeline(item) for item in resolved],
                "problems": [dataclasses.asdict(issue) for issue in issues],
            }
        )
        raise typer.Exit(code=1 if issues else 0)
    if issues:
        _print_issues(issues)
        print_error(f"{len(issues)} problem(s) in the pipeline spec(s); the table above lists each")
        raise typer.Exit(code=1)
    for item in resolved:
        kind = "routed (BLS)" if item.spec.is_routed else "ensemble"
        console.print(
            f"[green]ok[/] {item.spec.name}: {kind}, max_batch_size {item.max_batch_size}, "
            f"{len(item.spec.steps or item.spec.route)} step(s)",
            highlight=False,
        )


def _pipeline(item: Any) -> dict[str, Any]:
    kind = "routed" if item.spec.is_routed else "ensemble"
    steps = len(item.spec.steps or item.spec.route)
    return {"name": item.spec.name, "kind": kind, "max_batch_size": item.max_batch_size, "steps": steps}


@ensemble_app.command("compile")
def compile_command(
    specs: list[Path] = SPECS,
    repo: Path = repo_option("The model repository to write into."),
    fuse: bool = typer.Option(
        True, help="Fuse an ONNX step and the mean pooling after it into one ONNX model (same answer)."
    ),
    as_json: bool = json_flag("The files written (or the problems) as JSON."),
) -> None:
    """Check SPECS, then write their ensembles, building blocks and routers into REPO (nothing on error)."""
    from tritonforge.ensemble import PipelineCheckError, compile_specs

    try:
        written = compile_specs(specs, repo, fuse=fuse)
    except PipelineCheckError as exc:
        if as_json:
            print_json({"ok": False, "written": [], "problems": [dataclasses.asdict(i) for i in exc.issues]})
            raise typer.Exit(code=1) from None
        _print_issues(exc.issues)
        print_error(f"{len(exc.issues)} problem(s) in the pipeline spec(s); nothing was written")
        raise typer.Exit(code=1) from None
    if as_json:
        print_json({"ok": True, "written": written, "problems": []})
        return
    for path in written:
        console.print(f"wrote {path}", highlight=False)
