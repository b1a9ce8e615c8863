"""The client's core without a server: its flows yield the I/O to do and are sent the answers, so each
decision is checked here by a scripted driver (the faces' drivers are exercised through real servers in
the other client tests). This is our own transport edge, not Triton's behaviour."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from tritonforge.client import DEFAULT_CONTROL_TIMEOUT_S, Client
from tritonforge.client._flow import Each, Rpc, Run
from tritonforge.errors import ClientError, NotOffered, RequestTooLarge

URLS = ["127.0.0.1:1", "127.0.0.1:2"]  # never dialled: the flows are driven by hand


@pytest.fixture()
def client() -> Iterator[Client]:
    c = Client(URLS, metrics=False, shared_memory="off")
    yield c
    c.close()


def drive(flow: Any, answer: Callable[[Any], Any]) -> tuple[Any, list[Any]]:
    """Run a flow, answering each op with ``answer(op)`` (an exception instance is thrown in)."""
    ops: list[Any] = []
    run = Run(flow)
    while not run.done:
        ops.append(run.op)
        run.feed(answer(run.op))
    return run.result, ops


def test_load_model_flow_asks_every_endpoint_at_once_each_under_the_timeout(client: Client) -> None:
    _, ops = drive(
        client._load_model_flow("m", None, None), lambda op: [pb.RepositoryModelLoadResponse()] * 2
    )
    (each,) = ops
    assert isinstance(each, Each)
    rpcs = [next(f) for f in each.flows]
    assert [r.endpoint.url for r in rpcs] == URLS
    assert {(r.method, r.timeout_s) for r in rpcs} == {("RepositoryModelLoad", DEFAULT_CONTROL_TIMEOUT_S)}


def test_load_model_flow_raises_the_first_endpoints_error_after_all_answered(client: Client) -> None:
    late = ClientError("too slow", endpoint=URLS[1])
    with pytest.raises(ClientError, match="too slow"):
        drive(client._load_model_flow("m", None, 1.0), lambda op: [pb.RepositoryModelLoadResponse(), late])


def test_control_flow_remembers_a_feature_that_is_not_offered() -> None:
    with Client(URLS[0], metrics=False, shared_memory="off") as c:
        with pytest.raises(NotOffered, match="does not offer statistics"):
            drive(c._model_statistics_flow("m", None), lambda op: NotOffered("UNIMPLEMENTED"))
        assert c._pool.endpoints[0].capabilities.statistics is False
        # asked again: refused at once, without a request, and the endpoint is not held to blame
        with pytest.raises(NotOffered, match="does not offer statistics"):
            drive(c._model_statistics_flow("m", None), lambda op: pytest.fail(f"sent {op}"))
        assert c.endpoints[0].state == "closed"


def test_attempt_flow_refuses_a_request_over_a_known_limit_without_sending_it(client: Client) -> None:
    for ep in client._pool.endpoints:
        ep.capabilities.max_message_bytes = 1000
    client.validate = False
    flow = client._infer_flow("m", {"x": np.zeros((100, 8), np.float32)})
    with pytest.raises(RequestTooLarge, match="message limit of 1000 bytes") as caught:
        drive(flow, lambda op: pytest.fail(f"sent {op}"))
    assert caught.value.limit_bytes == 1000
    assert all(e.state == "closed" and e.consecutive_failures == 0 for e in client._pool.endpoints)


def test_infer_batched_flow_splits_under_the_limit_a_refusal_names(client: Client) -> None:
    client.validate = False
    x = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    sent: list[int] = []

    def answer(op: Any) -> Any:
        if isinstance(op, Each):
            return [_drive_one(f) for f in op.flows]
        raise AssertionError(op)

    def _drive_one(flow: Any) -> Any:
        try:
            result, _ = drive(flow, serve)
        except ClientError as exc:
            return exc
        return result

    def serve(op: Rpc) -> Any:
        if len(op.request) > 1200:
            refused = RequestTooLarge("too big", endpoint=op.endpoint.url)
            refused.limit_bytes = 1200
            return refused
        rows = _rows(op.request)
        sent.append(rows)
        response = pb.ModelInferResponse()
        response.outputs.add(name="y", datatype="FP32", shape=[rows, 8])
        response.raw_output_contents.append(np.zeros((rows, 8), np.float32).tobytes())
        return response

    out, _ = drive(client._infer_batched_flow("m", {"x": x}, 64), answer)
    assert out["y"].shape == (64, 8)
    assert max(sent) * 32 <= 1200 and sum(sent) == 64


def _rows(body: bytes) -> int:
    request = pb.ModelInferRequest()
    request.ParseFromString(body)
    return int(request.inputs[0].shape[0])


def test_run_throws_an_error_into_the_flow_where_it_can_be_handled() -> None:
    def flow() -> Any:
        try:
            yield "op"
        except ClientError:
            return "handled"
        return "answered"

    assert drive(flow(), lambda op: ClientError("no"))[0] == "handled"
    assert drive(flow(), lambda op: "yes")[0] == "answered"


def test_client_raises_value_error_when_asked_for_client_side_batching() -> None:
    with pytest.raises(ValueError, match="needs AsyncClient"):
        Client(URLS, coalesce=True)
    Client(URLS, coalesce=False, metrics=False).close()
