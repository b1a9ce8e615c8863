"""Triton's own statistics as tests read them. A backend sends its responses before it reports the
statistics of the requests, so a count read right after the last answer may be one short: read with
``settled`` until the count the test knows must be reached is reached (bounded), then assert."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import tritonclient.grpc as grpcclient

T = TypeVar("T")


class Counts(NamedTuple):
    requests: int  # successful requests
    rows: int  # Triton's inference count
    executions: int

    def __sub__(self, other: tuple[int, ...]) -> Counts:  # type: ignore[override]
        return Counts(*(a - b for a, b in zip(self, other, strict=True)))


def counts(url: str, model: str) -> Counts:
    """Every version of ``model`` on the server at ``url``, summed."""
    with grpcclient.InferenceServerClient(url) as raw:
        stats = raw.get_inference_statistics(model_name=model).model_stats
    return Counts(
        sum(s.inference_stats.success.count for s in stats),
        sum(s.inference_count for s in stats),
        sum(s.execution_count for s in stats),
    )


def settled(read: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 10.0) -> T:
    """``read()`` again until ``done`` holds or ``timeout_s`` passes; the last value either way."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def counts_when(url: str, model: str, *, requests: int = 0, rows: int = 0) -> Counts:
    """``model``'s counts once it has counted ``requests`` successful requests and ``rows`` rows in all
    (bounded)."""
    return settled(lambda: counts(url, model), lambda c: c.requests >= requests and c.rows >= rows)


def counted_since(url: str, model: str, before: Counts, rows: int) -> Counts:
    """What ``model`` counted since ``before``, once at least ``rows`` rows are counted (bounded)."""
    return counts_when(url, model, rows=before.rows + rows) - before
