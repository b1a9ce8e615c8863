"""The ``tritonforge`` command: parses arguments and calls the library; no logic of its own.

Every verb reports an error the same way, as one line on stderr and a non-zero exit code: a bad argument
(exit 2), an error of ours (exit 1), an interrupted run (130), and anything unexpected (exit 1; the
traceback only with ``TRITONFORGE_DEBUG=1``). :func:`main` is that one place.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table
from typer.exceptions import TyperException

from tritonforge.commands import DEBUG_ENV, fail, print_error
from tritonforge.commands._output import make_console, print_problems
from tritonforge.errors import TritonForgeError

app = typer.Typer(
    name="tritonforge",
    help="Build, serve, orchestrate and load-test many models at once on NVIDIA Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = make_console()
# Where run() hands serve the arguments after `--`.
PASSTHROUGH = "tritonserver_args"


class ModelControl(str, Enum):
    none = "none"
    explicit = "explicit"
    poll = "poll"


class Kind(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


_fail = fail


@app.command()
def serve(
    ctx: typer.Context,
    repo: Path = typer.Argument(..., help="The model repository to serve."),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind gRPC, HTTP and metrics to (e.g. 127.0.0.2; 0.0.0.0: all)."
    ),
    grpc_port: int | None = typer.Option(None, help="gRPC port (default: a free one)."),
    http_port: int | None = typer.Option(None, help="HTTP port (default: a free one)."),
    metrics_port: int | None = typer.Option(None, help="Prometheus metrics port (default: a free one)."),
    model_control: ModelControl = typer.Option(
        ModelControl.none,
        "--model-control",
        "--model-control-mode",
        help="'explicit' allows load/unload; 'poll' reloads what changes in REPO.",
    ),
    repository_poll_secs: int = typer.Option(15, help="With --model-control poll: seconds between scans."),
    load_model: list[str] = typer.Option(
        [], help="With explicit control: models to load at start ('*': all)."
    ),
    response_cache_byte_size: int = typer.Option(
        0, help="Size of Triton's response cache (0: off); models opt in with response_cache."
    ),
    log_file: Path | None = typer.Option(None, help="Write the server log here and keep it after stop."),
    log_verbose: int = typer.Option(0, help="Triton's log verbosity (0: off, 1: verbose)."),
    exit_timeout_secs: int = typer.Option(10, help="How long Triton waits for in-flight requests at stop."),
    grpc_restricted_protocol: list[str] = typer.Option(
        [],
        help="'<protocols>:<header>=<ref>': gRPC protocols only for calls sending that header; "
        "<ref> is env:NAME or @FILE (mode 0600), never the key itself.",
    ),
    http_restricted_api: list[str] = typer.Option(
        [], help="'<apis>:<header>=<ref>': HTTP APIs only for calls sending that header (<ref> as above)."
    ),
    grpc_server_cert: Path | None = typer.Option(None, help="gRPC TLS: the server certificate (PEM)."),
    grpc_server_key: Path | None = typer.Option(None, help="gRPC TLS: the server's private key (PEM)."),
    grpc_root_cert: Path | None = typer.Option(None, help="gRPC TLS: the CA certificate (PEM)."),
    grpc_use_ssl_mutual: bool = typer.Option(
        False, help="gRPC mutual TLS: clients must present a certificate signed by --grpc-root-cert."
    ),
    tritonserver: Path | None = typer.Option(
        None, help="A tritonserver binary to use instead of the wheel's."
    ),
) -> None:
    """Serve REPO with the embedded Triton server until Ctrl-C.

    Arguments after `--` go to tritonserver unchanged (and win over the flags above), e.g.
    `tritonforge serve REPO -- --exit-timeout-secs=5 --log-info=false`.
    """
    from tritonforge.server import EmbeddedServer

    extra_args = list((ctx.obj or {}).get(PASSTHROUGH, ()))
    try:
        from tritonforge.commands.access import server_secrets  # keys from env/0600 files, never argv

        grpc_restricted_protocol, http_restricted_api = server_secrets(
            grpc_restricted_protocol, http_restricted_api, grpc_server_key
        )
        server = EmbeddedServer(
            repo,
            host=host,
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
            model_control=model_control.value,
            poll_interval_s=repository_poll_secs,
            load_models=load_model,
            tritonserver=tritonserver,
            response_cache_bytes=response_cache_byte_size or None,
            log_file=log_file,
            log_verbose=log_verbose,
            exit_timeout_s=exit_timeout_secs,
            grpc_restricted_protocols=grpc_restricted_protocol,
            http_restricted_apis=http_restricted_api,
            grpc_server_cert=grpc_server_cert,
            grpc_server_key=grpc_server_key,
            grpc_root_cert=grpc_root_cert,
            grpc_mutual_tls=grpc_use_ssl_mutual,
            extra_args=extra_args,
        )
    except TritonForgeError as exc:
        raise _fail(exc) from None
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
        if log_file is not None:
            console.print(f"log     {log_file}")
        console.print("Ctrl-C stops the server.")
        while not stop.wait(0.5):
            if not server.is_running:
                last = server.log_tail(1) or "(empty log)"
                kept = f"; its log is {log_file}" if log_file is not None else "; --log-file keeps its log"
                print_error(f"the server stopped unexpectedly{kept}; its last line: {last}")
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
    version: int | None = typer.Option(None, min=1, help="Version number (default: the next one)."),
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
    from tritonforge.registry.audit import record_event

    record_event(repo, "add-model", model=name, version=int(path.name), details={"file": str(file)})
    console.print(f"added [bold]{name}[/] version {path.name} at {path}")
    console.print((path.parent / "config.pbtxt").read_text(), markup=False, highlight=False)


@app.command()
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
) -> None:
    """Check REPO offline (layout, configs, files, signatures) and, with --live, on a real server."""
    from tritonforge.commands.build import print_python_requirements
    from tritonforge.repository import check_repository
    from tritonforge.server.live import check_live

    undeclared = print_python_requirements(console, repo, target, strict=strict) if target else False
    problems = check_repository(repo)
    errors = [p for p in problems if p.severity == "error"]
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
                    p.model,
                    "" if p.version is None else str(p.version),
                    p.message,
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


@app.command()
def demo(
    repo: Path = typer.Option(Path("model_repository"), help="The example repository to build and serve."),
    build: bool = typer.Option(True, help="Run `tritonforge build` first (unchanged models are skipped)."),
    frameworks: bool = typer.Option(True, help="Also serve a torch MLP as ONNX and as TorchScript."),
    requests: int = typer.Option(0, help="Digits sent in the frameworks part (default: the test split)."),
) -> None:
    """The main job, end to end: build the example repository, run its pipelines on Triton, report."""
    from tritonforge.examples.demo import run_main_job

    try:
        run_main_job(console, repo, build=build, frameworks=frameworks, limit=requests or None)
    except TritonForgeError as exc:
        raise _fail(exc) from None


# Each area's verbs live in tritonforge/commands/<area>.py with a register(app) function.
AREAS: tuple[str, ...] = ("ensemble", "build", "loadtest", "rollout", "deploy", "batch")
AREAS += ("observe",)  # monitor, slo, drift, cost


def _register_areas() -> None:
    import importlib

    for area in AREAS:
        importlib.import_module(f"tritonforge.commands.{area}").register(app)


_register_areas()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line; every error ends as one line on stderr and a non-zero exit code."""
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """The command line's exit code for ``argv`` (default: ``sys.argv[1:]``)."""
    debug = bool(os.environ.get(DEBUG_ENV))
    args = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in args:  # `serve REPO -- ARGS`: ARGS go to tritonserver unchanged
        cut = args.index("--")
        args, passthrough = args[:cut], args[cut + 1 :]
        if not args or args[0] != "serve":
            print_error("only `tritonforge serve` takes `-- ARGS` (flags passed to tritonserver)")
            return 2
    try:
        result = app(
            args=args, prog_name="tritonforge", standalone_mode=False, obj={PASSTHROUGH: passthrough}
        )
    except (typer.Abort, KeyboardInterrupt):
        print_error("interrupted", prefix="stopped")
        return 130
    except TyperException as exc:  # click's usage errors (typer vendors click): bad or missing arguments
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare verb group: its help, not an error
            console.print(message, markup=False, highlight=False)
            return 0
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print_error(message + hint)
        return int(getattr(exc, "exit_code", 2))
    except TritonForgeError as exc:
        if debug:
            raise
        print_error(exc.message)
        return 1
    except OSError as exc:  # a file or a port the user named
        if debug:
            raise
        print_error(str(exc))
        return 1
    except Exception as exc:  # a bug; still one line, with a way to see more
        if debug:
            raise
        print_error(f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the traceback)")
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    main()
