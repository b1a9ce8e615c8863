"""Loading a model on a running server and waiting until it serves what we need.

One helper, :func:`load_and_wait`, for every model change a rollout or a live promote makes: it asks the
server to load (reload) the model, and whatever the server's model-control mode, returns once a condition
holds. A server in ``poll`` or ``none`` mode refuses explicit loads (it picks changes up itself, or not at
all); that refusal is told apart from a real failure in one place, :func:`request_load`, and surfaces as
:class:`NoModelControl` instead of callers sniffing the message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tritonforge.errors import ClientError, RolloutError

__all__ = ["NoModelControl", "load_and_wait", "request_load"]

# Triton's answer to a load/unload request when its model control is not explicit (poll and none modes)
_NOT_EXPLICIT = "explicit model load / unload is not allowed"


class NoModelControl(RolloutError):
    """The server does not take load/unload requests (``poll`` or ``none`` model-control mode)."""


def request_load(client: Any, model: str) -> None:
    """Ask the server behind ``client`` to load (reload) ``model``.

    Raises:
        NoModelControl: the server is in ``poll`` or ``none`` mode (it loads from the repository itself).
        RolloutError: the server refused the load (its reason included).
    """
    try:
        client.load_model(model)
    except ClientError as exc:
        text = str(exc).lower()
        if _NOT_EXPLICIT in text or "polling is enabled" in text:
            raise NoModelControl(
                f"the server does not take load requests for '{model}' (poll or none model control)",
                model=model,
            ) from exc
        raise RolloutError(f"the server refused to load '{model}': {exc.message}", model=model) from exc


def load_and_wait(
    client: Any,
    model: str,
    done: Callable[[], bool],
    *,
    timeout_s: float,
    url: str = "",
    then: str = "",
) -> bool:
    """Load (reload) ``model``; under poll or none mode, wait for the server to pick the change up itself.
    Either way, return once ``done()`` holds: True when the server took the load request, False when it
    is in poll or none mode.

    ``then``: what the operator does next when it times out (appended to the message).

    Raises:
        RolloutError: the server refused the load, or ``done()`` did not hold within ``timeout_s``.
    """
    explicit = True
    try:
        request_load(client, model)
    except NoModelControl:
        explicit = False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if done():
            return explicit
        time.sleep(0.2)
    where = f" on {url}" if url else ""
    raise RolloutError(
        f"'{model}' did not become ready{where} within {timeout_s:g} s" + (f"; {then}" if then else ""),
        model=model,
    )
