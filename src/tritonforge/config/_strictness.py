"""Two kinds of finding: what Triton refuses (always a ConfigError) and what it accepts but is almost
surely a mistake ("unusual": a ConfigError for configs built in code, a warning for configs read from
files, so that reading accepts every config Triton serves)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from tritonforge.errors import ConfigError

__all__ = ["lenient", "unusual"]

_NOTES: ContextVar[list[str] | None] = ContextVar("tritonforge_config_notes", default=None)


def unusual(message: str) -> None:
    """Report something Triton accepts but that is likely a mistake.

    Raises:
        ConfigError: unless inside :func:`lenient`, which records ``message`` instead.
    """
    notes = _NOTES.get()
    if notes is None:
        raise ConfigError(message)
    notes.append(message)


@contextlib.contextmanager
def lenient() -> Iterator[list[str]]:
    """Within this block, :func:`unusual` findings are collected in the yielded list, not raised."""
    notes: list[str] = []
    token = _NOTES.set(notes)
    try:
        yield notes
    finally:
        _NOTES.reset(token)
