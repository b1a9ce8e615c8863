"""Property-based tests of the client's input checks (hypothesis, bounded and deterministic): whatever a
caller passes to ``infer`` — any mapping or none, any names, any arrays or Python values, NaN and ±inf, any
outputs and timeouts — the answer is our own error or the correct result, on both faces, through the real
server. Never a raw TypeError / AttributeError, never a hang."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import client_fixtures as cf
from conftest import triton_infer
from tritonforge.client import RetryPolicy
from tritonforge.errors import ClientError, InvalidRequestError
from tritonforge.server import EmbeddedServer

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,  # the same examples on every run: a CI failure reproduces
    database=None,  # nothing written next to the tests
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = st.sampled_from(
    [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_, np.complex64, "U3", "S3"]
)
ARRAYS = hnp.arrays(
    DTYPES,
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9),
    elements=None,
)
GOOD_X = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.just(8)),
    elements=st.floats(-10, 10, allow_nan=False, width=32),
)
NAN_X = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.just(8)),
    elements=st.floats(allow_nan=True, allow_infinity=True, width=32),
)
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4), st.binary(max_size=4)
)
PYTHON_VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4), max_leaves=12)
VALUES = st.one_of(
    ARRAYS, GOOD_X, NAN_X, PYTHON_VALUES, st.dictionaries(st.text(max_size=2), LEAVES, max_size=2)
)
NAMES = st.one_of(
    st.just("x"), st.just("x"), st.text(max_size=3), st.integers(), st.none(), st.binary(max_size=2)
)
INPUTS = st.one_of(
    st.dictionaries(NAMES, VALUES, max_size=3),
    st.lists(st.tuples(NAMES, VALUES), max_size=2),
    PYTHON_VALUES,
)
OUTPUTS = st.one_of(
    st.none(),
    st.just(["probs"]),
    st.lists(st.text(max_size=3), max_size=2),
    st.text(max_size=3),
    st.integers(),
)
TIMEOUTS = st.one_of(st.none(), st.just(10.0), st.floats(), st.integers(-2, 2), st.text(max_size=2))


@pytest.fixture(scope="module", params=cf.FACES)
def client(request: pytest.FixtureRequest, server: EmbeddedServer) -> Iterator[Any]:
    with cf.make_client(request.param, server.grpc_url, deadline=10.0, retry=RetryPolicy.none()) as c:
        yield c


@pytest.fixture(scope="module")
def reference(server: EmbeddedServer) -> Any:
    import tritonclient.grpc as grpcclient

    raw = grpcclient.InferenceServerClient(server.grpc_url)
    yield lambda x: triton_infer(raw, "mlp", {"x": x})["probs"]
    raw.close()


def _valid_inputs(inputs: Any, outputs: Any) -> bool:
    """What the mlp model takes: x, float32 [1..32, 8], finite; all outputs or just probs."""
    if not (isinstance(inputs, dict) and list(inputs) == ["x"]):
        return False
    x = inputs["x"]
    return (
        isinstance(x, np.ndarray)
        and x.dtype == np.float32
        and x.ndim == 2
        and x.shape[1] == 8
        and 1 <= x.shape[0] <= 32
        and bool(np.isfinite(x).all())
        and outputs in (None, ["probs"])
    )


def _timeout(timeout_s: Any, at_least: float) -> bool:
    return timeout_s is None or (
        type(timeout_s) in (int, float) and np.isfinite(timeout_s) and timeout_s >= at_least
    )


@PROPERTY
@given(inputs=INPUTS, outputs=OUTPUTS, timeout_s=TIMEOUTS)
def test_client_infer_gives_our_error_or_the_right_answer_for_any_input(
    client: Any, reference: Any, inputs: Any, outputs: Any, timeout_s: Any
) -> None:
    try:
        out = client.infer("mlp", inputs, outputs=outputs, timeout_s=timeout_s)
    except ClientError:
        # a good call with a real deadline must not fail (a sub-second one may time out: allowed)
        assert not (_valid_inputs(inputs, outputs) and _timeout(timeout_s, at_least=1.0))
        return
    assert _valid_inputs(inputs, outputs) and _timeout(timeout_s, at_least=1e-300)
    np.testing.assert_array_equal(out["probs"], reference(inputs["x"]))


@PROPERTY
@given(x=NAN_X)
def test_client_refuses_non_finite_inputs_naming_exactly_the_bad_rows(client: Any, x: np.ndarray) -> None:
    bad = [i for i in range(len(x)) if not np.isfinite(x[i]).all()]
    if not bad:
        assert client.infer("mlp", {"x": x})["probs"].shape == (len(x), 3)
        return
    with pytest.raises(InvalidRequestError) as caught:
        client.infer("mlp", {"x": x})
    assert f"rows [{', '.join(map(str, bad))}]" in caught.value.message
    assert "'x'" in caught.value.message and caught.value.model == "mlp"


@PROPERTY
@given(requests=st.one_of(st.lists(st.dictionaries(NAMES, VALUES, max_size=2), max_size=3), PYTHON_VALUES))
def test_client_infer_many_gives_our_error_or_answers_for_any_requests(client: Any, requests: Any) -> None:
    try:
        outs = client.infer_many("mlp", requests)
    except ClientError:
        return
    assert isinstance(requests, list) and len(outs) == len(requests)


@PROPERTY
@given(inputs=INPUTS, batch_size=st.one_of(st.integers(-1, 40), st.none(), st.floats(0, 5)))
def test_client_infer_batched_gives_our_error_or_answers_for_any_input(
    client: Any, reference: Any, inputs: Any, batch_size: Any
) -> None:
    try:
        out = client.infer_batched("mlp", inputs, batch_size=batch_size)
    except (ClientError, ValueError):  # ValueError: a batch_size that is not an int >= 1 (a bad argument)
        return
    assert _valid_inputs(inputs, None) and isinstance(batch_size, int)
    np.testing.assert_array_equal(out["probs"], reference(inputs["x"]))


def test_client_infer_with_a_list_of_pairs_names_the_fix(client: Any) -> None:
    x = np.zeros((1, 8), np.float32)
    with pytest.raises(InvalidRequestError, match=r"must be a mapping \{input name: array\}, not list"):
        client.infer("mlp", [("x", x)])
