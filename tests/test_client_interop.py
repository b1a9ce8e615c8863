"""Both clients against a real Open Inference Protocol server that is not Triton (Seldon's MLServer), at
their default settings: every public call works or raises our own clear error, nothing hangs, and what
MLServer lacks (model configs, statistics, shared memory) degrades instead of failing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import client_fixtures as cf
import mlserver_fixtures as mf
from tritonforge.client import AsyncClient, Capabilities
from tritonforge.errors import ClientError, ModelNotFoundError, NotOffered, RequestTooLarge

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def mlserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[mf.MLServer]:
    with mf.running_mlserver(tmp_path_factory.mktemp("mlserver")) as server:
        yield server


@pytest.fixture(params=cf.FACES)
def client(request: pytest.FixtureRequest, mlserver: mf.MLServer) -> Iterator[Any]:
    with cf.make_client(request.param, mlserver.grpc_url) as c:
        yield c


def labels(out: dict[str, np.ndarray]) -> np.ndarray:
    return out["predict"].reshape(-1)


def our_shm_files(client: Any) -> list[str]:
    return [name for name in client.shm_regions if cf.leftover_shm(name)]


# -- inference -------------------------------------------------------------------------------------------


def test_client_infer_on_mlserver_returns_the_models_predictions(client: Any, mlserver: mf.MLServer) -> None:
    out = client.infer("digits", {"x": mlserver.x[:10]})
    np.testing.assert_array_equal(labels(out), mlserver.labels[:10])


def test_client_infer_on_mlserver_works_for_a_model_that_declares_no_inputs(
    client: Any, mlserver: mf.MLServer
) -> None:
    assert client.model_metadata("digits_plain").inputs == ()
    out = client.infer("digits_plain", {"whatever": mlserver.x[:4]})
    np.testing.assert_array_equal(labels(out), mlserver.labels[:4])


def test_async_client_answers_64_concurrent_small_calls_on_mlserver(mlserver: mf.MLServer) -> None:
    async def run() -> tuple[list[dict[str, np.ndarray]], Capabilities]:
        async with AsyncClient(mlserver.grpc_url) as c:
            outs = await asyncio.gather(*(c.infer("digits", {"x": mlserver.x[i : i + 1]}) for i in range(64)))
            return list(outs), (await c.capabilities())[mlserver.grpc_url]

    outs, caps = asyncio.run(run())
    np.testing.assert_array_equal(np.concatenate([labels(o) for o in outs]), mlserver.labels[:64])
    assert caps.model_config is False  # remembered: calls go alone, without asking again


def test_client_sends_a_large_tensor_as_bytes_when_mlserver_takes_no_shared_memory(
    client: Any, mlserver: mf.MLServer
) -> None:
    x = np.tile(mlserver.x, (2, 1))  # 3594 rows, 1.8 MB: over the 1 MiB shared-memory threshold of "auto"
    out = client.infer("digits", {"x": x})
    np.testing.assert_array_equal(labels(out), np.tile(mlserver.labels, 2))
    assert client.capabilities()[mlserver.grpc_url].shared_memory is False
    assert our_shm_files(client) == [] and client.shm_regions == []  # the region was removed again
    np.testing.assert_array_equal(labels(client.infer("digits", {"x": x})), np.tile(mlserver.labels, 2))


def test_client_raises_request_too_large_over_mlservers_limit_and_the_endpoint_stays_healthy(
    client: Any, mlserver: mf.MLServer
) -> None:
    x = np.tile(mlserver.x, (4, 1))  # 7188 rows, 3.7 MB of inputs: ...
    x = np.concatenate([x, x[:3000]])  # ... and 5.2 MB: over gRPC's 4 MiB
    with pytest.raises(RequestTooLarge, match="message limit of 4194304 bytes") as caught:
        client.infer("digits", {"x": x})
    assert caught.value.limit_bytes == mlserver.max_message_bytes
    assert caught.value.model == "digits" and caught.value.endpoint == mlserver.grpc_url
    (status,) = client.endpoints
    assert status.state == "closed" and status.healthy and status.consecutive_failures == 0
    np.testing.assert_array_equal(labels(client.infer("digits", {"x": mlserver.x[:5]})), mlserver.labels[:5])
    # known now: refused before sending, still without touching the endpoint's health
    with pytest.raises(RequestTooLarge):
        client.infer("digits", {"x": x})
    assert client.endpoints[0].state == "closed"


def test_client_infer_batched_splits_under_mlservers_message_limit(
    client: Any, mlserver: mf.MLServer
) -> None:
    x = np.tile(mlserver.x, (5, 1))  # 8985 rows, 4.6 MB in one batch would be refused
    out = client.infer_batched("digits", {"x": x}, batch_size=len(x))
    np.testing.assert_array_equal(labels(out), np.tile(mlserver.labels, 5))


def test_client_infer_many_on_mlserver_keeps_the_order(client: Any, mlserver: mf.MLServer) -> None:
    outs = client.infer_many("digits", [{"x": mlserver.x[i : i + 2]} for i in range(0, 40, 2)], concurrency=8)
    np.testing.assert_array_equal(np.concatenate([labels(o) for o in outs]), mlserver.labels[:40])


# -- every other public call ------------------------------------------------------------------------------


def test_client_health_and_metadata_calls_work_on_mlserver(client: Any, mlserver: mf.MLServer) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.endpoint_health() == {mlserver.grpc_url: True}
    assert client.is_model_ready("digits") and not client.is_model_ready("nope")
    assert client.server_metadata()["name"] == "mlserver"
    meta = client.model_metadata("digits")
    assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("x", "FP64", (-1, 64))]
    assert any(m["name"] == "digits" for m in client.repository_index())


def test_client_reports_what_mlserver_does_not_offer_as_not_offered(
    client: Any, mlserver: mf.MLServer
) -> None:
    caps = client.capabilities()[mlserver.grpc_url]
    assert (caps.model_config, caps.statistics, caps.shared_memory) == (False, False, False)
    assert caps.streaming is not None
    with pytest.raises(NotOffered, match=r"model config.*model_metadata"):
        client.model_config("digits")
    with pytest.raises(NotOffered, match="statistics"):
        client.model_statistics("digits")
    assert client.endpoints[0].state == "closed"  # not an outage
    assert client.is_server_ready()


def test_client_load_and_unload_model_on_mlserver(client: Any, mlserver: mf.MLServer) -> None:
    client.unload_model("digits")
    try:
        assert not client.is_model_ready("digits")
        with pytest.raises(ClientError) as caught:
            client.infer("digits", {"x": mlserver.x[:1]})
        assert isinstance(caught.value, (ModelNotFoundError, ClientError))
    finally:
        client.load_model("digits")
    assert client.is_model_ready("digits")
    np.testing.assert_array_equal(labels(client.infer("digits", {"x": mlserver.x[:3]})), mlserver.labels[:3])


def test_mlserver_venv_is_cached_with_a_marker(mlserver: mf.MLServer) -> None:
    venv = mf.mlserver_venv()
    assert (venv / ".tritonforge-complete").read_text().split() == list(mf.MLSERVER_PACKAGES)
    assert Path(venv / "bin" / "mlserver").exists()
