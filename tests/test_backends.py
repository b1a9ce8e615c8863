"""Our Python-based onnxruntime and pytorch backends, through the real Triton server."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import triton_infer
from triton_stats import counted_since, counts

RNG = np.random.default_rng(7)


def _local_onnx(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_onnx_model_answers_equal_to_onnxruntime_in_process(grpc, model_repo):
    x = RNG.standard_normal((5, 8)).astype(np.float32)
    got = triton_infer(grpc, "mlp", {"x": x})
    want = _local_onnx(model_repo / "mlp" / "1" / "model.onnx", {"x": x})
    np.testing.assert_allclose(got["probs"], want["probs"], rtol=1e-5, atol=1e-6)


def test_onnx_backend_keeps_fp16_int64_int32_and_bool(grpc):
    inputs = {
        "half": RNG.standard_normal((3, 4)).astype(np.float16),
        "long": RNG.integers(-100, 100, (3, 4)).astype(np.int64),
        "int": RNG.integers(-100, 100, (3, 4)).astype(np.int32),
        "flag": RNG.integers(0, 2, (3, 4)).astype(bool),
    }
    got = triton_infer(grpc, "dtypes", inputs)
    assert got["half_out"].dtype == np.float16
    np.testing.assert_array_equal(got["half_out"], inputs["half"] * np.float16(2))
    assert got["long_out"].dtype == np.int64
    np.testing.assert_array_equal(got["long_out"], inputs["long"] + 1)
    assert got["int_out"].dtype == np.int32
    np.testing.assert_array_equal(got["int_out"], inputs["int"] * 3)
    assert got["flag_out"].dtype == np.bool_
    np.testing.assert_array_equal(got["flag_out"], ~inputs["flag"])


def test_model_without_batching_takes_its_full_shape(grpc):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = triton_infer(grpc, "fixed", {"a": a})
    np.testing.assert_array_equal(got["b"], a.T * 10)


def test_variable_length_requests_are_answered_each_with_its_own_length(grpc):
    lengths = [1, 3, 5, 3, 7, 1, 5, 2]

    def one(length: int) -> np.ndarray:
        ids = RNG.integers(0, 10, (1, length)).astype(np.int64)
        out = triton_infer(grpc, "lookup", {"ids": ids})["vec"]
        np.testing.assert_array_equal(out, np.arange(40, dtype=np.float32).reshape(10, 4)[ids])
        return out

    with ThreadPoolExecutor(8) as pool:
        shapes = [r.shape for r in pool.map(one, lengths)]
    assert shapes == [(1, n, 4) for n in lengths]


def test_concurrent_requests_run_in_fewer_larger_batches(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        before = counts(server.grpc_url, "mlp")
        x = RNG.standard_normal((64, 8)).astype(np.float32)
        with ThreadPoolExecutor(16) as pool:
            outs = list(
                pool.map(lambda i: triton_infer(client, "mlp", {"x": x[i : i + 1]})["probs"], range(64))
            )
    finally:
        client.close()
    _, inferences, executions = counted_since(server.grpc_url, "mlp", before, 64)
    assert inferences == 64
    assert executions < inferences / 2, f"{executions} executions for {inferences} inferences: no batching"
    # batched answers are each request's own answer
    np.testing.assert_allclose(np.concatenate(outs), _probs_one_by_one(server, x), rtol=1e-5, atol=1e-6)


def _probs_one_by_one(server, x):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        return np.concatenate(
            [triton_infer(client, "mlp", {"x": x[i : i + 1]})["probs"] for i in range(len(x))]
        )
    finally:
        client.close()


def test_a_failing_request_fails_alone_while_its_batch_neighbours_succeed(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    good = [np.array([[1, 2, 3]], dtype=np.int64) for _ in range(6)]
    bad = np.array([[1, 99, 3]], dtype=np.int64)  # 99 is outside the 10-row table: Gather fails

    def send(ids):
        try:
            return triton_infer(client, "lookup", {"ids": ids})["vec"]
        except InferenceServerException as exc:
            return exc

    try:
        with ThreadPoolExecutor(7) as pool:
            results = list(pool.map(send, [*good[:3], bad, *good[3:]]))
    finally:
        client.close()
    failure = results.pop(3)
    assert isinstance(failure, InferenceServerException)
    assert "99" in failure.message() or "out of bounds" in failure.message().lower()
    for vec in results:
        assert not isinstance(vec, Exception), vec
        np.testing.assert_array_equal(vec[0], np.arange(40, dtype=np.float32).reshape(10, 4)[[1, 2, 3]])


def test_requests_batched_together_each_get_exactly_the_outputs_they_name(server):
    x = RNG.standard_normal((12, 4)).astype(np.float32)
    asks = [("double",), ("total",), ("double", "total"), ()] * 3  # () names none: Triton sends all
    ready = threading.Barrier(len(asks))  # every request sent at once, however slow a connection's start

    def send(i: int) -> dict[str, np.ndarray]:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            item = grpcclient.InferInput("x", [1, 4], "FP32")
            item.set_data_from_numpy(x[i : i + 1])
            outputs = [grpcclient.InferRequestedOutput(n) for n in asks[i]] or None
            assert client.is_server_live()  # (connected)
            ready.wait(timeout=60)
            result = client.infer("two_outputs", [item], outputs=outputs)
            names = [o["name"] for o in result.get_response(as_json=True)["outputs"]]
            return {n: result.as_numpy(n) for n in names}
        finally:
            client.close()

    before = counts(server.grpc_url, "two_outputs")
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(send, range(len(asks))))
    executions = counted_since(server.grpc_url, "two_outputs", before, len(asks)).executions
    assert executions > 0
    assert executions < len(asks), "the requests were not batched: the test would not mix them"
    for i, got in enumerate(answers):
        assert sorted(got) == sorted(asks[i] or ("double", "total")), f"request {i} asked {asks[i]}"
        if "double" in got:
            np.testing.assert_array_equal(got["double"], x[i : i + 1] * 2)
        if "total" in got:
            np.testing.assert_allclose(got["total"], x[i : i + 1].sum(axis=1, keepdims=True), rtol=1e-6)


def test_instance_count_starts_that_many_backend_processes(server):

    assert len(_stubs(server, "lookup")) == 2
    assert len(_stubs(server, "lookup_4threads")) == 1


def _stubs(server, model: str) -> list:
    """The backend stub processes serving ``model`` (the stub's first argument is the model file)."""
    import psutil

    return [p for p in psutil.Process(server.pid).children() if f"/{model}/1/" in p.cmdline()[1]]


def test_torchscript_model_answers_equal_to_torch_in_process(grpc, model_repo):
    torch = pytest.importorskip("torch")
    module = torch.jit.load(str(model_repo / "affine_ts" / "1" / "model.pt"))
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    got = triton_infer(grpc, "affine_ts", {"INPUT__0": x})
    with torch.inference_mode():
        want = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got["OUTPUT__0"], want, rtol=1e-5, atol=1e-6)


