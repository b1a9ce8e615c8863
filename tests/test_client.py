"""Client and AsyncClient against real embedded Triton servers: inference, dtypes, checks, control calls,
errors, shared memory, metrics, hooks and headers. Each test runs against both faces (``face``: the sync
Client, and the AsyncClient driven through blocking calls)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

import client_fixtures as cf
from tritonforge import (
    AsyncClient,
    AuthenticationError,
    Client,
    ClientError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequestError,
    ModelNotFoundError,
    RetryPolicy,
    SharedMemory,
    TLSConfig,
    Unavailable,
)
from tritonforge.client import ClientEvent, map_grpc_errors
from tritonforge.client.shm import cuda_available
from tritonforge.server import EmbeddedServer

X = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def client_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cf.build_client_repository(tmp_path_factory.mktemp("client_models"))


@pytest.fixture(scope="module")
def pair(client_repo: Path) -> Iterator[list[EmbeddedServer]]:
    with cf.servers(client_repo, 2, model_control="explicit", load_models=["*"]) as running:
        yield running


@pytest.fixture(scope="module")
def urls(pair: list[EmbeddedServer]) -> list[str]:
    return [s.grpc_url for s in pair]


@pytest.fixture(params=cf.FACES)
def face(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture()
def client(face: str, urls: list[str]) -> Iterator[Any]:
    with cf.make_client(face, urls) as c:
        yield c


def raw_infer(
    url: str, model: str, inputs: dict[str, np.ndarray], version: str = ""
) -> dict[str, np.ndarray]:
    """The same request through raw tritonclient, as the reference answer."""
    from conftest import triton_infer

    raw = grpcclient.InferenceServerClient(url)
    try:
        return triton_infer(raw, model, inputs, model_version=version)
    finally:
        raw.close()


# -- inference ----------------------------------------------------------------------------------------


def test_client_infer_returns_what_raw_tritonclient_returns(client: Any, urls: list[str]) -> None:
    out = client.infer("mlp", {"x": X})
    np.testing.assert_array_equal(out["probs"], raw_infer(urls[0], "mlp", {"x": X})["probs"])


def test_client_infer_round_trips_numeric_dtypes(client: Any) -> None:
    inputs = {
        "half": np.full((2, 4), 1.5, np.float16),
        "long": np.arange(8, dtype=np.int64).reshape(2, 4),
        "int": np.arange(8, dtype=np.int32).reshape(2, 4),
        "flag": np.array([[True, False] * 2] * 2),
    }
    out = client.infer("dtypes", inputs)
    assert out["half_out"].dtype == np.float16 and out["long_out"].dtype == np.int64
    np.testing.assert_array_equal(out["half_out"], inputs["half"] * 2)
    np.testing.assert_array_equal(out["long_out"], inputs["long"] + 1)
    np.testing.assert_array_equal(out["int_out"], inputs["int"] * 3)
    np.testing.assert_array_equal(out["flag_out"], ~inputs["flag"])


def test_client_infer_round_trips_strings(client: Any) -> None:
    words = np.array([[b"hello"], ["wörld".encode()], [b""]], dtype=object)
    np.testing.assert_array_equal(client.infer("echo_str", {"s": words})["out"], words)
    assert client.infer("echo_str", {"s": np.array([["text"]])})["out"][0, 0] == b"text"


def test_client_infer_chooses_the_version_asked_for(client: Any) -> None:
    x = np.ones((1, 4), np.float32)
    assert client.infer("scale", {"x": x}, version=1)["y"][0, 0] == 1.0
    assert client.infer("scale", {"x": x}, version="2")["y"][0, 0] == 2.0


def test_client_infer_returns_only_the_outputs_asked_for(client: Any) -> None:
    inputs = {
        "half": np.ones((1, 4), np.float16),
        "long": np.ones((1, 4), np.int64),
        "int": np.ones((1, 4), np.int32),
        "flag": np.ones((1, 4), bool),
    }
    assert set(client.infer("dtypes", inputs, outputs=["int_out"])) == {"int_out"}


def test_client_infer_many_keeps_the_order_of_requests(client: Any) -> None:
    xs = [np.full((1, 4), i, np.float32) for i in range(40)]
    outs = client.infer_many("scale", [{"x": x} for x in xs], version=2, concurrency=8)
    assert [float(o["y"][0, 0]) for o in outs] == [2.0 * i for i in range(40)]


def test_client_infer_batched_splits_and_joins_along_the_batch_axis(client: Any) -> None:
    x = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)
    np.testing.assert_array_equal(
        client.infer_batched("scale", {"x": x}, batch_size=16, version=2)["y"], x * 2
    )


# -- checks against the model's metadata ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "says"),
    [
        ({"y": X}, "unknown input 'y'"),
        ({"x": X.astype(np.float64)}, "is FP64 but must be FP32"),
        ({"x": X[:, :7]}, "has shape [4, 7]"),
        ({"x": X[0]}, "has shape [8]"),
    ],
)
def test_client_infer_raises_invalid_request_error_when_an_input_does_not_fit(
    client: Any, inputs: dict[str, np.ndarray], says: str
) -> None:
    with pytest.raises(InvalidRequestError, match=r"model 'mlp'.*" + says.replace("[", r"\[")) as caught:
        client.infer("mlp", inputs)
    assert caught.value.model == "mlp"


def test_client_infer_raises_invalid_request_error_when_no_inputs_given(client: Any) -> None:
    with pytest.raises(InvalidRequestError):
        client.infer("mlp", {})


def test_client_without_validation_gets_the_servers_invalid_request_error(face: str, urls: list[str]) -> None:
    with (
        cf.make_client(face, urls, validate=False) as c,
        pytest.raises(InvalidRequestError, match="FP64") as caught,
    ):
        c.infer("mlp", {"x": X.astype(np.float64)})
    assert caught.value.endpoint in urls


@pytest.mark.parametrize(
    ("inputs", "says"),
    [
        ([("x", X)], "must be a mapping"),
        ((("x", X),), "must be a mapping"),
        ("x", "must be a mapping"),
        (None, "must be a mapping"),
        ({1: X}, "an input name of model .* is a non-empty string"),
        ({"x": [[1.0, 2.0], [3.0]]}, "'x'"),
        ({"x": X.astype(np.complex64)}, "input 'x' .* complex64 has no Triton data type"),
        (
            {"x": np.array([{"a": 1}], dtype=object)},
            "input 'x' .* is dict .* BYTES inputs take bytes, numpy.bytes_, bytearray or str",
        ),
    ],
)
def test_client_infer_raises_invalid_request_error_for_inputs_of_the_wrong_kind(
    client: Any, inputs: Any, says: str
) -> None:
    with pytest.raises(InvalidRequestError, match=says):
        client.infer("mlp", inputs)


def test_client_infer_raises_invalid_request_error_naming_input_and_rows_with_nan_or_inf(client: Any) -> None:
    x = X.copy()
    x[1, 3], x[3, 0] = np.nan, -np.inf
    with pytest.raises(
        InvalidRequestError, match=r"input 'x' of model 'mlp' has NaN or ±inf in rows \[1, 3\]"
    ):
        client.infer("mlp", {"x": x})
    assert client.endpoints[0].state == "closed"


@pytest.mark.parametrize("allow", [True, {"x"}, {"mlp/x"}, "x"])
def test_client_sends_nan_and_inf_when_the_policy_allows_them(face: str, urls: list[str], allow: Any) -> None:
    x = X.copy()
    x[2] = np.nan
    with cf.make_client(face, urls, allow_non_finite=allow) as c:
        out = c.infer("mlp", {"x": x})
    assert np.isnan(out["probs"][2]).all() and np.isfinite(out["probs"][[0, 1, 3]]).all()


def test_client_non_finite_policy_for_another_model_does_not_allow_them_here(
    face: str, urls: list[str]
) -> None:
    with (
        cf.make_client(face, urls, allow_non_finite={"other/x"}) as c,
        pytest.raises(InvalidRequestError, match="rows \\[0\\]"),
    ):
        c.infer("mlp", {"x": np.full((1, 8), np.inf, np.float32)})


def test_client_keeps_an_endpoint_healthy_through_requests_that_are_wrong(face: str, urls: list[str]) -> None:
    with cf.make_client(face, urls[0], validate=False) as c:
        for _ in range(6):  # twice the breaker's threshold, each one refused by the server
            with pytest.raises(InvalidRequestError):
                c.infer("mlp", {"x": X.astype(np.float64)})
        (status,) = c.endpoints
        assert (status.state, status.consecutive_failures) == ("closed", 0)
        assert c.infer("mlp", {"x": X})["probs"].shape == (4, 3)


# -- errors ---------------------------------------------------------------------------------------------


def test_client_infer_raises_model_not_found_error_naming_model_and_endpoint(
    client: Any, urls: list[str]
) -> None:
    with pytest.raises(ModelNotFoundError, match="'nope'") as caught:
        client.infer("nope", {"x": X})
    assert caught.value.model == "nope" and caught.value.endpoint in urls


def test_client_infer_raises_inference_failed_when_the_model_fails_on_the_server(client: Any) -> None:
    with pytest.raises(InferenceFailed, match="Gather") as caught:
        client.infer("broken", {"x": X})
    assert caught.value.model == "broken"


def test_client_infer_raises_model_not_found_error_for_a_version_not_served(client: Any) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        client.infer("scale", {"x": np.ones((1, 4), np.float32)}, version=7)
    assert caught.value.version == "7"


def test_client_infer_raises_unavailable_when_no_server_listens(face: str) -> None:
    from tritonforge.server.embedded import free_port

    with (
        cf.make_client(face, f"127.0.0.1:{free_port()}", retry=RetryPolicy.none()) as c,
        pytest.raises(Unavailable) as caught,
    ):
        c.infer("mlp", {"x": X}, timeout_s=5.0)
    assert caught.value.endpoint is not None


def test_map_grpc_errors_translates_tritonclient_errors() -> None:
    with (
        pytest.raises(Unavailable, match="'m' version 3 at h:1") as caught,
        map_grpc_errors(model="m", version="3", endpoint="h:1"),
    ):
        raise InferenceServerException("overloaded", status="StatusCode.UNAVAILABLE")
    assert isinstance(caught.value.__cause__, InferenceServerException)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.infer("mlp", {"x": X}),
        lambda c: c.infer_many("mlp", [{"x": X}]),
        lambda c: c.model_metadata("mlp"),
        lambda c: c.model_config("mlp"),
        lambda c: c.model_statistics(),
        lambda c: c.server_metadata(),
        lambda c: c.repository_index(),
        lambda c: c.endpoint_health(),
        lambda c: c.capabilities(),
        lambda c: c.load_model("mlp"),
        lambda c: c.unload_model("mlp"),
        lambda c: c.is_server_ready(),
    ],
)
def test_client_raises_client_error_on_every_call_after_close(face: str, urls: list[str], call: Any) -> None:
    c = cf.make_client(face, urls)
    c.close()
    with pytest.raises(ClientError, match="closed"):
        call(c)


# -- health, metadata, config, statistics, model control -----------------------------------------------


def test_client_reports_health_metadata_config_and_statistics(client: Any, urls: list[str]) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.endpoint_health() == {u: True for u in urls}
    assert client.is_model_ready("mlp") and not client.is_model_ready("nope")
    meta = client.model_metadata("mlp")
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("x", "FP32", (-1, 8))]
    assert client.model_config("mlp").max_batch_size == 32
    assert client.server_metadata()["name"] == "triton"
    client.infer("mlp", {"x": X})
    stats = client.model_statistics("mlp")["model_stats"]
    assert stats[0]["name"] == "mlp"
    assert {m["name"] for m in client.repository_index()} >= {"mlp", "scale", "broken"}


def test_client_reports_every_capability_of_triton(client: Any, urls: list[str]) -> None:
    caps = client.capabilities()
    assert set(caps) == set(urls)
    assert all(c.model_config and c.statistics and c.shared_memory and c.streaming for c in caps.values())
    assert client.model_metadata("scale").versions == ("1", "2")
    assert client.is_model_ready("scale", 2)


@pytest.mark.timeout(120)
def test_client_load_model_gives_up_on_a_hung_server_after_its_timeout(
    face: str, urls: list[str], pair: list[EmbeddedServer]
) -> None:
    with socket.socket() as hung:  # accepts connections, never answers one
        hung.bind(("127.0.0.1", 0))
        hung.listen()
        hung_url = f"127.0.0.1:{hung.getsockname()[1]}"
        with cf.make_client(face, [hung_url, urls[0]]) as c:
            with pytest.raises(DeadlineExceeded) as caught:
                c.load_model("echo_str", timeout_s=5.0)
            assert caught.value.endpoint == hung_url  # the first endpoint's error
            with pytest.raises(DeadlineExceeded):
                c.unload_model("nope_never_loaded", timeout_s=1.0)
    deadline = time.monotonic() + 60
    while not pair[0].is_model_ready("echo_str") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pair[0].is_model_ready("echo_str")  # the live endpoint was asked too, at the same time


def test_client_unload_and_load_model_act_on_every_endpoint(client: Any, pair: list[EmbeddedServer]) -> None:
    client.unload_model("echo_str")
    try:
        assert not any(s.is_model_ready("echo_str") for s in pair)
        with pytest.raises(ModelNotFoundError):
            client.infer("echo_str", {"s": np.array([[b"a"]], dtype=object)})
    finally:
        client.load_model("echo_str")
    assert all(s.is_model_ready("echo_str") for s in pair)
    assert client.infer("echo_str", {"s": np.array([[b"a"]], dtype=object)})["out"][0, 0] == b"a"


# -- shared memory --------------------------------------------------------------------------------------


def _server_regions(url: str) -> list[str]:
    raw = grpcclient.InferenceServerClient(url)
    try:
        return [
            r["name"] for r in raw.get_system_shared_memory_status(as_json=True).get("regions", {}).values()
        ]
    finally:
        raw.close()


def test_client_sends_large_tensors_through_system_shared_memory_and_removes_it_on_close(
    face: str, urls: list[str]
) -> None:
    big = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float32)
    c = cf.make_client(face, urls, shared_memory=SharedMemory("auto", threshold_bytes=512))
    try:
        small = c.infer("mlp", {"x": X})
        assert c.shm_regions == []  # under the threshold: in the message
        out = c.infer_many("mlp", [{"x": big}] * 6, concurrency=3)
        regions = c.shm_regions
        assert regions and cf.leftover_shm(regions[0])
        assert set(regions) & set(_server_regions(urls[0]) + _server_regions(urls[1]))
    finally:
        c.close()
    reference = raw_infer(urls[0], "mlp", {"x": big})["probs"]
    assert all(np.array_equal(o["probs"], reference) for o in out)
    np.testing.assert_array_equal(small["probs"], raw_infer(urls[0], "mlp", {"x": X})["probs"])
    assert [r for r in regions if cf.leftover_shm(r)] == []
    assert set(regions) & set(_server_regions(urls[0]) + _server_regions(urls[1])) == set()


def test_client_shared_memory_regions_are_gone_after_close(face: str, urls: list[str]) -> None:
    big = np.arange(16 * 4, dtype=np.float32).reshape(16, 4)
    with cf.make_client(face, urls, shared_memory="system") as c:
        out = c.infer("scale", {"x": big}, version=2)
        regions = c.shm_regions
    np.testing.assert_array_equal(out["y"], big * 2)
    assert regions and [r for r in regions if cf.leftover_shm(r)] == []
    assert set(regions) & set(_server_regions(urls[0]) + _server_regions(urls[1])) == set()


@pytest.mark.skipif(not cuda_available(), reason="needs a GPU and the CUDA packages (cuda-python)")
def test_client_sends_tensors_through_cuda_shared_memory(urls: list[str]) -> None:  # pragma: no cover
    big = np.ones((32, 8), np.float32)
    with Client(
        urls, shared_memory=SharedMemory("cuda", threshold_bytes=0), registry=CollectorRegistry()
    ) as c:
        out = c.infer("mlp", {"x": big})
        assert c.shm_regions
    np.testing.assert_array_equal(out["probs"], raw_infer(urls[0], "mlp", {"x": big})["probs"])


# -- metrics and hooks ----------------------------------------------------------------------------------


def test_async_client_on_one_endpoint_frees_it_when_a_call_is_cancelled_or_times_out(urls: list[str]) -> None:
    ones = np.ones((1, 4), np.float32)

    async def run() -> tuple[list[int], list[int], str]:
        async with AsyncClient(urls[0], coalesce=False, registry=CollectorRegistry()) as c:
            await c.infer("sleepy", {"x": ones})  # the signature is known: the next calls take the fast path
            task = asyncio.ensure_future(c.infer("sleepy", {"x": ones}))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            after_cancel = [e.outstanding for e in c.endpoints]
            with pytest.raises(DeadlineExceeded, match="'sleepy'"):
                await c.infer("sleepy", {"x": ones}, timeout_s=0.1)
            return after_cancel, [e.outstanding for e in c.endpoints], c.endpoints[0].state

    assert asyncio.run(run()) == ([0], [0], "closed")


def test_client_on_one_endpoint_answers_counts_and_fails_every_call_like_its_first(
    face: str, urls: list[str]
) -> None:
    # One endpoint and a known input signature: AsyncClient's calls after the first take the fast path
    # (no flow machinery), which must answer, count, report and fail exactly as the flow does.
    registry = CollectorRegistry()
    events: list[ClientEvent] = []
    with cf.make_client(face, urls[0], registry=registry, hooks=[events.append]) as c:
        outs = [c.infer("mlp", {"x": X}, request_id=f"m-{i}") for i in range(3)]
        for i in range(2):
            with pytest.raises(InferenceFailed, match="Gather") as caught:
                c.infer("broken", {"x": X}, request_id=f"b-{i}")
            assert caught.value.model == "broken" and caught.value.endpoint == urls[0]
        assert [e.outstanding for e in c.endpoints] == [0]
    want = raw_infer(urls[0], "mlp", {"x": X})["probs"]
    for out in outs:
        np.testing.assert_array_equal(out["probs"], want)
    value = registry.get_sample_value
    assert value("tritonforge_client_requests_total", {"model": "mlp"}) == 3
    assert value("tritonforge_client_failures_total", {"model": "broken", "error": "InferenceFailed"}) == 2
    assert value("tritonforge_client_endpoint_requests_total", {"endpoint": urls[0]}) == 5
    requests = [e for e in events if e.kind == "request"]
    assert [e.request_id for e in requests] == ["m-0", "m-1", "m-2", "b-0", "b-1"]
    assert [e.error is None for e in requests] == [True, True, True, False, False]
    assert all(e.endpoint == urls[0] and e.attempt == 1 for e in requests)


def test_client_counts_requests_failures_and_latency_per_model_and_endpoint(
    face: str, urls: list[str]
) -> None:
    registry = CollectorRegistry()
    with cf.make_client(face, urls, registry=registry) as c:
        for _ in range(3):
            c.infer("mlp", {"x": X})
        with pytest.raises(InferenceFailed):
            c.infer("broken", {"x": X})
    value = registry.get_sample_value
    assert value("tritonforge_client_requests_total", {"model": "mlp"}) == 3
    assert value("tritonforge_client_request_latency_seconds_count", {"model": "mlp"}) == 3
    assert value("tritonforge_client_failures_total", {"model": "broken", "error": "InferenceFailed"}) == 1
    assert sum(value("tritonforge_client_endpoint_requests_total", {"endpoint": u}) or 0 for u in urls) == 4


def test_client_hooks_see_every_call_with_its_endpoint_and_error(face: str, urls: list[str]) -> None:
    events: list[ClientEvent] = []
    with cf.make_client(face, urls, hooks=[events.append]) as c:
        c.infer("mlp", {"x": X})
        with pytest.raises(ModelNotFoundError):
            c.infer("nope", {"x": X})
    assert [(e.kind, e.model, e.error is None) for e in events] == [
        ("request", "mlp", True),
        ("request", "nope", False),
    ]
    assert all(e.endpoint in urls and e.latency_s > 0 for e in events)


# -- headers (Triton's restricted protocols) ------------------------------------------------------------


def test_client_sends_headers_on_every_call(client_repo: Path) -> None:
    args = ["--grpc-restricted-protocol=inference,metadata,health:tf-key=s3cret"]
    with cf.servers(client_repo, 1, extra_args=args) as (guarded,):
        for face in cf.FACES:
            with (
                cf.make_client(face, guarded.grpc_url, retry=RetryPolicy.none()) as anonymous,
                pytest.raises(AuthenticationError, match="restricted"),
            ):
                anonymous.infer("mlp", {"x": X})
            secret = {"triton-grpc-protocol-tf-key": "s3cret"}
            with cf.make_client(face, guarded.grpc_url, headers=secret) as allowed:
                assert allowed.is_server_ready()
                assert allowed.infer("mlp", {"x": X})["probs"].shape == (4, 3)


# -- TLS -------------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a test certificate")
def test_client_talks_to_a_tls_server_given_its_root_certificate(client_repo: Path, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    args = [
        "--grpc-use-ssl=true",
        f"--grpc-server-cert={cert}",
        f"--grpc-server-key={key}",
        f"--grpc-root-cert={cert}",
    ]
    with cf.servers(client_repo, 1, extra_args=args) as (secure,):
        with Client(
            secure.grpc_url, tls=TLSConfig(root_certificates=str(cert)), registry=CollectorRegistry()
        ) as c:
            assert c.infer("mlp", {"x": X})["probs"].shape == (4, 3)
        with (
            Client(secure.grpc_url, retry=RetryPolicy.none(), registry=CollectorRegistry()) as plain,
            pytest.raises(Unavailable),
        ):
            plain.infer("mlp", {"x": X}, timeout_s=5.0)
