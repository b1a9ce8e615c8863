"""One call's decisions, written once and driven by both clients: which model, which endpoint, whether to
retry, wait, fall back or give up. No I/O here: the flow yields what to do next and is sent the outcome.

    flow = call_flow(...)
    step = next(flow)                       # an Attempt or a Sleep
    while True:
        outcome = do(step)                  # the response, or the ClientError it raised
        step = flow.send(outcome)           # StopIteration(value=response) when done; raises when failed

The clients' own flows (``BaseClient._*_flow``) go one level further: they yield the I/O itself as small
operations (:class:`Rpc`, :class:`Each`, :class:`Sleep`, :class:`Spawn`), and each face is a driver that
performs them — blocking in :class:`Client`, awaited in :class:`AsyncClient` — and feeds back the answer,
or throws in the error (:class:`Run` does the feeding, so a driver is a loop of a few lines).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

from tritonforge.client._pool import Endpoint, EndpointPool
from tritonforge.client.policies import Deadline, Fallback, RetryBudget, RetryPolicy
from tritonforge.errors import (
    AllEndpointsFailed,
    ClientError,
    DeadlineExceeded,
    ModelNotFoundError,
    Unavailable,
)

__all__ = [
    "LOADS_PER_ENDPOINT",
    "Attempt",
    "BudgetState",
    "Each",
    "Load",
    "Op",
    "Rpc",
    "Run",
    "Sleep",
    "Spawn",
    "call_flow",
    "one",
]

#: how often one call asks one endpoint's model cache to load one model: the second covers a model the
#: cache evicted again before the call's retry reached it (a full ceiling: every other model busy)
LOADS_PER_ENDPOINT = 2


@dataclass(slots=True)
class Attempt:
    """Send the call to ``endpoint`` for ``model``/``version`` within ``timeout_s``."""

    endpoint: Endpoint
    model: str
    version: str | None
    timeout_s: float | None
    number: int  # 1-based over the whole call
    retry: bool  # a retry of the same model
    fallback: bool  # the first attempt of a fallback model


@dataclass(slots=True)
class Sleep:
    """Wait ``seconds`` (a backoff), then carry on."""

    seconds: float


@dataclass(slots=True)
class Load:
    """Have the model cache of ``endpoint`` load ``model`` within ``timeout_s``, after ``miss`` (the
    attempt's :class:`ModelNotFoundError` there); ``None`` comes back once it is loaded, or the error that
    says why not (``miss`` itself when the endpoint runs no cache)."""

    endpoint: Endpoint
    model: str
    miss: ModelNotFoundError
    timeout_s: float | None


@dataclass(slots=True)
class Rpc:
    """Call ``method`` of the inference service on ``endpoint``; its answer (or our error) comes back.

    ``ModelInfer`` takes the request's bytes (framed by the codec); every other method a protobuf message.
    ``merge`` (AsyncClient only): ``(call, attempt, rows, limit)`` when the call may be merged with others.
    ``request_id``: the id framed into a ``ModelInfer`` request that may go on the AsyncClient's streams
    (None: a grpc.aio call, e.g. one naming shared-memory regions).
    """

    endpoint: Endpoint
    method: str
    request: Any
    timeout_s: float | None
    model: str | None = None
    version: str | None = None
    merge: Any = None
    request_id: str | None = None


@dataclass(slots=True)
class Each:
    """Drive the flows at once, at most ``concurrency`` at a time; the list of their results comes back in
    order, a failed one as its :class:`ClientError`."""

    flows: list[Generator[Any, Any, Any]]
    concurrency: int | None = None


def one(rpc: Rpc) -> Generator[Rpc, Any, Any]:
    """A flow of a single RPC (to put it in an :class:`Each`)."""
    return (yield rpc)


@dataclass(slots=True)
class Spawn:
    """Run ``flow`` in the background (a shadow call); nothing comes back."""

    flow: Generator[Any, Any, Any]


Op = Rpc | Each | Sleep | Spawn


class Run:
    """One flow being driven: ``op`` is what to do now; feed back its answer or its error until ``done``.

    A driver is then a short loop (blocking: ``run.step(do)``; awaited: ``run.feed(await settled(op))``)::

        run = Run(flow)
        while not run.done:
            run.step(do)
        return run.result
    """

    __slots__ = ("done", "flow", "op", "result")

    def __init__(self, flow: Generator[Any, Any, Any]) -> None:
        self.flow = flow
        self.done = False
        self.result: Any = None
        self.op: Any = None
        self._advance(flow.send, None)

    def _advance(self, how: Callable[[Any], Any], value: Any) -> None:
        try:
            self.op = how(value)
        except StopIteration as stop:
            self.done = True
            self.result = stop.value

    def feed(self, outcome: Any) -> None:
        """The op's outcome goes back into the flow: an answer is sent in, a :class:`ClientError` raised."""
        if isinstance(outcome, ClientError):
            self._advance(self.flow.throw, outcome)
        else:
            self._advance(self.flow.send, outcome)

    def step(self, do: Callable[[Any], Any]) -> None:
        """Do the op with ``do`` (blocking) and feed back what came of it."""
        try:
            answer = do(self.op)
        except ClientError as exc:
            self._advance(self.flow.throw, exc)
        else:
            self._advance(self.flow.send, answer)


class BudgetState:
    """The live balance of a :class:`RetryBudget` (shared by every call of one client)."""

    def __init__(self, budget: RetryBudget | None, now: float) -> None:
        self.budget = budget
        self.tokens = budget.max_tokens if budget else 0.0
        self.updated = now
        self._lock = threading.Lock()

    def deposit(self) -> None:
        budget = self.budget
        if budget is not None and self.tokens < budget.max_tokens:
            with self._lock:
                self.tokens = min(budget.max_tokens, self.tokens + budget.ratio)

    def withdraw(self, now: float) -> bool:
        budget = self.budget
        if budget is None:
            return True
        with self._lock:
            elapsed = max(0.0, now - self.updated)
            self.updated = now
            self.tokens = min(budget.max_tokens, self.tokens + elapsed * budget.min_retries_per_s)
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False


def _deadline_error(
    model: str, version: str | None, total_s: float | None, last: ClientError | None, endpoint: str | None
) -> DeadlineExceeded:
    why = f" (last error: {last.message})" if last is not None else ""
    return DeadlineExceeded(
        f"model {model!r} got no answer within its deadline of {total_s} s{why}; raise timeout_s if the "
        "model "
        "is just slow",
        model=model,
        version=version,
        endpoint=endpoint,
    )


def call_flow(
    targets: Sequence[tuple[str, str | None]],
    *,
    pool: EndpointPool,
    retry: RetryPolicy,
    budget: BudgetState,
    deadline: Deadline,
    timeout_s: float | None,
    clock: Callable[[], float],
    rng: random.Random,
    resumed: tuple[float, Endpoint, ClientError] | None = None,
    load_misses: bool = False,
) -> Generator[Attempt | Sleep | Load, Any, Any]:
    """Drive one call across ``targets`` (the model and then its fallbacks); returns the response.

    ``resumed``: ``(start, endpoint, error)`` when the call's first attempt was made outside the flow (the
    clients' fast path, ``BaseClient._fast_infer``): it began at ``start`` (``clock`` time, the budget's
    deposit made), went to ``endpoint`` (still counted outstanding) for ``targets[0]`` and failed with
    ``error``; the flow goes on exactly as if it had made that attempt itself.

    ``load_misses``: a :class:`ModelNotFoundError` is a miss that the endpoint's model cache may serve. The
    flow yields a :class:`Load` for that endpoint, and once the model is loaded the next attempt goes to the
    same endpoint: another one may not have the model loaded. When that endpoint is no longer usable (down,
    circuit open, gone from the pool), the pool picks another as for any retry, where a miss is handled
    the same way. An attempt after a load counts against neither ``max_attempts`` nor the retry budget;
    each endpoint is asked at most :data:`LOADS_PER_ENDPOINT` times per model, all within the deadline.

    Raises:
        DeadlineExceeded: the deadline passed (a load that did not finish in time says so); never retried
            past it.
        AllEndpointsFailed: no endpoint usable and no retry left.
        ClientError: the last model's error when no retry or fallback applies.
    """
    if resumed is None:
        start = clock()
        budget.deposit()
    else:
        start = resumed[0]
    total_s = deadline.total_s if timeout_s is None else timeout_s
    deadline_at = None if total_s is None else start + total_s
    number = 0
    last: ClientError | None = None
    cause: ClientError | None = None  # the last error an endpoint gave (what "no endpoint" quotes)
    for index, (model, version) in enumerate(targets):
        tried: list[Endpoint] = []
        attempts = 0
        owed = 0  # attempts that followed a load: the miss's own retry, not the policy's
        loads: list[Endpoint] = []  # an entry per load asked of an endpoint
        home: Endpoint | None = None  # the endpoint whose cache just loaded the model
        endpoint: Endpoint | None
        error: ClientError
        while True:
            if resumed is not None:
                endpoint, error = resumed[1], resumed[2]
                resumed = None
                attempts = number = 1
                pool.release(endpoint, clock(), transport_failure=isinstance(error, Unavailable))
                tried.append(endpoint)
            else:
                now = clock()
                remaining = None if deadline_at is None else deadline_at - now
                if remaining is not None and remaining <= 0:
                    raise _deadline_error(
                        model, version, total_s, last, last.endpoint if last else None
                    ) from last
                endpoint = pool.acquire(now, tried, model, prefer=home)
                home = None
                if endpoint is None:
                    error = AllEndpointsFailed(
                        f"no endpoint is usable for model {model!r}: all of "
                        f"{[e.url for e in pool.endpoints]} are down or their circuit is open"
                        + (f" (last error: {cause.message})" if cause else ""),
                        model=model,
                        version=version,
                    )
                    attempts += 1
                else:
                    attempts += 1
                    number += 1
                    try:
                        outcome = yield Attempt(
                            endpoint,
                            model,
                            version,
                            deadline.attempt_timeout_s(remaining),
                            number,
                            retry=attempts > 1,
                            fallback=index > 0 and attempts == 1,
                        )
                    except BaseException:  # the driver was cancelled or closed us mid-attempt
                        pool.release(endpoint, clock(), transport_failure=False)
                        raise
                    if not isinstance(outcome, ClientError):
                        pool.release(endpoint, clock(), transport_failure=False)
                        return outcome
                    error = outcome
                    pool.release(endpoint, clock(), transport_failure=isinstance(error, Unavailable))
                    if endpoint not in tried:
                        tried.append(endpoint)
            last = error
            if not isinstance(error, AllEndpointsFailed):
                cause = error
            now = clock()
            remaining = None if deadline_at is None else deadline_at - now
            if (
                load_misses
                and isinstance(error, ModelNotFoundError)
                and endpoint is not None
                and loads.count(endpoint) < LOADS_PER_ENDPOINT
                and (remaining is None or remaining > 0)
            ):
                loads.append(endpoint)
                failed = yield Load(endpoint, model, error, remaining)
                if failed is None:
                    home = endpoint
                    owed += 1
                    continue
                error = last = cause = failed
                now = clock()
                remaining = None if deadline_at is None else deadline_at - now
                if isinstance(error, DeadlineExceeded) and remaining is not None and remaining <= 0:
                    raise error  # it says the cache was loading the model when the deadline passed
            if isinstance(error, DeadlineExceeded):
                if remaining is None or remaining <= 0:
                    raise _deadline_error(model, version, total_s, error, error.endpoint) from error
                retryable = True  # only the attempt's own cap passed; the call still has time
            else:
                retryable = retry.is_retryable(error) or isinstance(error, AllEndpointsFailed)
            if retryable and attempts - owed < retry.max_attempts and budget.withdraw(now):
                untried = endpoint is not None and any(
                    e not in tried and pool._available(e, now) for e in pool.endpoints
                )
                wait = 0.0 if untried else retry.backoff_s(attempts, rng)
                if remaining is not None and wait >= remaining:
                    raise _deadline_error(model, version, total_s, error, error.endpoint) from error
                if wait > 0:
                    yield Sleep(wait)
                continue
            break
        if index + 1 < len(targets) and Fallback.should_fall_back(last):
            continue
        raise last
    raise AssertionError("call_flow needs at least one target")  # pragma: no cover
