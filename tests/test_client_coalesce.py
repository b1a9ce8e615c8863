"""Client-side batching in the AsyncClient, through a real server: concurrent calls to a model with dynamic
batching go out as fewer requests, each call gets exactly its own rows, and a bad call fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import tiny_models
from client_fixtures import ECHO_PY
from tiny_models import spec as _spec
from triton_stats import counted_since, counts, counts_when
from tritonforge import AsyncClient, Coalesce, InferenceFailed
from tritonforge.client._coalesce import Batchable, Group, batch_rows, merge, split
from tritonforge.config import DataType, DynamicBatching, ModelConfig
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("coalesce")
    work, repo = root / "_src", root / "repo"
    mlp = tiny_models.mlp_onnx(work / "mlp.onnx")
    add_model(repo, "mlp", mlp, max_batch_size=32, max_queue_delay_us=100)
    plain = ModelConfig(
        name="mlp_plain",
        platform="onnxruntime_onnx",
        max_batch_size=32,
        inputs=(_spec("x", DataType.FP32, (8,)),),
        outputs=(_spec("probs", DataType.FP32, (3,)),),
    )
    add_model(repo, "mlp_plain", mlp, plain)
    tiny_models.add_lookup(repo, work)
    echo = ModelConfig(
        name="echo_str",
        backend="python",
        max_batch_size=8,
        inputs=(_spec("s", DataType.STRING, (1,)),),
        outputs=(_spec("out", DataType.STRING, (1,)),),
        dynamic_batching=DynamicBatching(),
    )
    tiny_models.python_model(repo, work, echo, ECHO_PY)
    with EmbeddedServer(repo) as server:
        yield server.grpc_url


async def _gather(client: AsyncClient, model: str, calls: list[dict[str, np.ndarray]]) -> list[Any]:
    return await asyncio.gather(*(client.infer(model, c) for c in calls), return_exceptions=True)


def run(url: str, model: str, calls: list[dict[str, np.ndarray]], **options: Any) -> list[Any]:
    async def main() -> list[Any]:
        async with AsyncClient(url, metrics=False, **options) as client:
            await client.infer(model, calls[0])  # metadata and config fetched: not what we count
            return await _gather(client, model, calls)

    return asyncio.run(main())


def rows_of(calls: list[dict[str, np.ndarray]], name: str = "x") -> int:
    return sum(len(c[name]) for c in calls)


def _mlp_calls(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((1 + i % 3, 8)).astype(np.float32)} for i in range(n)]


def test_concurrent_calls_go_out_as_fewer_requests_and_each_gets_its_own_rows(url: str) -> None:
    calls = _mlp_calls(48)
    want_rows = rows_of(calls[:1] + calls)
    start = counts(url, "mlp")
    alone = run(url, "mlp", calls, coalesce=False)  # the reference: every call its own request
    before = counts_when(url, "mlp", rows=start.rows + want_rows)  # (a count read at once may be short)
    merged = run(url, "mlp", calls)
    requests, rows, _ = counted_since(url, "mlp", before, want_rows)
    assert rows == want_rows
    assert requests < (len(calls) + 1) / 2, f"{len(calls) + 1} calls went out as {requests} requests"
    for got, want, call in zip(merged, alone, calls, strict=True):
        assert got["probs"].shape == (len(call["x"]), 3)
        np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-6, atol=1e-7)


def test_without_coalescing_every_call_is_its_own_request(url: str) -> None:
    calls = _mlp_calls(20)
    before = counts(url, "mlp")
    run(url, "mlp", calls, coalesce=False)
    requests = counted_since(url, "mlp", before, rows_of(calls[:1] + calls)).requests
    assert requests == len(calls) + 1


def test_a_model_without_dynamic_batching_is_never_merged(url: str) -> None:
    calls = _mlp_calls(20)
    before = counts(url, "mlp_plain")
    out = run(url, "mlp_plain", calls)
    requests = counted_since(url, "mlp_plain", before, rows_of(calls[:1] + calls)).requests
    assert requests == len(calls) + 1
    assert [o["probs"].shape[0] for o in out] == [len(c["x"]) for c in calls]


def test_merged_requests_stay_within_max_rows_and_the_models_max_batch_size(url: str) -> None:
    calls = [{"x": np.full((3, 8), i, np.float32)} for i in range(30)]  # 90 rows, max_batch_size 32
    before = counts(url, "mlp")
    out = run(url, "mlp", calls, coalesce=Coalesce(max_rows=6))
    requests, rows, _ = counted_since(url, "mlp", before, 93)
    assert all(not isinstance(o, BaseException) for o in out), out
    assert rows == 93
    assert requests >= 93 // 6  # at most two 3-row calls per request
    out = run(url, "mlp", calls)  # the model's own limit: 32 rows
    assert all(o["probs"].shape == (3, 3) for o in out)


def test_a_bad_call_among_merged_ones_fails_alone(url: str) -> None:
    calls = [{"ids": np.full((1, 5), i % 10, np.int64)} for i in range(12)]
    calls[5] = {"ids": np.array([[1, 2, 99, 3, 4]], np.int64)}  # 99 is past the table: fails at run time
    out = run(url, "lookup", calls)
    assert isinstance(out[5], InferenceFailed), out[5]
    assert "lookup" in str(out[5])
    for i, got in enumerate(out):
        if i != 5:
            np.testing.assert_array_equal(got["vec"][0, :, 0], 4.0 * calls[i]["ids"][0])


def test_strings_are_merged_and_split_back_intact(url: str) -> None:
    words = ["hello", "wörld", "", "a much longer sentence than the others", "x" * 300, "tab\there"]
    calls = [{"s": np.array([[w.encode()]] * (1 + i % 2), dtype=object)} for i, w in enumerate(words * 3)]
    before = counts(url, "echo_str")
    out = run(url, "echo_str", calls)
    requests = counted_since(url, "echo_str", before, rows_of(calls[:1] + calls, "s")).requests
    assert requests < len(calls) + 1
    for got, call in zip(out, calls, strict=True):
        np.testing.assert_array_equal(got["out"], call["s"])


def test_cancelling_one_merged_call_leaves_the_others_answered(url: str) -> None:
    calls = _mlp_calls(16)

    async def main() -> list[Any]:
        async with AsyncClient(url, metrics=False) as client:
            await client.infer("mlp", calls[0])
            tasks = [asyncio.ensure_future(client.infer("mlp", c)) for c in calls]
            await asyncio.sleep(0)  # every task has queued its call
            # the first goes alone (nothing in flight yet), the second leads the group the rest join
            for i in (0, 1, 7):
                tasks[i].cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)

    before = counts(url, "mlp")
    out = asyncio.run(main())
    answered = [c for i, c in enumerate(calls) if i not in (0, 1, 7)]
    requests = counted_since(url, "mlp", before, rows_of(calls[:1] + answered)).requests
    # the warm-up, the first call's (its cancel may come too late to stop it) and the group's one request:
    # the 13 calls left went out merged, not re-sent one by one
    assert requests <= 3, f"the calls left went out as {requests} requests"
    assert all(isinstance(out[i], asyncio.CancelledError) for i in (0, 1, 7)), out[:8]
    for i, got in enumerate(out):
        if i not in (0, 1, 7):
            assert got["probs"].shape == (len(calls[i]["x"]), 3)
            np.testing.assert_allclose(got["probs"].sum(axis=1), 1.0, rtol=1e-5)


# -- the decisions, without a server ---------------------------------------------------------------------


def test_batch_rows_needs_one_first_dim_shared_by_every_input() -> None:
    assert batch_rows((("a", "FP32", (3, 4)), ("b", "INT64", (3,)))) == 3
    assert batch_rows((("a", "FP32", (3, 4)), ("b", "INT64", (2,)))) is None
    assert batch_rows((("a", "FP32", ()),)) is None


def test_merge_joins_raw_bytes_and_split_hands_back_rows() -> None:
    class Call:
        def __init__(self, x: np.ndarray) -> None:
            self.signature = (("x", "FP32", x.shape),)
            self.raws = [x.tobytes()]

    a, b = np.arange(8, dtype=np.float32).reshape(2, 4), np.arange(4, dtype=np.float32).reshape(1, 4) + 100
    group = Group(("u", "m", None, None, (("x", "FP32", (4,)),)))
    group.add(Call(a), None, None, 2)  # type: ignore[arg-type]
    group.add(Call(b), None, None, 1)  # type: ignore[arg-type]
    signature, raws = merge(group)
    assert signature == (("x", "FP32", (3, 4)),)
    joined = np.frombuffer(raws[0], np.float32).reshape(3, 4)
    parts = split({"y": joined}, group.counts)
    np.testing.assert_array_equal(parts[0]["y"], a)
    np.testing.assert_array_equal(parts[1]["y"], b)
    with pytest.raises(ValueError, match="not 3 rows"):
        split({"y": joined[:2]}, group.counts)


def test_only_dynamic_batching_models_with_a_batch_dim_are_batchable() -> None:
    from tritonclient.grpc import model_config_pb2 as mc

    assert Batchable.from_config(mc.ModelConfig(max_batch_size=8)).max_rows == 0
    config = mc.ModelConfig(max_batch_size=8)
    config.dynamic_batching.SetInParent()
    assert Batchable.from_config(config).max_rows == 8
    config.max_batch_size = 0
    assert Batchable.from_config(config).max_rows == 0
    with pytest.raises(ValueError, match="max_rows"):
        Coalesce(max_rows=0)
