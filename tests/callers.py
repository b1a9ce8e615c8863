"""Apps calling one model non-stop from a few threads, as the tests that change models under load need.

``Callers(url, model, request)`` calls ``model`` with what ``request()`` gives (the inputs, and what the
answer's ``judge`` needs to tell a right answer from a wrong one), each call with a deadline, and counts
the answers (``ok``), the wrong ones (``wrong``) and the text of every failure (``failures``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import tritonclient.grpc as grpcclient

#: what one call sends: the inputs, and anything the judge needs to check the answer
Request = tuple[list[grpcclient.InferInput], Any]


class Callers:
    """``threads`` threads calling ``model`` until the ``with`` block ends; ``judge(result, context)`` says
    whether an answer is wrong (it may raise: that call is then a failure); ``settle_s`` is waited after the
    threads start and before they stop."""

    def __init__(
        self,
        url: str,
        model: str,
        request: Callable[[], Request],
        *,
        threads: int = 3,
        deadline_s: float = 10.0,
        judge: Callable[[Any, Any], bool] | None = None,
        settle_s: float = 0.0,
    ) -> None:
        self.url, self.model, self.request, self.judge = url, model, request, judge
        self.deadline_s, self.settle_s = deadline_s, settle_s
        self.ok = 0
        self.wrong = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        try:
            while not self.stop.is_set():
                inputs, context = self.request()
                try:
                    result = client.infer(self.model, inputs, client_timeout=self.deadline_s)
                    wrong = self.judge is not None and self.judge(result, context)
                    with self.lock:
                        self.ok += 1
                        self.wrong += int(wrong)
                except Exception as exc:
                    with self.lock:
                        # str: tritonclient's exception has an empty repr; its str carries the status
                        self.failures.append(f"{type(exc).__name__}: {exc}"[:300])
                time.sleep(0.005)
        finally:
            client.close()

    def __enter__(self) -> Callers:
        for t in self.threads:
            t.start()
        time.sleep(self.settle_s)
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(self.settle_s)
        self.stop.set()
        for t in self.threads:
            t.join(self.deadline_s + 20)
