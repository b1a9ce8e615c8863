"""CLI verbs on a model repository's files: add-model, validate."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from tritonforge.commands import fail, print_error
from tritonforge.commands._options import json_flag
from tritonforge.commands._output import make_console, plain, print_json, print_problems
from tritonforge.errors import TritonForgeError

console = make_console()
_fail = fail


class Kind(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


def add_model_command(
    repo: Path = typer.Argument(..., help="The model repository (created if missing)."),
    name: str = typer.Argument(..., help="The model's name in the repository."),
    file: Path = typer.Argument(..., help="The model file (model.onnx, ...)."),
    max_batch_size: int | None = typer.Option(
        None, help="Largest batch (default 8 for batchable models; 0: no batching)."
    ),
    dynamic_batching: bool = typer.Option(True, help="Let Triton group requests into batches."),
    max_queue_delay_us: int = typer.Option(0, help="How long a request may wait for a fuller batch."),
    instances: int = typer.Option(1, help="Model instances (each runs requests in parallel)."),
    kind: Kind = typer.Option(Kind.cpu, help="Where instances run."),
    version: int | None = typer.Option(
        None, min=1, max=2**63 - 1, help="Version number (default: the next one)."
    ),
    as_json: bool = json_flag("The version written and its config as JSON."),
) -> None:
    """Add FILE as a new version of model NAME in REPO, with a config read off the file."""
    from tritonforge.repository import add_model

    try:
        path = add_model(
            repo,
            name,
            file,
            version=version,
            max_batch_size=max_batch_size,
            dynamic_batching=dynamic_batching,
            max_queue_delay_us=max_queue_delay_us,
            instances=instances,
            kind=kind.value,
        )
    except (TritonForgeError, ValueError) as exc:
        raise _fail(exc) from None
    config = (path.parent / "config.pbtxt").read_text()
    if as_json:
        print_json({"model": name, "version": int(path.name), "path": path, "config": config})
        return
    console.print(f"added [bold]{name}[/] version {path.name} at {path}")
    console.print(config, markup=False, highlight=False)


def validate(
    repo: Path = typer.Argument(..., help="The model repository to check."),
    live: bool = typer.Option(
        False, help="Also load each model in the embedded server and send it a request."
    ),
    target: str | None = typer.Option(
        None,
        help="An image tag (nvcr.io/nvidia/tritonserver:24.10-py3) or python3.X: list what each Python "
        "model imports beyond its Python backend (stdlib, numpy).",
    ),
    strict: bool = typer.Option(
        False, help="With --target: fail when a Python model needs a package its requirements.txt lacks."
    ),
    as_json: bool = json_flag("The problems (and live results) as JSON; --target's list goes to stderr."),
) -> None:
    """Check REPO offline (layout, configs, files, signatures) and, with --live, on a real server."""
    from tritonforge.commands.build import print_python_requirements
    from tritonforge.repository import check_repository
    from tritonforge.server.live import check_live

    listing = make_console(stderr=True) if as_json else console  # stdout holds only the JSON document
    undeclared = print_python_requirements(listing, repo, target, strict=strict) if target else False
    problems = check_repository(repo)
    errors = [p for p in problems if p.severity == "error"]
    if as_json:
        try:
            results = check_live(repo) if live and not errors else None
        except TritonForgeError as exc:
            raise _fail(exc) from None
        ok = not errors and not undeclared and (results is None or all(r.ok for r in results))
        print_json(
            {
                "repo": repo,
                "ok": ok,
                "problems": [dataclasses.asdict(p) for p in problems],
                "live": None if results is None else [dataclasses.asdict(r) | {"ok": r.ok} for r in results],
            }
        )
        raise typer.Exit(code=0 if ok else 1)
    if problems:
        print_problems(
            console,
            f"{repo}: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)",
            [
                (f"{p.severity}: {p.model}" + ("" if p.version is None else f"/{p.version}"), p.message, "")
                for p in problems
            ],
            columns=("severity", "model", "version", "problem"),
            rows=[
                (
                    f"[{'red' if p.severity == 'error' else 'yellow'}]{p.severity}[/]",
                    plain(p.model),  # a folder name: never markup, never a terminal escape
                    "" if p.version is None else str(p.version),
                    plain(p.message),
                )
                for p in problems
            ],
        )
    else:
        console.print(f"[green]offline checks passed[/] for {repo}")
    failed = bool(errors)
    if live and not errors:
        with console.status("loading each model in the embedded server ..."):
            try:
                results = check_live(repo)
            except TritonForgeError as exc:
                raise _fail(exc) from None
        table = Table(title=f"{repo}: live check")
        for column in ("model", "loaded", "answered", "latency ms", "outputs / error"):
            table.add_column(column)
        for r in results:
            detail = r.error or ", ".join(f"{k}{list(v)}" for k, v in r.outputs.items())
            table.add_row(
                r.model,
                _mark(r.loaded),
                _mark(r.answered),
                "" if r.latency_ms is None else f"{r.latency_ms:.1f}",
                detail,
            )
        console.print(table)
        failed = failed or not all(r.ok for r in results)
        if not all(r.ok for r in results):
            bad = [r.model for r in results if not r.ok]
            print_error(f"{len(bad)} model(s) failed on the live server: {', '.join(bad)}")
    if errors:
        print_error(f"{len(errors)} error(s) in {repo}; the table above lists each")
    raise typer.Exit(code=1 if failed or undeclared else 0)


def _mark(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]no[/]"


def register(app: typer.Typer) -> None:
    app.command("add-model")(add_model_command)
    app.command()(validate)
