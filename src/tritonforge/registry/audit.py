"""Append-only audit trail of a repository: one JSON line per change in ``<repo>/audit.jsonl``.

:func:`record_event` is the one writer; it lives in the repository layer
(:mod:`tritonforge.repository.audit`) so that everything that changes a repository records there itself:
add-model, compile, register, promote and rollback, each rollout step and verdict with its evidence,
evaluation results. Every line has ``at`` (UTC), ``by`` (user), ``action``, and where known ``model``,
``version``, ``reason`` and the details of what changed.
"""

from __future__ import annotations

from tritonforge.repository.audit import record_event
from tritonforge.repository.writer import current_user

__all__ = ["current_user", "record_event"]
