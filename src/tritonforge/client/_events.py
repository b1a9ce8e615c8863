"""What a call tells the outside: the client metrics and the hooks (a hook's exception never reaches the
call). No I/O.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np

from tritonforge.client._flow import Attempt
from tritonforge.client._inputs import (
    PreparedCall,
)
from tritonforge.client.observe import ClientEvent, Hook
from tritonforge.errors import (
    ClientError,
)

if TYPE_CHECKING:
    pass
from tritonforge.client._channels import Channels

__all__ = ["Events"]


class Events(Channels):
    """Metrics and hook events of calls, attempts, retries and fallbacks."""

    def _on_attempt(self, call_model: str, attempt: Attempt, request_id: str | None = None) -> None:
        metrics = self._metrics
        if metrics is not None:
            metrics.attempt(attempt.endpoint.url)
            if attempt.retry:
                metrics.retry(call_model)
            if attempt.fallback:
                metrics.fallback(call_model, attempt.model)
        if self.hooks and (attempt.retry or attempt.fallback):
            self._fire(
                ClientEvent(
                    "retry" if attempt.retry else "fallback",
                    attempt.model,
                    attempt.version,
                    attempt.endpoint.url,
                    attempt=attempt.number,
                    request_id=request_id,
                )
            )

    def _on_attempt_error(self, attempt: Attempt, error: ClientError) -> None:
        if self._metrics is not None:
            self._metrics.endpoint_failure(attempt.endpoint.url, error)

    def _on_done(
        self,
        model: str,
        version: str | None,
        started: float,
        error: ClientError | None,
        attempt: Attempt | None,
        call: PreparedCall,
        result: dict[str, np.ndarray] | None,
    ) -> None:
        latency_s = time.perf_counter() - started
        metrics = self._metrics
        if metrics is not None:
            metrics.call(model, latency_s)
            if error is not None:
                metrics.failure(model, error)
        if self.hooks:
            self._fire(
                ClientEvent(
                    "request",
                    model,
                    attempt.version if attempt else version,
                    attempt.endpoint.url if attempt else None,
                    latency_s,
                    error,
                    attempt.number if attempt else 0,
                    request_id=call.request_id,
                    inputs=call.arrays,
                    outputs=result,
                )
            )

    def _fire(self, event: ClientEvent) -> None:
        """Give ``event`` to every hook; a hook's exception never reaches the call (counted, warned once)."""
        for hook in self.hooks:
            try:
                hook(event)
            except Exception as exc:
                self._hook_failed(hook, exc)

    def _hook_failed(self, hook: Hook, exc: Exception) -> None:
        with self._hook_lock:
            self.hook_errors += 1
            first = id(hook) not in self._hooks_warned
            self._hooks_warned.add(id(hook))
        if first:
            # a warnings filter set to "error" must not turn the report into the call's failure
            with contextlib.suppress(Exception):
                warnings.warn(
                    f"client hook {getattr(hook, '__qualname__', None) or type(hook).__qualname__} raised "
                    f"{type(exc).__name__}: {exc} (on a {self.__class__.__name__} call; the call went on; "
                    "this hook's further errors are only counted in client.hook_errors)",
                    RuntimeWarning,
                    stacklevel=2,
                )
