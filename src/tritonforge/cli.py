"""The ``tritonforge`` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import signal
import threading
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tritonforge.errors import TritonForgeError

app = typer.Typer(
    name="tritonforge",
    help="Build, serve, orchestrate and load-test many models at once on NVIDIA Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class ModelControl(str, Enum):
    none = "none"
    explicit = "explicit"


class Kind(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


def _fail(exc: TritonForgeError) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
    return typer.Exit(code=1)


@app.command()
def serve(
    repo: Path = typer.Argument(..., help="The model repository to serve."),
    grpc_port: int | None = typer.Option(None, help="gRPC port (default: a free one)."),
    http_port: int | None = typer.Option(None, help="HTTP port (default: a free one)."),
    metrics_port: int | None = typer.Option(None, help="Prometheus metrics port (default: a free one)."),
    model_control: ModelControl = typer.Option(ModelControl.none, help="'explicit' allows load/unload."),
    load_model: list[str] = typer.Option(
        [], help="With explicit control: models to load at start ('*': all)."
    ),
    tritonserver: Path | None = typer.Option(
        None, help="A tritonserver binary to use instead of the wheel's."
    ),
) -> None:
    """Serve REPO with the embedded Triton server until Ctrl-C."""
    from tritonforge.server import EmbeddedServer

    server = EmbeddedServer(
        repo,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        model_control=model_control.value,
        load_models=load_model,
        tritonserver=tritonserver,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with console.status(f"starting Triton on {repo} ..."):
            server.start()
        table = Table(title=f"Triton serving {repo}")
        for column in ("model", "version", "state"):
            table.add_column(column)
        for entry in server.repository_index():
            table.add_row(entry.get("name", ""), entry.get("version", ""), entry.get("state", ""))
        console.print(table)
        console.print(f"gRPC    {server.grpc_url}\nHTTP    {server.http_url}\nmetrics {server.metrics_url}")
        console.print("Ctrl-C stops the server.")
        while not stop.wait(0.5):
            if not server.is_running:
                err_console.print("[bold red]the server stopped unexpectedly[/]; last lines of its log:")
                err_console.print(server.log_tail(), markup=False, highlight=False)
                raise typer.Exit(code=1)
    except TritonForgeError as exc:
        raise _fail(exc) from None
    finally:
        server.stop()


@app.command("add-model")
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
    version: int | None = typer.Option(None, help="Version number (default: the next one)."),
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
    except TritonForgeError as exc:
        raise _fail(exc) from None
    console.print(f"added [bold]{name}[/] version {path.name} at {path}")
    console.print((path.parent / "config.pbtxt").read_text(), markup=False, highlight=False)


@app.command()
def validate(
    repo: Path = typer.Argument(..., help="The model repository to check."),
    live: bool = typer.Option(
        False, help="Also load each model in the embedded server and send it a request."
    ),
) -> None:
    """Check REPO offline (layout, configs, files, signatures) and, with --live, on a real server."""
    from tritonforge.repository import check_live, check_repository

    problems = check_repository(repo)
    errors = [p for p in problems if p.severity == "error"]
    if problems:
        table = Table(title=f"{repo}: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)")
        for column in ("severity", "model", "version", "problem"):
            table.add_column(column)
        for p in problems:
            colour = "red" if p.severity == "error" else "yellow"
            table.add_row(
                f"[{colour}]{p.severity}[/]", p.model, "" if p.version is None else str(p.version), p.message
            )
        console.print(table)
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
    raise typer.Exit(code=1 if failed else 0)


def _mark(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]no[/]"


@app.command()
def demo(
    repo: Path = typer.Option(Path("model_repository"), help="The example repository to build and serve."),
    build: bool = typer.Option(True, help="Run `tritonforge build` first (unchanged models are skipped)."),
    frameworks: bool = typer.Option(True, help="Also serve a torch MLP as ONNX and as TorchScript."),
    requests: int = typer.Option(0, help="Digits sent in the frameworks part (default: the test split)."),
) -> None:
    """The main job, end to end: build the example repository, run its pipelines on Triton, report."""
    from tritonforge.demo import run_main_job

    try:
        run_main_job(console, repo, build=build, frameworks=frameworks, limit=requests or None)
    except TritonForgeError as exc:
        raise _fail(exc) from None


# Each area's verbs live in tritonforge/commands/<area>.py with a register(app) function.
AREAS: tuple[str, ...] = ("ensemble", "build", "loadtest", "batch")


def _register_areas() -> None:
    import importlib

    for area in AREAS:
        importlib.import_module(f"tritonforge.commands.{area}").register(app)


_register_areas()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
