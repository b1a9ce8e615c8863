"""The tiny repository the load-test, sweep and tuner tests drive (built in a temp dir), and checks that
it serves what those tests assume: an MLP and a two-step ensemble over it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import tiny_models
from tritonforge.config import DataType, EnsembleStep, ModelConfig, TensorSpec, write_config
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

FEATURES = 8
CLASSES = 3


def scale_onnx(path: Path, width: int = CLASSES, factor: float = 2.0) -> Path:
    """p[N, width] float32 -> scaled[N, width] = p * factor."""
    k = numpy_helper.from_array(np.array(factor, dtype=np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["p", "k"], ["scaled"])],
        "scale",
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", width])],
        initializer=[k],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", tiny_models.OPSET)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_loadtest_repository(root: Path) -> Path:
    """``mlp`` (x[8] -> probs[3], dynamic batching), ``scale`` (p[3] -> scaled[3]) and the ensemble
    ``pipe`` = mlp then scale."""
    repo = root / "repo"
    add_model(
        repo,
        "mlp",
        tiny_models.mlp_onnx(root / "src" / "mlp.onnx"),
        max_batch_size=32,
        max_queue_delay_us=500,
    )
    add_model(repo, "scale", scale_onnx(root / "src" / "scale.onnx"), max_batch_size=32)
    pipe = ModelConfig(
        name="pipe",
        platform="ensemble",
        max_batch_size=32,
        inputs=(TensorSpec(name="x", dtype=DataType.FP32, dims=(FEATURES,)),),
        outputs=(TensorSpec(name="out", dtype=DataType.FP32, dims=(CLASSES,)),),
        ensemble_steps=(
            EnsembleStep(model_name="mlp", input_map={"x": "x"}, output_map={"probs": "probs"}),
            EnsembleStep(model_name="scale", input_map={"p": "probs"}, output_map={"scaled": "out"}),
        ),
    )
    (repo / "pipe" / "1").mkdir(parents=True)
    write_config(pipe, repo / "pipe")
    return repo


def test_loadtest_repository_serves_the_ensemble_as_mlp_then_scale(loadtest_server: EmbeddedServer) -> None:
    """``loadtest_server`` (conftest) serves the repository ``build_loadtest_repository`` builds."""
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(0).standard_normal((2, FEATURES)).astype(np.float32)
    client = grpcclient.InferenceServerClient(loadtest_server.grpc_url)
    try:

        def call(model: str, name: str, array: np.ndarray, out: str) -> np.ndarray:
            item = grpcclient.InferInput(name, list(array.shape), "FP32")
            item.set_data_from_numpy(array)
            return client.infer(model, [item]).as_numpy(out)

        probs = call("mlp", "x", x, "probs")
        np.testing.assert_allclose(call("pipe", "x", x, "out"), probs * 2, rtol=1e-5)
    finally:
        client.close()
