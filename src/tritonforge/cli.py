"""The ``tritonforge`` command: registers the verbs of :mod:`tritonforge.commands` and runs them.

Every verb reports an error the same way, as one line on stderr and a non-zero exit code: a bad argument
(exit 2), an error of ours (exit 1), an interrupted run (130), and anything unexpected (exit 1; the
traceback only with ``TRITONFORGE_DEBUG=1``). :func:`main` is that one place.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

import typer
from typer.exceptions import TyperException

from tritonforge.commands import (
    DEBUG_ENV,
    PIPE_WIDTH,
    install_renamed_options,
    make_console,
    print_error,
)
from tritonforge.commands.serve import PASSTHROUGH
from tritonforge.errors import TritonForgeError

app = typer.Typer(
    name="tritonforge",
    help="Build, serve, orchestrate and load-test many models at once on NVIDIA Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = make_console()
# Help at a terminal: rich's boxes at the terminal's width. In a pipe: click's plain help laid out at
# PIPE_WIDTH, so no option name is cut to fit a box, broken at a hyphen or folded over two lines.
_TERMINAL_HELP = app.rich_markup_mode


# Each area's verbs live in tritonforge/commands/<area>.py with a register(app) function; the help lists
# them in this order.
AREAS: tuple[str, ...] = (
    "serve",  # serve
    "repository",  # add-model, validate
    "store",  # push
    "build",  # demo, export, quantize, build
    "registry",  # models, promote, rollback
    "ensemble",  # ensemble check|compile
    "loadtest",  # bench, tune
    "rollout",  # rollout, evaluate, audit
    "deploy",  # deploy
    "batch",  # batch-infer
    "observe",  # monitor, slo, drift, cost
)


def _register_areas() -> None:
    for area in AREAS:
        importlib.import_module(f"tritonforge.commands.{area}").register(app)
    install_renamed_options(app)  # old option spellings still read, with a deprecation line


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
    piped = not sys.stdout.isatty()
    app.rich_markup_mode = None if piped else _TERMINAL_HELP
    width = {"terminal_width": PIPE_WIDTH, "max_content_width": PIPE_WIDTH} if piped else {}
    try:
        result = app(
            args=args,
            prog_name="tritonforge",
            standalone_mode=False,
            obj={PASSTHROUGH: passthrough},
            **width,
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
