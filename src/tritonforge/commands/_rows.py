"""Long listings at any size: the rows a table shows, and the line that says how many it hid.

``models`` and ``monitor`` narrow their rows the same way: ``--match PATTERN`` (shell patterns on the model
name, repeatable), ``--sort KEY`` and ``--limit N``. A table shows at most :data:`TABLE_ROWS` rows unless
``--limit`` says otherwise (0: all) and says in its caption how many it left out; ``--json`` carries every
row unless ``--limit`` is given. :data:`MATCH` and :func:`limit_option` are those options, declared once.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from typing import Any

import typer

__all__ = ["MATCH", "TABLE_ROWS", "hidden_line", "limit_option", "matching", "rows_shown"]

#: rows a table shows when --limit is not given (a terminal's worth; --limit 0 shows all)
TABLE_ROWS = 50

MATCH: Any = typer.Option(
    [], help="Only models whose name matches this shell pattern (e.g. 'digits_*'); repeatable."
)
"""``--match PATTERN``, read by :func:`matching`."""


def limit_option(rows: str) -> Any:
    """``--limit N`` over a listing of ``rows`` ("models", "versions"), read by :func:`rows_shown`."""
    return typer.Option(
        None,
        min=0,
        help=f"Show the first N {rows} (0: all). Default: {TABLE_ROWS} in the table, all in --json.",
    )


def matching(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The names matching one of the shell ``patterns`` (``digits_*``, ``*_int8``; case-sensitive, as
    Triton's model names are), all of them when no pattern is given."""
    if not patterns:
        return list(names)
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def rows_shown(limit: int | None, *, table: bool) -> int | None:
    """How many rows to show for ``--limit`` (``None``: all): the given limit (0: all), else
    :data:`TABLE_ROWS` in a table and all of them in JSON."""
    if limit is None:
        return TABLE_ROWS if table else None
    return limit or None


def hidden_line(hidden: int, total: int, what: str) -> str:
    """The footer of a table that left ``hidden`` of ``total`` rows out ("" when none)."""
    if not hidden:
        return ""
    return f"{hidden} of {total} {what} not shown: narrow with --match, or --limit 0 to show all"
