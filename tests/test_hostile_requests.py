"""Hostile requests through the real server: a request's own fault never takes an endpoint out, what the
client sends is bounded and exact, and an empty batch gets a clear answer.

- a 20,000-character model name or request id is refused before sending, and the next valid call works;
- an answer over gRPC's metadata limit (a model's error echoing a long input) is the request's fault: never
  retried, never counted against the endpoint's circuit breaker, on both faces;
- BYTES inputs take bytes, ``np.bytes_``, bytearray and str and nothing else, and arrive byte for byte;
- model names with NUL, control characters or ``/`` never reach the server;
- ``infer_batched`` on 0 rows answers empty outputs of the model's shapes and dtypes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import client_fixtures as cf
import tiny_models
from tiny_models import spec as _spec
from tritonforge.client import CircuitBreaker, RetryPolicy
from tritonforge.config import DataType, ModelConfig
from tritonforge.errors import ClientError, InvalidRequestError
from tritonforge.server import EmbeddedServer

X = np.random.default_rng(0).random((2, 8), dtype=np.float32)
LONG = 20_000

# A Python model whose error message is its input: a long input makes an answer over gRPC's 16 KiB
# metadata limit (the error travels in the call's trailers).
SHOUT_PY = textwrap.dedent("""
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for request in requests:
                s = pb_utils.get_input_tensor_by_name(request, "s").as_numpy()
                text = b"".join(s.reshape(-1).tolist()).decode(errors="replace")
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError("refused: " + text)))
            return out
