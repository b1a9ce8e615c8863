"""The one writer of a repository's audit trail: one JSON line per change in ``<repo>/audit.jsonl``.

The library records its own changes here, so a caller of the API leaves the same trail as the CLI:
:func:`~tritonforge.repository.add_model` (``add-model``), ``compile_specs`` (``compile``),
``register``, ``promote`` and ``rollback`` in the registry, and the rollout controller and its gates
(``rollout-*``, ``evaluate``, ``gate-failed``). Every line has ``at`` (UTC), ``by`` (user), ``action``,
and where known ``model``, ``version``, ``reason`` and the details of what changed. Writers of one
repository take turns under a lock on the log, and a change that must be recorded together with what it
changed (a served version) runs under that lock too (``change``). It sits in the repository layer so that
everything which changes a repository can record; reading the log back is the registry's
(:mod:`tritonforge.registry.audit`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import getpass
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["AUDIT_LOG", "current_user", "record_event"]

AUDIT_LOG = "audit.jsonl"


def current_user() -> str:
    """Who is writing (manifests, audit log): ``$TRITONFORGE_USER`` when set (CI, bots), else the login
    name; ``"unknown"`` when the system can't say."""
    if os.environ.get("TRITONFORGE_USER"):
        return os.environ["TRITONFORGE_USER"]
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"


@contextlib.contextmanager
def _locked(repo: Path) -> Iterator[Path]:
    """Serialise the changes and records of one repository (promote/rollback from several shells)."""
    log = repo / AUDIT_LOG
    with open(log, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield log
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_event(
    repo: str | os.PathLike[str],
    action: str,
    *,
    model: str | None = None,
    version: int | None = None,
    reason: str | None = None,
    by: str | None = None,
    details: Mapping[str, Any] | None = None,
    change: Callable[[], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Append one event to ``<repo>/audit.jsonl`` (flushed and fsynced) and return it.

    ``change``, when given, is run under the log's lock first and the details it returns are recorded
    with the event: no other writer's change or record comes between the two (an exception from it
    records nothing).

    Example:
        >>> record_event("model_repository", "evaluate", model="clf", version=2,
        ...              details={"accuracy": 0.97})                                  # doctest: +SKIP

    Raises:
        ValueError: ``action`` is empty.
        OSError: the log can't be written (the repository folder is missing or read-only).
    """
    if not action:
        raise ValueError("an audit event needs an action (e.g. 'promote')")
    root = Path(repo)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root) as log:
        changed = change() if change is not None else {}
        event: dict[str, Any] = {
            "at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "action": action,
            "by": by or current_user(),
        }
        if model is not None:
            event["model"] = model
        if version is not None:
            event["version"] = int(version)
        if reason:
            event["reason"] = reason
        for extra in (changed, details or {}):
            event.update({k: v for k, v in extra.items() if k not in event})
        line = json.dumps(event, sort_keys=True, default=str) + "\n"
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
    return event
