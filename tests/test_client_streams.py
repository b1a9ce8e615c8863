"""The AsyncClient's streams (tritonforge.client._wire.StreamPool) against a real embedded Triton server.

Calls on the fast path go as messages of long-lived ModelStreamInfer streams once the model's config says
it answers each request once: the answers, errors, deadlines and cancellations must be those of a grpc.aio
call (``streams=False``), and whatever a stream can't carry (a decoupled model, an answer that is not the
call's own, a server gone) goes the usual way.
"""

from __future__ import annotations

import asyncio
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import client_fixtures as cf
import tiny_models
from tritonforge import AsyncClient, Client, DeadlineExceeded, InferenceFailed, RetryPolicy, Unavailable
from tritonforge.client._codec import decode_response, frame
from tritonforge.client._flow import Rpc
from tritonforge.config import DataType, ModelConfig, TensorSpec
from tritonforge.server import EmbeddedServer

X = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)

# a decoupled model: two answers per request (a stream would take the second for the next call's)
TWICE_PY = textwrap.dedent("""
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
                sender = request.get_response_sender()
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("y", x)]))
                sender.send(
                    pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2)]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
            return None
""")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("streams")
    repo = cf.build_client_repository(root)
    twice = ModelConfig(
        name="twice",
        backend="python",
        max_batch_size=8,
        inputs=(TensorSpec(name="x", dtype=DataType.FP32, dims=(8,)),),
        outputs=(TensorSpec(name="y", dtype=DataType.FP32, dims=(8,)),),
        decoupled=True,
    )
    tiny_models.python_model(repo, root / "_twice", twice, TWICE_PY)
    return repo


@pytest.fixture(scope="module")
def url(repo: Path) -> Iterator[str]:
    with EmbeddedServer(repo, model_control="explicit", load_models=["*"]) as server:
        yield server.grpc_url


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def warmed(client: AsyncClient, model: str, inputs: dict[str, np.ndarray]) -> None:
    """The first call checks the signature, the second asks for the model's config: the next may go on
    streams (errors of the calls are the caller's to expect)."""
    try:
        await client.infer(model, inputs)
    finally:
        try:
            await client.infer(model, inputs)
        finally:
            for _ in range(200):
                if (model, None) in client._streamable and not client._tasks:
                    break
                await asyncio.sleep(0.01)


