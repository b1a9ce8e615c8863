"""The options several verbs share, each declared once (the spellings are docs/cli-vocabulary.md's).

A verb takes a shared option as its parameter's default (``reason: str | None = REASON``), so the flag,
its default and its help are the same on every verb that has it. Where verbs share a flag but each says
what it gives (``--json``, ``--out``, ``--repo``, the evaluation gates), a function here holds the
spelling and the default, and the verb passes its own words. The access options (``--auth``, ``--tls-*``)
are :func:`tritonforge.commands.access.with_access`'s; ``--match`` and ``--limit`` are
:mod:`tritonforge.commands._rows`'; the model cache's (``--cache-max-models``, ``--cache-max-memory``,
``--pin``) are :mod:`tritonforge.commands._cache`'s.

Example:
    >>> from tritonforge.commands._options import REASON, json_flag
    >>> def abort(model: str, reason: str | None = REASON, as_json: bool = json_flag("The outcome as JSON.")):
    ...     ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

__all__ = [
    "DEFAULT_REPO",
    "ON_GATE_FAIL",
    "REASON",
    "REPO_ARGUMENT",
    "SPECS",
    "json_flag",
    "no_worse_than_serving_flag",
    "out_option",
    "repo_option",
    "require_option",
]

#: the repository a verb works on when ``--repo`` is not given
DEFAULT_REPO = Path("model_repository")

REASON: Any = typer.Option(None, help="Why (kept in the audit log).")
"""``--reason``: why an operator changed what is served (promote, rollback, rollout start|abort)."""

ON_GATE_FAIL: Any = typer.Option(None, help="A command run when a gate fails (retraining hook).")
"""``--on-gate-fail``: the retraining hook of the evaluation gates (promote, rollout start)."""

REPO_ARGUMENT: Any = typer.Argument(..., help="The model repository.")
"""``REPO``, the positional repository of the verbs that read or record in it."""

SPECS: Any = typer.Argument(..., help="Spec files or folders of *.yaml.")
"""``SPECS...``: the pipeline specs of ``ensemble check|compile``."""


def json_flag(help: str) -> Any:
    """``--json``: the verb's result as one JSON document on stdout; ``help`` says what it holds."""
    return typer.Option(False, "--json", help=help)


def out_option(default: Path | None, help: str) -> Any:
    """``--out`` / ``-o``: where a verb writes (``default`` None: required); ``help`` says what goes there."""
    return typer.Option(... if default is None else default, "--out", "-o", help=help)


def repo_option(help: str) -> Any:
    """``--repo``, ``model_repository`` unless given; ``help`` says what the verb does with it."""
    return typer.Option(DEFAULT_REPO, "--repo", help=help)


def require_option(whose: str) -> Any:
    """``--require``: a gate on the evaluation figures of ``whose`` version ("VERSION's")."""
    return typer.Option([], help=f"Gate on {whose} evaluation, e.g. 'accuracy>=0.97'.")


def no_worse_than_serving_flag(whose: str) -> Any:
    """``--no-worse-than-serving``: a gate comparing ``whose`` figures with the served version's."""
    return typer.Option(False, help=f"Gate: {whose} figures >= the served one's.")
