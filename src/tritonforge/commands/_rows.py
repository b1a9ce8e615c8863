"""Long listings at any size: the rows a table shows, and the line that says how many it hid.

``models`` and ``monitor`` narrow their rows the same way: ``--match PATTERN`` (shell patterns on the model
name, repeatable), ``--sort KEY`` and ``--limit N``. A table shows at most :data:`TABLE_ROWS` rows unless
``--limit`` says otherwise (0: all) and says in its caption how many it left out; ``--json`` carries every
row unless ``--limit`` is given.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

__all__ = ["TABLE_ROWS", "hidden_line", "matching", "rows_shown"]

#: rows a table shows when --limit is not given (a terminal's worth; --limit 0 shows all)
TABLE_ROWS = 50


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
