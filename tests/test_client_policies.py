"""The client's decisions without I/O: policies, the endpoint pool and the call flow, driven directly.

The flow is fed outcomes by hand (the transport edge is ours), so these run without a server.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tritonforge.client import (
    CircuitBreaker,
    Deadline,
    Fallback,
    RetryBudget,
    RetryPolicy,
    Shadow,
    TrafficSplit,
    Variant,
)
from tritonforge.client._base import compare_outputs
from tritonforge.client._flow import LOADS_PER_ENDPOINT, Attempt, BudgetState, Load, Sleep, call_flow
from tritonforge.client._pool import EndpointPool
from tritonforge.errors import (
    AllEndpointsFailed,
    ClientError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequestError,
    ModelNotFoundError,
    Unavailable,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(
    flow: Any,
    answer: Callable[[Attempt], Any],
    clock: FakeClock,
    load: Callable[[Load], Any] | None = None,
) -> tuple[Any, list[Attempt]]:
    """Run a flow to its end; ``answer`` gives each attempt's outcome (a response or a ClientError), ``load``
    each load's (``None`` once loaded, or a ClientError)."""
    attempts: list[Attempt] = []
    try:
        step = next(flow)
        while True:
            if isinstance(step, Sleep):
                clock.now += step.seconds
                outcome = None
            elif isinstance(step, Load):
                assert load is not None, "a flow that does not load misses yielded a Load"
                outcome = load(step)
            else:
                attempts.append(step)
                outcome = answer(step)
            step = flow.send(outcome)
    except StopIteration as stop:
        return stop.value, attempts


def make_flow(
    targets: Sequence[tuple[str, str | None]],
    pool: EndpointPool,
    clock: FakeClock,
    *,
    retry: RetryPolicy | None = None,
    budget: BudgetState | None = None,
    deadline: Deadline | None = None,
    timeout_s: float | None = None,
    load_misses: bool = False,
) -> Any:
    retry = retry or RetryPolicy(max_attempts=3, budget=None)
    return call_flow(
        targets,
        pool=pool,
        retry=retry,
        budget=budget or BudgetState(retry.budget, clock()),
        deadline=deadline or Deadline(total_s=10.0),
        timeout_s=timeout_s,
        clock=clock,
        rng=random.Random(0),
        load_misses=load_misses,
    )


def pool_of(*urls: str, threshold: int = 2, reset_s: float = 1.0) -> EndpointPool:
    return EndpointPool(
        list(urls), CircuitBreaker(failure_threshold=threshold, reset_timeout_s=reset_s), random.Random(0)
    )


# -- value objects -------------------------------------------------------------------------------------


def test_policies_have_readable_reprs() -> None:
    assert repr(Deadline(5.0, attempt_s=1.0)) == "Deadline(total_s=5.0, attempt_s=1.0)"
    assert repr(Fallback("small", ("clf", 2))) == "Fallback('small', ('clf', '2'))"
    assert "share=0.05" in repr(Shadow("next", share=0.05))


