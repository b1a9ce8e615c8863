"""Loading a model on a running server and waiting until it serves what we need.

One helper, :func:`load_and_wait`, for every model change a rollout, an evaluation or a live promote
makes: it asks the server to load (reload) the model, and whatever the server's model-control mode,
returns once a condition holds. :class:`ServerView` is what the rollout controller asks of the server.
A server in ``poll`` or ``none`` mode refuses explicit loads (it picks changes up itself, or not at
all); that refusal is told apart from a real failure in one place, :func:`request_load`, and surfaces as
:class:`NoModelControl` instead of callers sniffing the message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from tritonforge.errors import ClientError, RolloutError, TransportError

__all__ = ["NoModelControl", "ServerView", "load_and_wait", "request_load"]

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


class ServerView:
    """What a rollout asks of the server at ``url``, on one lazily opened client: readiness of a model
    (version), whether a model is served by a config carrying a parameter, waiting for a restarting
    server, loading with :func:`load_and_wait`, unloading.

    ``then``: what the operator runs when a wait times out (put in the error); ``on_wait``: called while
    waiting for the server (the controller beats its heartbeat).
    """

    def __init__(
        self,
        url: str,
        *,
        auth: Any = None,
        timeout_s: float = 120.0,
        then: str = "",
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.auth = auth
        self.timeout_s = timeout_s
        self.then = then
        self.on_wait = on_wait or (lambda: None)
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            from tritonforge.client import Client

            self._client = Client(self.url, metrics=False, auth=self.auth)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def ready(self, model: str, version: int | None = None) -> bool:
        """Whether ``model`` (``version``) is ready; False when the server can't say (e.g. it is down)."""
        try:
            return bool(self.client.is_model_ready(model, version))
        except ClientError:
            return False

    def served_with(self, model: str, parameter: str) -> bool | None:
        """Whether the config ``model`` is served with carries ``parameter``; None when it isn't served."""
        try:
            config = self.client.model_config(model)
        except ClientError:
            return None
        return parameter in config.parameters

    def wait_ready(self) -> None:
        """Until the server answers (a restarting one): live, not *ready*, which Triton's strict readiness
        (its default) denies while any model of the server is not ready, ours or not; a rollout checks
        its own models itself.

        Raises:
            RolloutError: not answering within the timeout.
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if self.client.is_server_live():
                    return
            except ClientError:
                pass
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"the server at {self.url} does not answer after {self.timeout_s:g} s"
                    + (f"; {self.then}" if self.then else "")
                )
            self.on_wait()
            time.sleep(0.5)

    def load(self, model: str, done: Callable[[], bool]) -> bool:
        """:func:`load_and_wait` on this server; a server that went away meanwhile (restarting) is waited
        for and asked again, within the timeout."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return load_and_wait(
                    self.client, model, done, timeout_s=self.timeout_s, url=self.url, then=self.then
                )
            except RolloutError as exc:
                if not isinstance(exc.__cause__, TransportError) or time.monotonic() > deadline:
                    raise
            self.wait_ready()

    def unload(self, model: str) -> None:
        """Unload ``model`` where the server takes the request (nothing to do under poll or none mode)."""
        with contextlib.suppress(ClientError):
            self.client.unload_model(model)
