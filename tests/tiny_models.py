"""Tiny real models built in the test session: small enough to build in milliseconds, real enough that
Triton loads and runs them through the same backends as the example models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
RNG = np.random.default_rng(1234)


def spec(name: str, dtype, dims: tuple[int, ...]):  # (str, DataType, dims) -> tritonforge.config.TensorSpec
    """A config tensor: ``spec("x", DataType.FP32, (8,))``."""
    from tritonforge.config import TensorSpec

    return TensorSpec(name=name, dtype=dtype, dims=dims)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9  # onnxruntime in this venv reads IR <= 10; 9 keeps older runtimes happy too
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def mlp_onnx(path: Path, features: int = 8, hidden: int = 16, classes: int = 3) -> Path:
    """x[N, features] float32 -> probs[N, classes] (a softmax MLP with fixed random weights)."""
    w1 = numpy_helper.from_array(RNG.standard_normal((features, hidden)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(RNG.standard_normal(hidden).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(RNG.standard_normal((hidden, classes)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])],
        initializer=[w1, b1, w2],
    )
    return _save(graph, path)


def dtypes_onnx(path: Path) -> Path:
    """Four inputs of four dtypes, each passed through a dtype-preserving op."""
    two_h = numpy_helper.from_array(np.array(2, dtype=np.float16), "two_h")
    one_l = numpy_helper.from_array(np.array(1, dtype=np.int64), "one_l")
    three_i = numpy_helper.from_array(np.array(3, dtype=np.int32), "three_i")
    nodes = [
        helper.make_node("Mul", ["half", "two_h"], ["half_out"]),
        helper.make_node("Add", ["long", "one_l"], ["long_out"]),
        helper.make_node("Mul", ["int", "three_i"], ["int_out"]),
        helper.make_node("Not", ["flag"], ["flag_out"]),
    ]
    spec = [
        ("half", TensorProto.FLOAT16),
        ("long", TensorProto.INT64),
        ("int", TensorProto.INT32),
        ("flag", TensorProto.BOOL),
    ]
    graph = helper.make_graph(
        nodes,
        "dtypes",
        [helper.make_tensor_value_info(n, t, ["batch", 4]) for n, t in spec],
        [helper.make_tensor_value_info(f"{n}_out", t, ["batch", 4]) for n, t in spec],
        initializer=[two_h, one_l, three_i],
    )
    return _save(graph, path)


DTYPES_TENSORS = (("half", "FP16"), ("long", "INT64"), ("int", "INT32"), ("flag", "BOOL"))


def python_model(repo: Path, work: Path, config, code: str) -> Path:  # config: ModelConfig
    """Write ``code`` as ``work/<name>/model.py``; add it to ``repo`` as the Python model ``config``."""
    from tritonforge.repository import add_model

    path = work / config.name / "model.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(code)
    return add_model(repo, config.name, path, config)


def dtypes_config(name: str = "dtypes"):  # -> tritonforge.config.ModelConfig
    """The config serving :func:`dtypes_onnx`: four dtypes in, the same four out, batched."""
    from tritonforge.config import DynamicBatching, ModelConfig, TensorSpec

    return ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        max_batch_size=8,
        inputs=tuple(TensorSpec(name=n, dtype=t, dims=(4,)) for n, t in DTYPES_TENSORS),
        outputs=tuple(TensorSpec(name=f"{n}_out", dtype=t, dims=(4,)) for n, t in DTYPES_TENSORS),
        dynamic_batching=DynamicBatching(),
    )


def fixed_onnx(path: Path) -> Path:
    """No batch dim: a[2, 3] float32 -> b[3, 2] = transpose(a) * 10 (for max_batch_size 0)."""
    ten = numpy_helper.from_array(np.array(10, dtype=np.float32), "ten")
    nodes = [
        helper.make_node("Transpose", ["a"], ["t"], perm=[1, 0]),
        helper.make_node("Mul", ["t", "ten"], ["b"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [3, 2])],
        initializer=[ten],
    )
    return _save(graph, path)


def lookup_onnx(path: Path, table_size: int = 10) -> Path:
    """ids[N, S] int64 -> vec[N, S, 4] via Gather on a table: an id >= table_size fails at run time only."""
    table = numpy_helper.from_array(
        np.arange(table_size * 4, dtype=np.float32).reshape(table_size, 4), "table"
    )
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["vec"], axis=0)],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("vec", TensorProto.FLOAT, ["batch", "seq", 4])],
        initializer=[table],
    )
    return _save(graph, path)


def two_outputs_onnx(path: Path, width: int = 4) -> Path:
    """x[N, width] float32 -> double[N, width] (x * 2) and total[N, 1] (the row's sum): two outputs."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["double"]),
            helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1),
        ],
        "two_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [
            helper.make_tensor_value_info("double", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1]),
        ],
        initializer=[two, numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")],
    )
    return _save(graph, path)


def add_lookup(repo: Path, work: Path, name: str = "lookup", **changes) -> Path:
    """Add :func:`lookup_onnx` to ``repo`` as ``name``: ids[-1] INT64 -> vec[-1, 4] FP32, max batch 16, a
    dynamic batcher; ``changes`` replace config fields (``tritonforge.config.ModelConfig.replace``)."""
    from tritonforge.config import DataType, DynamicBatching, ModelConfig
    from tritonforge.repository import add_model

    config = ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        max_batch_size=16,
        inputs=(spec("ids", DataType.INT64, (-1,)),),
        outputs=(spec("vec", DataType.FP32, (-1, 4)),),
        dynamic_batching=DynamicBatching(),
    )
    source = work / "lookup.onnx"
    return add_model(
        repo, name, source if source.exists() else lookup_onnx(source), config.replace(**changes)
    )


def torch_modules():  # pragma: no cover - imported lazily by tests that need torch
    import torch

    class Affine(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.linear(x))

    class Named(torch.nn.Module):
        def forward(self, tokens: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return tokens.sum(dim=1, keepdim=True), tokens.to(torch.float32) * scale

    return Affine, Named


def affine_torchscript(path: Path) -> Path:
    import torch

    affine, _ = torch_modules()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(affine().eval()).save(str(path))
    return path


def named_torchscript(path: Path) -> Path:
    import torch

    _, named = torch_modules()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.script(named().eval()).save(str(path))
    return path