@pytest.mark.parametrize(
    "bad",
    [
        lambda: RetryPolicy(max_attempts=0),
        lambda: Deadline(total_s=-1),
        lambda: TrafficSplit(()),
        lambda: Variant("m", weight=-1),
        lambda: Shadow("m", share=1.5),
        lambda: CircuitBreaker(failure_threshold=0),
    ],
)
def test_policy_raises_value_error_when_built_with_nonsense(bad: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        bad()


def test_retry_policy_backoff_grows_exponentially_within_its_cap() -> None:
    policy = RetryPolicy(backoff_initial_s=0.1, backoff_multiplier=2.0, backoff_max_s=0.5, jitter=0.0)
    rng = random.Random(0)
    assert [policy.backoff_s(n, rng) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]


def test_retry_policy_full_jitter_stays_below_the_exponential_step() -> None:
    policy = RetryPolicy(backoff_initial_s=0.1, jitter=1.0)
    rng = random.Random(1)
    waits = [policy.backoff_s(2, rng) for _ in range(200)]
    assert all(0 <= w <= 0.2 for w in waits) and len(set(waits)) > 100


def test_retry_policy_retries_only_transient_errors() -> None:
    policy = RetryPolicy()
    assert policy.is_retryable(Unavailable("down"))
    for error in (InvalidRequestError("bad"), ModelNotFoundError("gone"), InferenceFailed("boom")):
        assert not policy.is_retryable(error)


def test_traffic_split_sends_its_share_to_the_canary() -> None:
    split = TrafficSplit.canary("m", stable="1", candidate="2", share=0.1)
    rng = random.Random(7)
    canary = sum(split.choose(None, rng).version == "2" for _ in range(20_000))
    assert 1_800 <= canary <= 2_200


def test_traffic_split_sticky_key_always_chooses_the_same_variant() -> None:
    split = TrafficSplit.canary("m", stable="1", candidate="2", share=0.5, sticky=True)
    for key in (f"user-{i}" for i in range(200)):
        assert len({split.choose(key, random.Random(i)).version for i in range(5)}) == 1


def test_traffic_split_never_chooses_a_zero_weight_variant() -> None:
    split = TrafficSplit((Variant("a", weight=0.0), Variant("b", weight=1.0)))
    assert {split.choose(None, random.Random(i)).model for i in range(500)} == {"b"}


def test_compare_outputs_counts_numeric_and_string_differences() -> None:
    import numpy as np

    a = {"y": np.array([1.0, 2.0], np.float32), "s": np.array([b"x"], dtype=object)}
    assert compare_outputs(a, dict(a), 1e-5, 1e-6) == (False, 0.0)
    mismatch, diff = compare_outputs(a, {**a, "y": np.array([1.0, 2.5], np.float32)}, 1e-5, 1e-6)
    assert mismatch and diff == pytest.approx(0.5)
    assert compare_outputs(a, {**a, "s": np.array([b"z"], dtype=object)}, 1e-5, 1e-6)[0]
    assert compare_outputs(a, {"y": a["y"]}, 1e-5, 1e-6)[0]


# -- endpoint pool -------------------------------------------------------------------------------------


def test_pool_chooses_the_endpoint_with_least_outstanding_requests() -> None:
    pool = pool_of("a:1", "b:1", "c:1")
    chosen = [pool.acquire(0.0) for _ in range(6)]
    assert sorted(ep.url for ep in chosen if ep) == ["a:1", "a:1", "b:1", "b:1", "c:1", "c:1"]
    a = pool.endpoints[0]
    pool.release(a, 0.0, transport_failure=False)
    pool.release(a, 0.0, transport_failure=False)
    assert pool.acquire(0.0) is a


def test_pool_opens_the_circuit_after_consecutive_failures_and_probes_after_reset() -> None:
    pool = pool_of("a:1", "b:1", threshold=2, reset_s=1.0)
    a, b = pool.endpoints
    for _ in range(2):
        pool.acquire(0.0, exclude=[b])
        pool.release(a, 0.0, transport_failure=True)
    assert a.state == "open"
    assert {pool.acquire(0.5).url for _ in range(3)} == {"b:1"}  # open: skipped
    probe = pool.acquire(1.5, exclude=[b])
    assert probe is a and a.state == "half-open"
    assert pool.acquire(1.5, exclude=[b]) is b  # one probe at a time
    pool.release(a, 1.6, transport_failure=False)
    assert a.state == "closed"


def test_pool_reopens_the_circuit_when_the_half_open_probe_fails() -> None:
    pool = pool_of("a:1", threshold=1, reset_s=1.0)
    (a,) = pool.endpoints
    pool.acquire(0.0)
    pool.release(a, 0.0, transport_failure=True)
    assert pool.acquire(0.5) is None
    assert pool.acquire(1.0) is a
    pool.release(a, 1.0, transport_failure=True)
    assert a.state == "open" and pool.acquire(1.5) is None


def test_pool_health_check_takes_an_endpoint_out_and_brings_it_back() -> None:
    pool = pool_of("a:1", "b:1", reset_s=100.0)
    a, _ = pool.endpoints
    pool.mark_health(a, False, 0.0)
    assert {pool.acquire(1.0).url for _ in range(4)} == {"b:1"}
    pool.mark_health(a, True, 2.0)
    assert pool.acquire(2.0) is a


def test_pool_raises_value_error_when_given_no_endpoint() -> None:
    with pytest.raises(ValueError):
        EndpointPool([], CircuitBreaker())


# -- the call flow -------------------------------------------------------------------------------------


def test_call_flow_returns_the_first_answer() -> None:
    clock = FakeClock()
    result, attempts = drive(make_flow([("m", None)], pool_of("a:1"), clock), lambda a: "ok", clock)
    assert result == "ok" and len(attempts) == 1 and not attempts[0].retry


def test_call_flow_raises_invalid_request_error_without_retrying() -> None:
    clock = FakeClock()
    seen: list[Attempt] = []

    def answer(attempt: Attempt) -> Any:
        seen.append(attempt)
        return InvalidRequestError("wrong shape")

    flow = make_flow([("m", None), ("fallback", None)], pool_of("a:1", "b:1"), clock)
    with pytest.raises(InvalidRequestError):
        drive(flow, answer, clock)
    assert len(seen) == 1  # no retry, no fallback


def test_call_flow_retries_unavailable_on_another_endpoint() -> None:
    clock = FakeClock()

    def answer(attempt: Attempt) -> Any:
        return Unavailable("down") if attempt.endpoint.url == "a:1" else "ok"

    pool = pool_of("a:1", "b:1")
    pool.endpoints[1].outstanding = 5  # make a:1 the first choice
    result, attempts = drive(make_flow([("m", None)], pool, clock), answer, clock)
    assert result == "ok" and [a.endpoint.url for a in attempts] == ["a:1", "b:1"] and attempts[1].retry
    assert pool.endpoints[0].outstanding == 0 and pool.endpoints[1].outstanding == 5


def test_call_flow_falls_back_when_the_model_fails() -> None:
    clock = FakeClock()

    def answer(attempt: Attempt) -> Any:
        return InferenceFailed("boom") if attempt.model == "primary" else f"from {attempt.model}"

    result, attempts = drive(
        make_flow([("primary", None), ("backup", "2")], pool_of("a:1"), clock), answer, clock
    )
    assert result == "from backup"
    assert [(a.model, a.version, a.fallback) for a in attempts] == [
        ("primary", None, False),
        ("backup", "2", True),
    ]


def test_call_flow_raises_the_last_error_when_every_fallback_fails() -> None:
    clock = FakeClock()
    with pytest.raises(ModelNotFoundError):
        drive(
            make_flow([("a", None), ("b", None)], pool_of("a:1"), clock),
            lambda a: ModelNotFoundError("no"),
            clock,
        )


def test_call_flow_raises_deadline_exceeded_instead_of_retrying_forever() -> None:
    clock = FakeClock()
    retry = RetryPolicy(max_attempts=1_000_000, backoff_initial_s=0.05, budget=None)

    def answer(attempt: Attempt) -> Any:
        clock.now += 0.01
        return Unavailable("down")

    flow = make_flow([("m", None)], pool_of("a:1", threshold=1_000_000), clock, retry=retry, timeout_s=1.0)
    with pytest.raises(DeadlineExceeded) as caught:
        drive(flow, answer, clock)
    assert isinstance(caught.value.__cause__, Unavailable)
    assert clock.now <= 1.0 + 1e-9


def test_call_flow_does_not_retry_when_the_deadline_passed_during_the_attempt() -> None:
    clock = FakeClock()
    calls: list[Attempt] = []

    def answer(attempt: Attempt) -> Any:
        calls.append(attempt)
        clock.now += 2.0
        return DeadlineExceeded("slow")

    flow = make_flow([("m", None), ("b", None)], pool_of("a:1", "b:1"), clock, timeout_s=1.0)
    with pytest.raises(DeadlineExceeded):
        drive(flow, answer, clock)
    assert len(calls) == 1


def test_call_flow_retries_an_attempt_timeout_while_the_call_has_time() -> None:
    clock = FakeClock()
    outcomes = iter([DeadlineExceeded("attempt cap"), "ok"])

    def answer(attempt: Attempt) -> Any:
        clock.now += attempt.timeout_s or 0
        return next(outcomes)

    flow = make_flow([("m", None)], pool_of("a:1", "b:1"), clock, deadline=Deadline(10.0, attempt_s=0.5))
    result, attempts = drive(flow, answer, clock)
    assert result == "ok" and [a.timeout_s for a in attempts] == [0.5, 0.5]


def _resumed_flow(
    error: ClientError, *, retry: RetryPolicy | None = None, start: float = 0.0
) -> tuple[Any, EndpointPool, FakeClock]:
    """A flow resumed after a first attempt made outside it (the fast path) that failed with ``error``."""
    clock = FakeClock()
    pool = pool_of("a:1")
    endpoint = pool.acquire(clock())
    assert endpoint is not None
    retry = retry or RetryPolicy(max_attempts=3, budget=None)
    flow = call_flow(
        [("m", None)],
        pool=pool,
        retry=retry,
        budget=BudgetState(retry.budget, clock()),
        deadline=Deadline(total_s=10.0),
        timeout_s=None,
        clock=clock,
        rng=random.Random(0),
        resumed=(start, endpoint, error),
    )
    return flow, pool, clock


def test_call_flow_resumed_after_a_failed_first_attempt_retries_as_its_second() -> None:
    flow, pool, clock = _resumed_flow(Unavailable("down"))
    result, attempts = drive(flow, lambda a: "ok", clock)
    assert result == "ok" and [(a.number, a.retry) for a in attempts] == [(2, True)]
    assert pool.endpoints[0].outstanding == 0 and pool.endpoints[0].consecutive_failures == 0


def test_call_flow_resumed_counts_the_first_attempt_against_max_attempts() -> None:
    flow, pool, clock = _resumed_flow(Unavailable("down"), retry=RetryPolicy(max_attempts=2, budget=None))
    seen: list[Attempt] = []

    def answer(attempt: Attempt) -> Any:
        seen.append(attempt)
        return Unavailable("still down")

    with pytest.raises(Unavailable, match="still down"):
        drive(flow, answer, clock)
    assert len(seen) == 1 and pool.endpoints[0].outstanding == 0


def test_call_flow_resumed_raises_invalid_request_error_without_an_attempt() -> None:
    flow, pool, clock = _resumed_flow(InvalidRequestError("wrong shape"))
    with pytest.raises(InvalidRequestError, match="wrong shape"):
        drive(flow, lambda a: "never", clock)
    assert pool.endpoints[0].outstanding == 0


def test_call_flow_resumed_keeps_the_deadline_of_the_first_attempts_start() -> None:
    flow, _, clock = _resumed_flow(Unavailable("down"), start=-10.0)  # the 10 s deadline is over
    with pytest.raises(DeadlineExceeded):
        drive(flow, lambda a: "too late", clock)


def test_call_flow_raises_all_endpoints_failed_when_every_circuit_is_open() -> None:
    clock = FakeClock()
    pool = pool_of("a:1", threshold=1, reset_s=100.0)
    pool.acquire(0.0)
    pool.release(pool.endpoints[0], 0.0, transport_failure=True)
    with pytest.raises(AllEndpointsFailed):
        drive(make_flow([("m", None)], pool, clock), lambda a: "ok", clock)


# -- misses a server's model cache serves (the flow's Load step) ---------------------------------------


def drive_loads(
    pool: EndpointPool,
    answer: Callable[[Attempt], Any],
    load: Callable[[Load], Any],
    retry: RetryPolicy,
    targets: Sequence[tuple[str, str | None]] = (("m", None),),
) -> tuple[Any, list[str]]:
    """Run a flow that loads misses; returns its result and what happened, in order ("a:1" for an attempt
    at a:1, "load a:1" for a load asked of a:1's cache)."""
    seen: list[str] = []

    def attempt(step: Attempt) -> Any:
        seen.append(step.endpoint.url)
        return answer(step)

    def loading(step: Load) -> Any:
        seen.append(f"load {step.endpoint.url}")
        return load(step)

    clock = FakeClock()
    result, _ = drive(make_flow(targets, pool, clock, retry=retry, load_misses=True), attempt, clock, loading)
    return result, seen


class Caches:
    """Two endpoints' caches, ``a:1`` picked first: a model answers where a load put it, misses elsewhere."""

    def __init__(self) -> None:
        self.pool = pool_of("a:1", "b:1")
        self.pool.endpoints[1].outstanding = 5  # a:1 first
        self.loaded: set[str] = set()

    def answer(self, attempt: Attempt) -> Any:
        return "ok" if attempt.endpoint.url in self.loaded else ModelNotFoundError("unknown model")

    def load(self, step: Load) -> None:
        self.loaded.add(step.endpoint.url)


def test_call_flow_retries_a_miss_at_the_endpoint_whose_cache_loaded_the_model() -> None:
    caches = Caches()
    pool = caches.pool
    # without retries too: the attempt after a load is the miss's own, not the policy's
    result, seen = drive_loads(pool, caches.answer, caches.load, RetryPolicy.none())
    assert result == "ok" and seen == ["a:1", "load a:1", "a:1"]
    assert pool.endpoints[0].outstanding == 0


def test_call_flow_fails_over_when_the_loading_endpoint_is_gone_and_loads_again_there() -> None:
    pool = pool_of("a:1", "b:1", threshold=1, reset_s=100.0)
    pool.endpoints[1].outstanding = 5  # a:1 first
    loaded: list[str] = []

    def answer(attempt: Attempt) -> Any:
        if attempt.endpoint.url not in loaded:
            return ModelNotFoundError("unknown model")
        return Unavailable("gone") if attempt.endpoint.url == "a:1" else "ok"  # a:1 died after its load

    def load(step: Load) -> None:
        loaded.append(step.endpoint.url)

    result, seen = drive_loads(pool, answer, load, RetryPolicy(max_attempts=2, budget=None))
    assert result == "ok" and seen == ["a:1", "load a:1", "a:1", "b:1", "load b:1", "b:1"]


def _loads_until_failure(pool: EndpointPool) -> tuple[ClientError, list[str]]:
    seen: list[str] = []

    def answer(attempt: Attempt) -> Any:
        seen.append(attempt.endpoint.url)
        return ModelNotFoundError("unknown model")

    def load(step: Load) -> None:
        seen.append(f"load {step.endpoint.url}")

    try:
        drive_loads(pool, answer, load, RetryPolicy())
    except ClientError as exc:
        return exc, seen
    raise AssertionError("the flow answered")


def test_call_flow_sends_the_retry_after_a_load_elsewhere_when_the_loader_left_the_pool() -> None:
    caches = Caches()
    pool = caches.pool

    def load(step: Load) -> None:
        caches.load(step)
        if step.endpoint.url == "a:1":
            pool.apply([], ["a:1"], lambda ep: None)  # DNS no longer lists it: draining, never picked

    result, seen = drive_loads(pool, caches.answer, load, RetryPolicy.none())
    assert result == "ok" and seen == ["a:1", "load a:1", "b:1", "load b:1", "b:1"]


def test_call_flow_asks_an_endpoint_that_goes_on_missing_a_bounded_number_of_times() -> None:
    error, seen = _loads_until_failure(pool_of("a:1"))
    assert isinstance(error, ModelNotFoundError)
    assert seen == ["a:1", "load a:1"] * LOADS_PER_ENDPOINT + ["a:1"]  # each load, then its retry


def test_call_flow_raises_the_miss_when_the_endpoint_runs_no_cache() -> None:
    pool = pool_of("a:1", "b:1")
    miss = ModelNotFoundError("unknown model")
    with pytest.raises(ModelNotFoundError) as raised:
        drive_loads(pool, lambda a: miss, lambda step: step.miss, RetryPolicy())
    assert raised.value is miss


def test_call_flow_loads_a_miss_before_falling_back_and_falls_back_when_the_cache_cant_load_it() -> None:
    def answer(attempt: Attempt) -> Any:
        return f"from {attempt.model}" if attempt.model in loaded else ModelNotFoundError("unknown model")

    loaded: set[str] = set()
    result, seen = drive_loads(
        pool_of("a:1"), answer, lambda step: loaded.add(step.model), RetryPolicy(), [("m", None), ("f", None)]
    )
    assert result == "from m" and seen == ["a:1", "load a:1", "a:1"]

    def refuse(step: Load) -> Any:
        if step.model == "m":
            return ModelNotFoundError("the cache could not load it: in none of the server's repositories")
        loaded.add(step.model)
        return None

    loaded.clear()
    result, seen = drive_loads(pool_of("a:1"), answer, refuse, RetryPolicy(), [("m", None), ("f", None)])
    assert result == "from f" and seen == ["a:1", "load a:1", "a:1", "load a:1", "a:1"]


def test_call_flow_fails_over_when_the_endpoint_goes_away_during_the_load() -> None:
    pool = pool_of("a:1", "b:1")
    pool.endpoints[1].outstanding = 5

    def answer(attempt: Attempt) -> Any:
        return "ok" if attempt.endpoint.url == "b:1" else ModelNotFoundError("unknown model")

    def load(step: Load) -> Any:
        return Unavailable("connection refused")

    result, seen = drive_loads(pool, answer, load, RetryPolicy(max_attempts=2, budget=None))
    assert result == "ok" and seen == ["a:1", "load a:1", "b:1"]


def test_retry_budget_allows_about_its_ratio_of_retries() -> None:
    clock = FakeClock()
    retry = RetryPolicy(
        max_attempts=5,
        backoff_initial_s=0.0,
        budget=RetryBudget(ratio=0.1, min_retries_per_s=0.0, max_tokens=10.0),
    )
    budget = BudgetState(retry.budget, 0.0)
    pool = pool_of("a:1", threshold=1_000_000)
    sent = 0

    def answer(attempt: Attempt) -> Any:
        nonlocal sent
        sent += 1
        return Unavailable("down")

    for _ in range(1_000):
        with pytest.raises(Unavailable):
            drive(make_flow([("m", None)], pool, clock, retry=retry, budget=budget), answer, clock)
    assert 1_000 < sent <= 1_000 + 10 + 100  # the initial tokens + 10% of the calls, not 5,000
