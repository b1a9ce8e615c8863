"""Promote and rollback applied to a running server without downtime.

:func:`tritonforge.registry.promote` only rewrites the config's version policy; a server in explicit
model-control mode sees it when the model is loaded again, one in poll mode at its next poll. Either way
Triton *reloads*: it loads the newly served version before it unloads the old one, and the old one
finishes its in-flight requests, so apps calling the model's name see no failure. These functions make
the change, trigger the reload (explicit mode) or wait for it (poll mode), and return once the server
serves exactly the new version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonforge.registry import promote, rollback, served_versions
from tritonforge.repository.writer import load_config, versions
from tritonforge.rollout.state import RolloutError, load_state
from tritonforge.rollout.waits import load_and_wait

if TYPE_CHECKING:
    from tritonforge.client.policies import Auth

__all__ = ["check_access", "promote_live", "refuse_during_rollout", "reload_served", "rollback_live"]


def refuse_during_rollout(repo: str | os.PathLike[str], model: str, action: str) -> None:
    """Refuse a served-version change while a rollout of ``model`` is in progress.

    Raises:
        RolloutError: naming the rollout and how to end it.
    """
    state = load_state(repo, model)
    if state is not None:
        raise RolloutError(
            f"a rollout of '{model}' to v{state.candidate} is in progress ({state.phase}); finish it or "
            f"`tritonforge rollout abort {model}` before you {action}",
            model=model,
        )


def check_access(url: str, auth: Auth | None) -> None:
    """Ask the server at ``url`` for its repository index: refused (restricted model-repository calls
    without our key, mutual TLS without our certificate) before the repository is changed, not after.

    Raises:
        AuthenticationError: naming the refused group and how to pass its key.
    """
    from tritonforge.client import Client, RetryPolicy

    with Client(url, metrics=False, auth=auth, retry=RetryPolicy.none()) as client:
        client.repository_index()


def reload_served(
    url: str, repo: str | os.PathLike[str], model: str, *, timeout_s: float = 120.0, auth: Auth | None = None
) -> list[int]:
    """Make the server at ``url`` serve what ``repo``'s config of ``model`` says; return those versions.

    ``auth``: the client's :class:`~tritonforge.client.Auth` (the operator key, TLS) where needed.

    Raises:
        RolloutError: the server refused the load, or did not serve exactly those versions in time.
    """
    from tritonforge.client import Client

    root = Path(repo)
    want = served_versions(load_config(root / model), versions(root / model))
    others = [v for v in versions(root / model) if v not in want]
    with Client(url, metrics=False, auth=auth) as client:

        def serves_exactly() -> bool:
            return all(client.is_model_ready(model, v) for v in want) and not any(
                client.is_model_ready(model, v) for v in others
            )

        load_and_wait(
            client,
            model,
            serves_exactly,
            timeout_s=timeout_s,
            url=url,
            then=f"it should serve {want} (see the server's log)",
        )
    return want


def promote_live(
    repo: str | os.PathLike[str],
    url: str,
    model: str,
    version: int,
    *,
    reason: str | None = None,
    force: bool = False,
    auth: Auth | None = None,
) -> dict[str, Any]:
    """:func:`~tritonforge.registry.promote`, then the running server reloaded to serve it.

    Raises:
        RepositoryError: as promote. RolloutError: a rollout of the model is in progress, or the reload
            failed.
    """
    refuse_during_rollout(repo, model, "promote")
    check_access(url, auth)
    event = promote(repo, model, version, reason=reason, force=force)
    reload_served(url, repo, model, auth=auth)
    return event


def rollback_live(
    repo: str | os.PathLike[str],
    url: str,
    model: str,
    *,
    to: int | None = None,
    reason: str | None = None,
    force: bool = False,
    auth: Auth | None = None,
) -> dict[str, Any]:
    """:func:`~tritonforge.registry.rollback`, then the running server reloaded to serve it.

    Raises:
        RepositoryError: as rollback. RolloutError: a rollout of the model is in progress, or the
            reload failed.
    """
    refuse_during_rollout(repo, model, "roll back")
    check_access(url, auth)
    event = rollback(repo, model, to=to, reason=reason, force=force)
    reload_served(url, repo, model, auth=auth)
    return event
