"""Append-only audit trail of a repository: one JSON line per change in ``<repo>/audit.jsonl``.

:func:`record_event` is the one writer; it lives in the repository layer
(:mod:`tritonforge.repository.audit`) so that everything that changes a repository records there itself:
add-model, compile, register, promote and rollback, each rollout step and verdict with its evidence,
evaluation results. Every line has ``at`` (UTC), ``by`` (user), ``action``, and where known ``model``,
``version``, ``reason`` and the details of what changed.

:func:`read_audit_log` reads it back line by line, whatever the file holds: a line that is not a JSON
object with fields of the right types (a torn write, a hand edit, a list, ``"at": 5``, nesting a thousand
levels deep, a megabyte on one line) is skipped and reported with its line number, and invalid UTF-8 is
replaced in its own line only. Fields are data, never markup: the CLI shows them through
:func:`tritonforge.commands._output.plain`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from tritonforge.errors import RepositoryError
from tritonforge.files import MAX_LINE_BYTES, human_size, iter_lines
from tritonforge.repository.audit import AUDIT_LOG, record_event
from tritonforge.repository.writer import current_user

__all__ = ["AuditLog", "current_user", "read_audit_log", "record_event"]

#: the fields every writer sets, and their types (a line with another type there is skipped)
_TEXT_FIELDS = ("at", "by", "action", "model", "reason")
_VERSION_LISTS = ("from", "to")


@dataclasses.dataclass(frozen=True)
class AuditLog:
    """The events of an audit log, oldest first, and the lines that could not be read.

    ``skipped``: ``(line number, why)`` for each line left out; ``replaced``: the numbers of lines whose
    invalid UTF-8 bytes were replaced (U+FFFD) and that are still among the events.
    """

    events: list[dict[str, Any]]
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    replaced: list[int] = dataclasses.field(default_factory=list)

    def summary(self, path: str | os.PathLike[str]) -> str | None:
        """One line about what was not read as it is, or None when every line was."""
        parts = []
        if self.skipped:
            listed = "; ".join(f"line {n}: {why}" for n, why in self.skipped[:5])
            more = f"; and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
            parts.append(f"{len(self.skipped)} corrupt line(s) skipped ({listed}{more})")
        if self.replaced:
            lines = ", ".join(map(str, self.replaced[:10])) + (", ..." if len(self.replaced) > 10 else "")
            parts.append(f"invalid UTF-8 replaced in line(s) {lines}")
        if not parts:
            return None
        return f"{path}: " + "; ".join(parts) + " — the other events are shown; fix or remove those lines"


def _json_kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: "a number", "an array"."""
    if isinstance(value, bool):
        return "a boolean"
    kinds = ((dict, "an object"), (list, "an array"), (str, "a string"), ((int, float), "a number"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "null")


def _is_version(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _problem(event: Any) -> str | None:
    """Why a parsed line is not an event (None when it is one)."""
    if not isinstance(event, dict):
        return f"{_json_kind(event)}, not a JSON object"
    for field in _TEXT_FIELDS:
        if field in event and not isinstance(event[field], str):
            return f"{field!r} is {_json_kind(event[field])}, not a string"
    if not event.get("action"):
        return "no 'action'"
    version = event.get("version")
    if version is not None and not _is_version(version):
        return f"'version' is {_json_kind(version)}, not an integer"
    for field in _VERSION_LISTS:
        value = event.get(field)
        if value is not None and not (isinstance(value, list) and all(map(_is_version, value))):
            return f"{field!r} is not a list of versions"
    return None


def read_audit_log(repo: str | os.PathLike[str]) -> AuditLog:
    """Every event of ``<repo>/audit.jsonl`` (oldest first), read line by line (see the module's docstring).

    Example:
        >>> log = read_audit_log("model_repository")                                    # doctest: +SKIP
        >>> [e["action"] for e in log.events[-2:]], log.skipped                         # doctest: +SKIP
        (['promote', 'rollback'], [])

    Raises:
        RepositoryError: the log is not a regular file (a FIFO, a device), or can't be read.
    """
    path = Path(repo) / AUDIT_LOG
    if not path.exists() and not path.is_symlink():
        return AuditLog([])
    events: list[dict[str, Any]] = []
    skipped: list[tuple[int, str]] = []
    replaced: list[int] = []
    lines = iter_lines(
        path, what="audit log", max_line=MAX_LINE_BYTES, error=RepositoryError, fix="move it away"
    )
    for number, raw in lines:
        if raw is None:
            skipped.append((number, f"longer than {human_size(MAX_LINE_BYTES)}"))
            continue
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            replaced.append(number)
        try:
            event = json.loads(text)
        except RecursionError:
            skipped.append((number, "nested too deeply"))
            continue
        except ValueError as exc:  # JSONDecodeError, or an integer of thousands of digits
            skipped.append((number, f"not JSON ({str(exc).split(':')[0][:80]})"))
            continue
        why = _problem(event)
        if why is not None:
            skipped.append((number, why))
            continue
        events.append(event)
    return AuditLog(events, skipped, [n for n in replaced if n not in {s for s, _ in skipped}])