def test_repeated_calls_go_on_streams_with_the_answers_of_grpc_calls(url: str) -> None:
    async def answers(streams: bool) -> tuple[list[np.ndarray], int, int]:
        async with AsyncClient(url, coalesce=False, streams=streams, registry=CollectorRegistry()) as c:
            await warmed(c, "mlp", {"x": X})
            xs = [X * k for k in range(24)]
            outs = await asyncio.gather(*(c.infer("mlp", {"x": x}) for x in xs))
            pool = c._pools.get(url)
            idle = 0 if pool is None else len(pool._idle)
            return [o["probs"] for o in outs], idle, 0 if pool is None else pool.breaks

    streamed, idle, breaks = run(answers(True))
    plain, none_idle, _ = run(answers(False))
    assert idle >= 1 and breaks == 0  # the calls really went on streams, which are idle again
    assert none_idle == 0
    for a, b in zip(streamed, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_model_error_on_a_stream_is_the_same_error_as_on_a_grpc_call(url: str) -> None:
    async def failure(streams: bool) -> tuple[str, str]:
        async with AsyncClient(url, coalesce=False, streams=streams, registry=CollectorRegistry()) as c:
            with pytest.raises(InferenceFailed):
                await warmed(c, "broken", {"x": X})
            await asyncio.sleep(0.2)  # the config is learnt
            with pytest.raises(InferenceFailed) as caught:
                await c.infer("broken", {"x": X})
            ok = await c.infer("mlp", {"x": X})
            assert ok["probs"].shape == (1, 3)
            # Triton names the model instance that ran the request ('broken_0', 'broken_1'): either may
            return type(caught.value).__name__, re.sub(r"'broken_\d+'", "'broken_<i>'", str(caught.value))

    assert run(failure(True)) == run(failure(False))


def test_a_stream_past_its_deadline_raises_deadline_exceeded_and_the_next_call_answers(url: str) -> None:
    ones = np.ones((1, 4), np.float32)

    async def late() -> tuple[float, int, list[int]]:
        async with AsyncClient(url, coalesce=False, streams=True, registry=CollectorRegistry()) as c:
            await warmed(c, "sleepy", {"x": ones})
            assert c._streamable[("sleepy", None)] is True
            with pytest.raises(DeadlineExceeded, match="'sleepy'"):
                await c.infer("sleepy", {"x": ones}, timeout_s=0.1)
            task = asyncio.ensure_future(c.infer("sleepy", {"x": ones}))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            out = await c.infer("sleepy", {"x": ones * 3})
            pool = c._pools[url]
            return float(out["y"][0, 0]), pool.breaks, [e.outstanding for e in c.endpoints]

    value, breaks, outstanding = run(late())
    assert value == 3.0 and breaks == 0 and outstanding == [0]


def test_a_decoupled_model_never_goes_on_a_stream(url: str) -> None:
    async def errors(streams: bool) -> tuple[str, Any]:
        async with AsyncClient(url, coalesce=False, streams=streams, registry=CollectorRegistry()) as c:
            x = np.ones((1, 8), np.float32)
            found = []
            for _ in range(3):
                try:
                    await c.infer("twice", {"x": x})
                except Exception as exc:  # Triton refuses a decoupled model on a unary call
                    found.append(type(exc).__name__)
                await asyncio.sleep(0.1)
            return ",".join(found), c._streamable.get(("twice", None))

    streamed, known = run(errors(True))
    assert known is False  # the config said decoupled: every call the usual way
    assert streamed == run(errors(False))[0] and streamed


def test_an_answer_that_is_not_the_calls_own_is_not_taken(url: str) -> None:
    async def check() -> tuple[np.ndarray, int]:
        async with AsyncClient(url, coalesce=False, streams=True, registry=CollectorRegistry()) as c:
            await warmed(c, "mlp", {"x": X})
            await c.infer("mlp", {"x": X})  # opens the pool's connection and leaves a stream idle
            pool = c._pools[url]
            header = next(iter(c._headers.values()))
            body = frame(header, [X.tobytes()], "theirs")
            rpc = Rpc(c._pool.only(), "ModelInfer", body, 5.0, "mlp", None, request_id="mine")
            response = await c._streamed(pool, rpc)  # the stream answers "theirs"
            return decode_response(response)["probs"], pool.breaks

    probs, breaks = run(check())
    assert breaks == 1  # the pool started afresh
    assert probs.shape == (1, 3)  # and the call was answered the usual way


def test_a_server_gone_mid_run_fails_the_next_call_with_unavailable(repo: Path) -> None:
    server = EmbeddedServer(repo, model_control="explicit", load_models=["mlp"]).start()

    async def gone() -> None:
        async with AsyncClient(
            server.grpc_url,
            coalesce=False,
            streams=True,
            registry=CollectorRegistry(),
            retry=RetryPolicy(max_attempts=1),
        ) as c:
            await warmed(c, "mlp", {"x": X})
            await c.infer("mlp", {"x": X})
            assert c._pools[server.grpc_url]._idle
            server.stop()
            with pytest.raises(Unavailable):
                await asyncio.wait_for(c.infer("mlp", {"x": X}), 30)

    try:
        run(gone())
    finally:
        server.stop()


def test_streams_are_for_the_async_client_only_and_off_by_default() -> None:
    with pytest.raises(ValueError, match="streams need AsyncClient"):
        Client("127.0.0.1:1", streams=True)
    assert AsyncClient("127.0.0.1:1").streams is False and AsyncClient("127.0.0.1:1", streams=True).streams


def test_a_pool_whose_endpoint_refuses_connections_hands_calls_back_and_gives_up() -> None:
    from tritonforge.client._wire import StreamBroken, StreamPool
    from tritonforge.server.embedded import free_port

    async def refused() -> tuple[int, bool]:
        pool = StreamPool(f"127.0.0.1:{free_port()}", ())
        try:
            for _ in range(StreamPool.MAX_BREAKS):
                with pytest.raises(StreamBroken):
                    await pool.send(b"", 5.0)
            return pool.breaks, pool.dead
        finally:
            pool.close()

    assert run(refused()) == (StreamPool.MAX_BREAKS, True)  # dead: the client stays with grpc.aio


def test_a_pool_gives_up_on_an_answer_later_than_the_deadline() -> None:
    import time

    from tritonforge.client._wire import AnswerLate, StreamPool

    async def silent_server() -> tuple[float, int]:
        async with cf.silent_http2_server() as url:
            pool = StreamPool(url, ())
            try:
                started = time.perf_counter()
                with pytest.raises(AnswerLate):
                    await pool.send(b"\x0a\x01m", 0.2)
                return time.perf_counter() - started, len(pool._idle)
            finally:
                pool.close()

    waited_s, idle = run(silent_server())
    assert 0.2 <= waited_s < 5 and idle == 0  # the late stream is reset, never reused
