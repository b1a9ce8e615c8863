"""Bounds on what a pipeline spec may hold, and on how much of a bad value an issue shows.

A spec is a few kilobytes written by a person; these bounds are far above any real one and keep a hostile
or mistaken file (a YAML alias bomb, a million-input combiner, a megabyte of nesting) from costing more
than a clear issue.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable
from typing import Any

__all__ = [
    "INT32_MAX",
    "INT64_MAX",
    "MAX_COMBINER_INPUTS",
    "MAX_IMPUTE_FEATURES",
    "MAX_ISSUES",
    "MAX_LIST_ITEMS",
    "MAX_NAME_CHARS",
    "MAX_NESTING",
    "MAX_NODES",
    "MAX_SPEC_CHARS",
    "bad_name",
    "finite_number",
    "names",
    "show",
]

MAX_SPEC_CHARS = 1_000_000
"""A spec's text, in characters (the file, in bytes): real ones are a few thousand."""
MAX_NESTING = 64
"""Brackets / indentation levels deep: real specs nest five or six."""
MAX_NODES = 100_000
"""Values in the spec once every YAML alias is expanded: what refuses an alias bomb."""
MAX_LIST_ITEMS = 1_000
"""Steps, route stages, building blocks, pipeline inputs or outputs in one pipeline."""
MAX_COMBINER_INPUTS = 256
"""Member models one combiner block takes."""
MAX_IMPUTE_FEATURES = 65_536
"""Features one impute block fills (its per-feature means travel in the model config)."""
MAX_NAME_CHARS = 256
"""Characters in a pipeline, step, model or tensor name."""
MAX_ISSUES = 200
"""Issues reported for one pipeline; the rest are counted in one last issue."""
INT32_MAX = 2**31 - 1  # max_batch_size, instance counts (int32 in model_config.proto)
INT64_MAX = 2**63 - 1  # dims and versions (int64 in model_config.proto)

_SHOWN_CHARS = 120


class _Repr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 3
        self.maxdict = self.maxlist = self.maxtuple = self.maxset = self.maxfrozenset = 6
        self.maxstring = 60
        self.maxother = 60

    def repr_int(self, x: int, level: int) -> str:
        # repr of an int over 4300 digits raises ValueError; a YAML file may hold one.
        if x.bit_length() > 128:
            return f"<an integer of about {int(x.bit_length() * 0.30103) + 1} digits>"
        return repr(x)


_REPR = _Repr()


def show(value: Any) -> str:
    """``repr(value)`` cut to a line: an issue never carries more than a glimpse of a bad value."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose repr fails is still worth naming by its type
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def names(items: Iterable[str], limit: int = 20) -> str:
    """A sorted list of names for a message, at most ``limit`` of them: ``['a', 'b', ... (+3 more)]``."""
    ordered = sorted(items)
    shown = ", ".join(repr(n) for n in ordered[:limit])
    more = f", ... (+{len(ordered) - limit} more)" if len(ordered) > limit else ""
    return f"[{shown}{more}]"


def bad_name(value: Any) -> str | None:
    """Why ``value`` can't be a name (None when it can): a non-empty printable string, not too long."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > MAX_NAME_CHARS:
        return f"is {len(value)} characters long (at most {MAX_NAME_CHARS})"
    if not value.isprintable():
        return "holds a control character (a newline, a tab...)"
    return None


def finite_number(value: Any) -> float | None:
    """``value`` as a finite float, or None (bool, non-number, NaN, ±inf, an int too big for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None
