"""Append-only audit trail of a repository: one JSON line per change in ``<repo>/audit.jsonl``.

:func:`record_event` is the one writer besides promote/rollback (which write their own lines in the same
file under the same lock): add-model, compile, each rollout step and verdict with its evidence, evaluation
results. Every line has ``at`` (UTC), ``by`` (user), ``action``, and where known ``model``, ``version``,
``reason`` and the details of what changed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonforge.registry.core import _locked
from tritonforge.repository.writer import current_user

__all__ = ["current_user", "record_event"]


def record_event(
    repo: str | os.PathLike[str],
    action: str,
    *,
    model: str | None = None,
    version: int | None = None,
    reason: str | None = None,
    by: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Append one event to ``<repo>/audit.jsonl`` (flushed and fsynced) and return it.

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
    if details:
        event.update({k: v for k, v in details.items() if k not in event})
    line = json.dumps(event, sort_keys=True, default=str) + "\n"
    with _locked(root) as log, open(log, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())
    return event