def test_torchscript_named_inputs_and_several_outputs(grpc):
    pytest.importorskip("torch")
    tokens = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int64)
    scale = np.array([[0.5], [2.0]], dtype=np.float32)
    got = triton_infer(grpc, "named_ts", {"tokens": tokens, "scale": scale})
    np.testing.assert_array_equal(got["OUTPUT__0"], tokens.sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got["OUTPUT__1"], tokens * scale)


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"x": np.zeros((1, 8), dtype=np.float64)}, "data-type is 'FP64'"),
        ({"x": np.zeros((1, 5), dtype=np.float32)}, "shape"),
        ({"y": np.zeros((1, 8), dtype=np.float32)}, "unexpected inference input 'y'"),
    ],
    ids=["wrong-dtype", "wrong-shape", "unknown-input"],
)
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(grpc, inputs, expected):
    with pytest.raises(InferenceServerException) as info:
        triton_infer(grpc, "mlp", inputs)
    assert expected in info.value.message()
    # the same server still answers a good request
    out = triton_infer(grpc, "mlp", {"x": np.zeros((1, 8), dtype=np.float32)})
    assert out["probs"].shape == (1, 3)


def test_thread_count_parameter_sizes_onnxruntimes_pool(server, grpc):
    ids = np.array([[1, 2]], dtype=np.int64)
    for model in ("lookup", "lookup_4threads"):
        triton_infer(grpc, model, {"ids": ids})  # pools exist once a session has run

    def threads(model: str) -> int:
        return _stubs(server, model)[0].num_threads()

    # onnxruntime's intra-op pool has (threads - 1) workers besides the calling thread
    assert threads("lookup_4threads") - threads("lookup") == 3