""")

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    root = tmp_path_factory.mktemp("hostile_requests")
    repo = cf.build_client_repository(root)
    shout = ModelConfig(
        name="shout",
        backend="python",
        max_batch_size=8,
        inputs=(_spec("s", DataType.STRING, (1,)),),
        outputs=(_spec("out", DataType.STRING, (1,)),),
    )
    tiny_models.python_model(repo, root / "_src", shout, SHOUT_PY)
    with EmbeddedServer(repo) as server:
        yield server


@pytest.fixture(params=cf.FACES)
def client(request: pytest.FixtureRequest, served: EmbeddedServer) -> Iterator[Any]:
    # one failure would open the circuit: a request fault counted against the endpoint shows at once
    with cf.make_client(
        request.param, served.grpc_url, breaker=CircuitBreaker(failure_threshold=1, reset_timeout_s=60)
    ) as c:
        yield c


def _closed(client: Any) -> None:
    (status,) = client.endpoints
    assert status.state == "closed" and status.consecutive_failures == 0, status


def test_client_refuses_a_20000_character_model_name_before_sending_and_the_next_call_works(
    client: Any,
) -> None:
    with pytest.raises(InvalidRequestError, match=r"\(20000 characters\) is 20000 bytes long; the limit"):
        client.infer("x" * LONG, {"x": X})
    _closed(client)
    assert client.infer("mlp", {"x": X})["probs"].shape == (2, 3)


def test_client_refuses_a_20000_character_request_id_before_sending_and_the_next_call_works(
    client: Any,
) -> None:
    with pytest.raises(InvalidRequestError, match=r"request_id .* the limit is 1024 bytes"):
        client.infer("mlp", {"x": X}, request_id="r" * LONG)
    _closed(client)
    assert client.infer("mlp", {"x": X}, request_id="r" * 1024)["probs"].shape == (2, 3)


def test_an_answer_over_grpcs_metadata_limit_is_the_requests_fault_never_the_endpoints(client: Any) -> None:
    long_text = np.array([[b"y" * LONG]], dtype=object)
    for _ in range(3):  # the breaker opens after one transport failure: none is counted
        with pytest.raises(InvalidRequestError, match="metadata is over gRPC's limit") as caught:
            client.infer("shout", {"s": long_text})
        assert caught.value.endpoint == client.urls[0]
    _closed(client)
    with pytest.raises(ClientError, match="refused: short"):  # the model's own error, small: as it is
        client.infer("shout", {"s": np.array([[b"short"]], dtype=object)})
    assert client.infer("mlp", {"x": X})["probs"].shape == (2, 3)


def test_a_request_over_the_metadata_limit_is_not_retried(served: EmbeddedServer) -> None:
    with cf.make_client("sync", served.grpc_url, retry=RetryPolicy(max_attempts=5)) as c:
        events: list[Any] = []
        c.add_hook(events.append)
        with pytest.raises(InvalidRequestError):
            c.infer("shout", {"s": np.array([[b"z" * LONG]], dtype=object)})
        assert [e.kind for e in events] == ["request"] and events[0].attempt == 1


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({"x-a": "v\n"}, "its value must be printable ASCII"),
        ({"x-a": "\u00e9"}, "its value must be printable ASCII"),
        ({"X A": "v"}, "header name 'X A' can't be sent"),
        ({"grpc-timeout": "1"}, "reserves 'grpc-' names"),
        ({"x-big": "a" * 9000}, "over gRPC's metadata limit of 8192"),
    ],
)
def test_client_refuses_headers_grpc_would_refuse_on_every_call(
    served: EmbeddedServer, headers: dict[str, str], says: str
) -> None:
    # before: every call failed with InferenceFailed "INTERNAL: Invalid metadata" (a fallback answered
    # it as if the model had failed), or RESOURCE_EXHAUSTED at random between 8 and 16 KiB
    for face in cf.FACES:
        with pytest.raises(ValueError, match=says):
            cf.make_client(face, served.grpc_url, headers=headers)


def test_client_sends_headers_within_the_limit(served: EmbeddedServer) -> None:
    for face in cf.FACES:
        with cf.make_client(face, served.grpc_url, headers={"X-Trace": "t" * 4000}) as c:
            assert c.infer("mlp", {"x": X})["probs"].shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("mlp\x00zz", "unprintable character U\\+0000"),
        ("ml\np", "unprintable character U\\+000A"),
        ("ml\u202ep", "unprintable character U\\+202E"),
        ("ml\ud800p", "unprintable character U\\+D800"),
        ("../mlp", "not a folder name"),
        ("", "non-empty string"),
    ],
)
def test_client_refuses_a_model_name_that_would_reach_another_model(
    client: Any, name: str, says: str
) -> None:
    for call in (
        lambda: client.infer(name, {"x": X}),
        lambda: client.model_metadata(name),
        lambda: client.model_config(name),
        lambda: client.is_model_ready(name),
        lambda: client.unload_model(name),
    ):
        with pytest.raises(InvalidRequestError, match=says):
            call()
    _closed(client)


@pytest.mark.parametrize(
    "element",
    [b"xy", np.bytes_(b"xy"), bytearray(b"xy"), "xy", np.str_("xy")],
    ids=["bytes", "np.bytes_", "bytearray", "str", "np.str_"],
)
def test_bytes_input_elements_arrive_byte_for_byte(client: Any, element: Any) -> None:
    s = np.empty((1, 1), dtype=object)
    s[0, 0] = element
    assert client.infer("echo_str", {"s": s})["out"].tolist() == [[b"xy"]]


def test_bytes_input_arrays_of_fixed_width_bytes_and_str_arrive_as_given(client: Any) -> None:
    got = client.infer("echo_str", {"s": np.array([[b"ab"], [b"\x00c"]])})["out"]
    assert got.tolist() == [[b"ab"], [b"\x00c"]]
    assert client.infer("echo_str", {"s": np.array([["é"], ["z"]])})["out"].tolist() == [
        [b"\xc3\xa9"],
        [b"z"],
    ]


@pytest.mark.parametrize(
    ("element", "kind"),
    [(5, "int"), (1.5, "float"), (None, "NoneType"), (memoryview(b"xy"), "memoryview"), (["a"], "list")],
)
def test_bytes_input_refuses_other_elements_by_type_and_position(
    client: Any, element: Any, kind: str
) -> None:
    s = np.array([[b"a"], [b"b"]], dtype=object)
    s[1, 0] = element
    with pytest.raises(InvalidRequestError, match=rf"input 's' .* BYTES element \[1, 0\] is {kind} "):
        client.infer("echo_str", {"s": s})
    _closed(client)


def test_infer_batched_on_0_rows_answers_empty_outputs_of_the_models_shapes(client: Any) -> None:
    out = client.infer_batched("mlp", {"x": np.zeros((0, 8), np.float32)}, batch_size=4)
    assert list(out) == ["probs"] and out["probs"].shape == (0, 3) and out["probs"].dtype == np.float32
    strings = client.infer_batched("echo_str", {"s": np.zeros((0, 1), dtype=object)}, batch_size=4)
    assert strings["out"].shape == (0, 1) and strings["out"].dtype == object
    named = client.infer_batched("dtypes", _empty_dtypes_inputs(client), batch_size=4, outputs=["long_out"])
    assert list(named) == ["long_out"] and named["long_out"].dtype == np.int64 and len(named["long_out"]) == 0


def _empty_dtypes_inputs(client: Any) -> dict[str, np.ndarray]:
    meta = client.model_metadata("dtypes")
    from tritonforge.client._codec import numpy_dtype

    return {t.name: np.zeros((0, *t.shape[1:]), numpy_dtype(t.datatype)) for t in meta.inputs}


def test_infer_batched_on_0_rows_still_checks_the_inputs_and_outputs(client: Any) -> None:
    with pytest.raises(InvalidRequestError, match="input 'x' is FP64 but must be FP32"):
        client.infer_batched("mlp", {"x": np.zeros((0, 8), np.float64)}, batch_size=4)
    with pytest.raises(InvalidRequestError, match=r"model 'mlp' has no output \['nope'\]"):
        client.infer_batched("mlp", {"x": np.zeros((0, 8), np.float32)}, batch_size=4, outputs=["nope"])
    with pytest.raises(InvalidRequestError, match="has shape \\[0, 7\\]"):
        client.infer_batched("mlp", {"x": np.zeros((0, 7), np.float32)}, batch_size=4)


# -- property-based: any name, id or BYTES element gets our error or an answer -----------------------------

HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, categories=None), max_size=8),
    st.sampled_from(["mlp", "mlp\x00", "mlp/1", "..", "m" * 255, "m" * 256, "é" * 128, "é" * 127]),
    st.integers(0, 3).map(lambda n: "x" * (10 ** (n + 2))),
)


@PROPERTY
@given(
    name=HOSTILE_TEXT,
    request_id=st.one_of(st.none(), HOSTILE_TEXT),
    version=st.one_of(st.none(), st.integers(-2, 3), HOSTILE_TEXT),
)
def test_any_model_name_request_id_or_version_gets_our_error_or_an_answer(
    client: Any, name: str, request_id: str | None, version: Any
) -> None:
    try:
        out = client.infer(name, {"x": X}, request_id=request_id, version=version)
    except ClientError:
        pass
    else:
        assert name == "mlp" and out["probs"].shape == (2, 3)
    _closed(client)


ELEMENTS = st.one_of(
    st.binary(max_size=6),
    st.text(max_size=6),
    st.binary(max_size=6).map(np.bytes_),
    st.integers(),
    st.floats(),
    st.none(),
    st.booleans(),
)


@PROPERTY
@given(elements=st.lists(ELEMENTS, min_size=1, max_size=4))
def test_any_bytes_elements_arrive_exactly_or_get_our_error(client: Any, elements: list[Any]) -> None:
    s = np.empty((len(elements), 1), dtype=object)
    for i, e in enumerate(elements):
        s[i, 0] = e
    try:
        out = client.infer("echo_str", {"s": s})
    except InvalidRequestError as exc:
        assert not all(isinstance(e, (bytes, str)) for e in elements), exc
        return
    want = [[e.encode() if isinstance(e, str) else bytes(e)] for e in elements]
    assert out["out"].tolist() == want


@PROPERTY
@given(
    headers=st.dictionaries(
        st.one_of(st.text(max_size=6), st.sampled_from(["x-a", "X-Trace", "grpc-x", "a-bin"])),
        st.one_of(st.text(max_size=8), st.sampled_from(["v", "a" * 9000]), st.integers()),
        max_size=2,
    )
)
def test_any_headers_make_a_client_that_answers_or_are_refused_when_it_is_made(
    served: EmbeddedServer, headers: dict[Any, Any]
) -> None:
    for face in cf.FACES:
        try:
            c = cf.make_client(face, served.grpc_url, headers=headers)
        except (ValueError, TypeError) as exc:
            assert "\n" not in str(exc)
            continue
        with c:
            assert c.infer("mlp", {"x": X})["probs"].shape == (2, 3)


def test_load_tests_tritonclient_sender_sends_bytes_elements_byte_for_byte(served: EmbeddedServer) -> None:
    # tritonclient's own serializer would send np.bytes_(b"xy") as b"b'xy'"
    from tritonclient.grpc import InferenceServerClient

    from tritonforge.loadtest.target import _infer_inputs

    s = np.empty((3, 1), dtype=object)
    s[0, 0], s[1, 0], s[2, 0] = np.bytes_(b"xy"), b"\x00z", "é"
    raw = InferenceServerClient(served.grpc_url)
    try:
        got = raw.infer("echo_str", _infer_inputs({"s": s})).as_numpy("out")
    finally:
        raw.close()
    assert got.tolist() == [[b"xy"], [b"\x00z"], ["é".encode()]]
    bad = np.array([[1]], dtype=object)
    with pytest.raises(InvalidRequestError, match=r"BYTES element \[0, 0\] is int"):
        _infer_inputs({"s": bad})
