"""CLI verbs by area. Each module has ``register(app)``; :mod:`tritonforge.cli` lists them in ``AREAS``.

Errors are reported one way everywhere: :func:`print_error` writes one line on stderr (never wrapped,
never read as markup), and :func:`fail` does that and returns the ``typer.Exit`` to raise. What
:mod:`tritonforge.cli` needs besides the verbs is here too: the console that stays whole in a pipe
(:func:`make_console`, :data:`PIPE_WIDTH`) and :func:`install_renamed_options` (old option spellings).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import typer
from rich.console import Console
from rich.text import Text

from tritonforge.commands._output import PIPE_WIDTH, make_console
from tritonforge.commands._renamed import install as install_renamed_options
from tritonforge.errors import TritonForgeError

__all__ = [
    "DEBUG_ENV",
    "PIPE_WIDTH",
    "err_console",
    "fail",
    "install_renamed_options",
    "make_console",
    "one_line",
    "print_error",
    "reported",
]

#: Set to 1 to see the full message and the traceback of an unexpected error.
DEBUG_ENV = "TRITONFORGE_DEBUG"
_MAX_JOINED = 400

# soft_wrap: a piped stderr is 80 columns to rich, and a wrapped error is several lines.
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def one_line(message: str) -> str:
    """``message`` on one line: its lines joined with " | ", or its first line and a count when long."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "(no message)"
    joined = " | ".join(lines)
    if len(joined) <= _MAX_JOINED or os.environ.get(DEBUG_ENV):
        return joined
    return f"{lines[0]} (+{len(lines) - 1} more lines; set {DEBUG_ENV}=1 to see them)"


def print_error(message: str, *, prefix: str = "error") -> None:
    """Write ``prefix: message`` as one line on stderr."""
    err_console.print(Text.assemble((f"{prefix}: ", "bold red"), one_line(message)))


def fail(exc: TritonForgeError | ValueError, code: int = 1) -> typer.Exit:
    """Report ``exc`` on one line and return the exit (``code``, 1 by default) to raise."""
    print_error(exc.message if isinstance(exc, TritonForgeError) else str(exc))
    return typer.Exit(code=code)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Inside it, a bad argument (``ValueError``) ends the verb with exit 2 and an error of ours with exit 1,
    each reported on one line by :func:`fail`."""
    try:
        yield
    except TritonForgeError as exc:
        raise fail(exc) from None
    except ValueError as exc:
        raise fail(exc, code=2) from None
