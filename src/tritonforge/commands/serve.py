"""CLI verb that runs the embedded Triton server on a repository: serve."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from tritonforge.commands import fail, print_error
from tritonforge.commands._cache import CACHE_MAX_MEMORY, CACHE_MAX_MODELS, PIN
from tritonforge.commands._output import make_console, plain
from tritonforge.commands._renamed import renamed
from tritonforge.commands._rows import TABLE_ROWS
from tritonforge.errors import TritonForgeError
from tritonforge.server.access import RestrictionScope, restrict_both

console = make_console()
_fail = fail
#: Where :func:`tritonforge.cli.run` hands serve the arguments after ``--``.
PASSTHROUGH = "tritonserver_args"


class ModelControl(str, Enum):
    none = "none"
    explicit = "explicit"
    poll = "poll"


@renamed(
    {
        "--model-control-mode": "--model-control",
        "--repository-poll-secs": "--poll-s",
        "--exit-timeout-secs": "--exit-timeout-s",
        "--grpc-use-ssl-mutual": "--mtls",
    }
)
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
        ModelControl.none, help="'explicit' allows load/unload; 'poll' reloads what changes in REPO."
    ),
    poll_s: int = typer.Option(15, help="With --model-control poll: seconds between scans."),
    load_model: list[str] = typer.Option(
        [], help="With explicit control: models to load at start ('*': all)."
    ),
    response_cache_byte_size: int = typer.Option(
        0, help="Size of Triton's response cache (0: off); models opt in with response_cache."
    ),
    log_file: Path | None = typer.Option(None, help="Write the server log here and keep it after stop."),
    log_verbose: int = typer.Option(0, help="Triton's log verbosity (0: off, 1: verbose)."),
    exit_timeout_s: int = typer.Option(10, help="How long Triton waits for in-flight requests at stop."),
    grpc_restricted_protocol: list[str] = typer.Option(
        [],
        help="'<protocols>:<header>=<ref>': gRPC protocols only for calls sending that header; "
        "<ref> is env:NAME or @FILE (mode 0600), never the key itself.",
    ),
    http_restricted_api: list[str] = typer.Option(
        [], help="'<apis>:<header>=<ref>': HTTP APIs only for calls sending that header (<ref> as above)."
    ),
    restriction_scope: RestrictionScope = typer.Option(
        RestrictionScope.both,
        help="'both': a group restricted on one protocol is restricted on the other with the same key; "
        "'as-given': each protocol only as given.",
    ),
    grpc_server_cert: Path | None = typer.Option(None, help="gRPC TLS: the server certificate (PEM)."),
    grpc_server_key: Path | None = typer.Option(None, help="gRPC TLS: the server's private key (PEM)."),
    grpc_root_cert: Path | None = typer.Option(None, help="gRPC TLS: the CA certificate (PEM)."),
    mtls: bool = typer.Option(
        False, "--mtls", help="gRPC mutual TLS: clients must show a certificate signed by --grpc-root-cert."
    ),
    tritonserver: Path | None = typer.Option(
        None, help="A tritonserver binary to use instead of the wheel's."
    ),
    cache_max_models: int | None = CACHE_MAX_MODELS,
    cache_max_memory: str | None = CACHE_MAX_MEMORY,
    pin: list[str] = PIN,
) -> None:
    """Serve REPO with the embedded Triton server until Ctrl-C.

    Arguments after `--` go to tritonserver unchanged (and win over the flags above), e.g.
    `tritonforge serve REPO -- --exit-timeout-secs=5 --log-info=false`.
    """
    from tritonforge.server import EmbeddedServer
    from tritonforge.server.leftovers import OWNED_REPO_PREFIX

    extra_args = list((ctx.obj or {}).get(PASSTHROUGH, ()))
    from tritonforge.cache import CACHE_MODEL, cache_budget_from_options, write_cache_repository

    try:
        budget = cache_budget_from_options(cache_max_models, cache_max_memory, pin, model_control.value)
    except ValueError as exc:
        raise _fail(exc, code=2) from None
    repos: list[Path] = [repo]
    cache_repo = None
    if budget is not None:  # the coordinator in a repository of its own: REPO is never written
        cache_repo = Path(tempfile.mkdtemp(prefix=f"{OWNED_REPO_PREFIX}{os.getpid()}-"))
        repos.append(write_cache_repository(cache_repo, budget))
        model_control, load_model = ModelControl.explicit, [CACHE_MODEL, *pin, *load_model]
    try:
        from tritonforge.commands.access import server_secrets  # keys from env/0600 files, never argv

        grpc_restricted_protocol, http_restricted_api = server_secrets(
            grpc_restricted_protocol, http_restricted_api, grpc_server_key
        )
        access = restrict_both(
            grpc_restricted_protocol, http_restricted_api, restriction_scope, extra_args=extra_args
        )
        server = EmbeddedServer(
            repos,
            host=host,
            grpc_port=grpc_port,
            http_port=http_port,
            metrics_port=metrics_port,
            model_control=model_control.value,
            poll_interval_s=poll_s,
            load_models=load_model,
            startup_timeout_s=startup_timeout_s(repo, model_control.value, load_model),
            tritonserver=tritonserver,
            response_cache_bytes=response_cache_byte_size or None,
            log_file=log_file,
            log_verbose=log_verbose,
            exit_timeout_s=exit_timeout_s,
            grpc_restricted_protocols=access.grpc,
            http_restricted_apis=access.http,
            grpc_server_cert=grpc_server_cert,
            grpc_server_key=grpc_server_key,
            grpc_root_cert=grpc_root_cert,
            grpc_mutual_tls=mtls,
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
        console.print(_index_table(repo, server.repository_index()))
        console.print(f"gRPC    {server.grpc_url}\nHTTP    {server.http_url}\nmetrics {server.metrics_url}")
        if access.grpc or access.http or access.one_sided:
            console.print(access.summary, markup=False, highlight=False)
        if log_file is not None:
            console.print(f"log     {log_file}")
        if budget is not None:
            console.print(f"cache   {budget.describe()}")
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
        if cache_repo is not None:
            shutil.rmtree(cache_repo, ignore_errors=True)


def startup_timeout_s(repo: Path, model_control: str, load_models: list[str]) -> float:
    """How long to wait for the server to be ready: the default, or 2 s for each model loaded at start
    when that is longer (500 Python-backend models take minutes on a small machine)."""
    from tritonforge.server.embedded import DEFAULT_STARTUP_TIMEOUT_S

    if model_control == "explicit" and "*" not in load_models:
        models = len(load_models)
    else:
        models = (
            sum(1 for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
            if repo.is_dir()
            else 0
        )
    return max(DEFAULT_STARTUP_TIMEOUT_S, 2.0 * models)


def _index_table(repo: Path, index: list[dict[str, str]]) -> Table:
    """Triton's repository index as a table: every model when few, else the models that are not READY
    first, up to ``TABLE_ROWS``, with a count per state (`tritonforge models REPO` lists them all)."""
    from collections import Counter

    states = Counter(entry.get("state", "") or "(no state)" for entry in index)
    shown = index
    if len(index) > TABLE_ROWS:  # trouble first
        shown = sorted(index, key=lambda e: e.get("state") == "READY")[:TABLE_ROWS]
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    hidden = len(index) - len(shown)
    table = Table(
        title=f"Triton serving {repo}: {counts or 'no models'}",
        caption=f"{hidden} more not shown; `tritonforge models {repo}` lists every model" if hidden else None,
    )
    for column in ("model", "version", "state"):
        table.add_column(column)
    for entry in shown:
        table.add_row(plain(entry.get("name", "")), entry.get("version", ""), entry.get("state", ""))
    return table


def register(app: typer.Typer) -> None:
    app.command()(serve)
