"""Consoles for every verb: tables at the terminal's width there, and whole lines when piped.

Rich lays out for 80 columns (or the width of a terminal on another stream) when its own stream is not a
terminal, which folds a long model name over two lines in a CI log and defeats ``grep``. A
:func:`make_console` console renders wide when its stream is not a terminal (tables take their natural
width, text is never wrapped), :func:`print_json` writes a verb's ``--json`` result, and
:func:`print_problems` prints a list of problems as a table at a
terminal and as one ``where: problem — fix`` line each elsewhere.
"""

from __future__ import annotations

import json
import math
import sys
import unicodedata
from collections.abc import Sequence
from typing import IO, Any

from rich.cells import cell_len
from rich.console import Console, ConsoleDimensions
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

__all__ = ["PIPE_WIDTH", "Problem", "make_console", "plain", "print_json", "print_problems", "shown"]

PIPE_WIDTH = 10_000
"""The width laid out for when not on a terminal: wider than any line the CLI prints."""
_RULE_WIDTH = 80

Problem = tuple[str, str, str]
"""Where (``file: pipeline/step``), what is wrong, how to fix it ("" when unknown)."""


class _PipeAwareConsole(Console):
    """A rich console that lays out at ``PIPE_WIDTH`` when its stream is not a terminal.

    Unless given a ``width``: ``$COLUMNS`` is ignored then, since CI runners often set it to 80.
    """

    def __init__(self, *args: Any, width: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, width=width, **kwargs)
        self._given_width = width

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._given_width is None and not self.is_terminal:
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def print(self, *objects: Any, **kwargs: Any) -> None:
        if not self.is_terminal:  # a table's title wraps at the table's width: widen it to hold it whole
            for table in objects:
                if isinstance(table, Table):
                    _fit_title(table)
        super().print(*objects, **kwargs)

    def rule(self, title: Any = "", **kwargs: Any) -> None:
        if self.is_terminal:
            super().rule(title, **kwargs)
        else:  # a full-width rule would be PIPE_WIDTH characters of dashes; a long title is never cut
            plain_title = Text.from_markup(title).plain if isinstance(title, str) else str(title)
            self.print(Rule(title, **kwargs), width=max(_RULE_WIDTH, cell_len(plain_title) + 8))


def _fit_title(table: Table) -> None:
    longest = max(
        (
            cell_len(line)
            for text in (table.title, table.caption)
            if isinstance(text, str)
            for line in Text.from_markup(text).plain.splitlines()
        ),
        default=0,
    )
    if longest > (table.min_width or 0):
        table.min_width = longest


def shown(value: object) -> str:
    """``value`` as text that can't act on a terminal: control and format characters (ANSI escapes,
    newlines, tabs, bidi overrides such as U+202E, zero-width marks) are written as escapes (``\\x1b``).

    Example:
        >>> shown("ok\\x1b[31m red\\u202e")
        'ok\\\\x1b[31m red\\\\u202e'
    """
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(_escaped(ch) if unicodedata.category(ch)[0] in "CZ" and ch != " " else ch for ch in text)


def _escaped(ch: str) -> str:
    return ch.encode("unicode_escape").decode("ascii")


def plain(value: object) -> Text:
    """``value`` for a table cell: :func:`shown`, and never read as rich markup (``[bold]``, links)."""
    return Text(shown(value))


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> Console:
    """The console a verb prints with (``stderr`` for errors and problems; ``file`` for tests)."""
    return _PipeAwareConsole(stderr=stderr, file=file)


def print_problems(
    console: Console,
    title: str,
    problems: Sequence[Problem],
    *,
    columns: Sequence[str] = ("where", "problem", "fix"),
    rows: Sequence[Sequence[str | Text]] | None = None,
) -> None:
    """Problems as a table at a terminal (``rows`` under ``columns``, default one row per problem), or
    one ``where: problem — fix`` line each when piped, so each line holds every name whole."""
    if not console.is_terminal:
        console.print(title, markup=False, highlight=False)
        for where, problem, fix in problems:
            line = f"{where}: {problem}" if where else problem
            console.print(shown(f"{line} — {fix}" if fix else line), markup=False, highlight=False)
        return
    table = Table(title=title, show_lines=True)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows if rows is not None else problems:
        table.add_row(*row)
    console.print(table)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_json(data: Any) -> None:
    """A verb's ``--json`` result on stdout: one JSON document, indented, paths and dates as strings and
    NaN/infinity as null (strict JSON that ``jq`` reads)."""
    sys.stdout.write(json.dumps(_finite(data), indent=2, default=str, allow_nan=False) + "\n")
    sys.stdout.flush()
