"""Structured logs: one JSON line per finished client call, as a client hook.

    client = Client("localhost:8001", hooks=[JsonLogHook(sys.stderr)])
    client.infer("mlp", {"x": x}, request_id="order-1234")
    # {"ts": "...", "request_id": "order-1234", "model": "mlp", "version": "1", "endpoint": "localhost:8001",
    #  "attempts": 1, "latency_ms": 0.84, "outcome": "ok"}

The request id is the call's (``event.request_id``): the caller's ``request_id=``, else the client's own
(``<client prefix>-<counter>``), the same id the client sent to Triton as the request's ``id``, so a line
here and Triton's log or trace of that request line up. (An event without one gets a fresh uuid.)
Writing never raises into the call: a failed write is counted in ``errors``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import threading
import uuid
from typing import IO, Any

__all__ = ["JsonLogHook", "log_record"]


def log_record(event: Any) -> dict[str, Any]:
    """The JSON-ready record of one ``request`` event."""
    error = getattr(event, "error", None)
    return {
        "ts": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
        "request_id": getattr(event, "request_id", None) or uuid.uuid4().hex,
        "model": event.model,
        "version": event.version,
        "endpoint": event.endpoint,
        "attempts": event.attempt,
        "latency_ms": round(event.latency_s * 1000.0, 3),
        "outcome": "ok" if error is None else type(error).__name__,
        **({"error": str(getattr(error, "message", error))} if error is not None else {}),
    }


class JsonLogHook:
    """A client hook writing one JSON line per finished call to a stream, a file, or a logger.

    Args:
        sink: a text stream, a path (appended to), or a :class:`logging.Logger` (logged at INFO).
        kinds: the event kinds logged (default: finished calls only).
    """

    def __init__(
        self,
        sink: IO[str] | str | os.PathLike[str] | logging.Logger,
        *,
        kinds: tuple[str, ...] = ("request",),
    ) -> None:
        self.kinds = kinds
        self.errors = 0
        self._lock = threading.Lock()
        self._owned: IO[str] | None = None
        if isinstance(sink, logging.Logger):
            self._logger: logging.Logger | None = sink
            self._stream: IO[str] | None = None
        elif isinstance(sink, (str, os.PathLike)):
            self._logger = None
            self._stream = self._owned = open(sink, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        else:
            self._logger, self._stream = None, sink

    def __call__(self, event: Any) -> None:
        try:
            if getattr(event, "kind", None) not in self.kinds:
                return
            line = json.dumps(log_record(event), separators=(",", ":"))
            if self._logger is not None:
                self._logger.info(line)
                return
            assert self._stream is not None
            with self._lock:
                self._stream.write(line + "\n")
                self._stream.flush()
        except Exception:
            self.errors += 1

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()
            self._owned = None
