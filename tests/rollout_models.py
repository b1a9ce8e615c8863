"""Versions of one tiny MLP for rollout tests: the same weights (a good candidate), other weights (a wrong
one), the same weights with the classes' columns rotated (a shuffled-label one), and the same weights
plus a heavy branch that adds zero (a slow one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES, HIDDEN, CLASSES = 8, 16, 3


def _weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32),
        rng.standard_normal(HIDDEN).astype(np.float32),
        rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32),
    ]


def mlp(
    path: Path,
    *,
    seed: int = 7,
    slow_matmuls: int = 0,
    size: int = 384,
    shuffled: bool = False,
    fails: bool = False,
) -> Path:
    """x[N, 8] -> probs[N, 3]; ``slow_matmuls`` chained size x size products feed a branch that adds 0;
    ``shuffled``: the same model answering with its classes' labels rotated; ``fails``: a branch reads a
    table past its end (an index computed from x, so it fails at run time, on every request)."""
    w1, b1, w2 = _weights(seed)
    if shuffled:
        w2 = np.ascontiguousarray(w2[:, [1, 2, 0]])
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["logits"]),
    ]
    final = "logits"
    if slow_matmuls:
        big = np.random.default_rng(99).uniform(0, 1.0 / size, (size, size)).astype(np.float32)
        inits += [numpy_helper.from_array(big, "big"), numpy_helper.from_array(np.float32(0), "zero")]
        nodes += [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Mul", ["s", "zero"], ["s0"]),
            helper.make_node("Add", ["big", "s0"], ["m0"]),  # depends on x, so nothing is folded away
        ]
        for i in range(slow_matmuls):
            nodes.append(helper.make_node("MatMul", [f"m{i}", "big"], [f"m{i + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"m{slow_matmuls}"], ["t"], keepdims=0),
            helper.make_node("Mul", ["t", "zero"], ["t0"]),
            helper.make_node("Add", ["logits", "t0"], ["logits_slow"]),
        ]
        final = "logits_slow"
    if fails:
        inits += [
            numpy_helper.from_array(np.zeros(10, np.float32), "table"),
            numpy_helper.from_array(np.float32(0), "nought"),
            numpy_helper.from_array(np.float32(100), "past_end"),
        ]
        nodes += [
            helper.make_node("ReduceSum", ["x"], ["xs"], keepdims=0),
            helper.make_node("Mul", ["xs", "nought"], ["xs0"]),
            helper.make_node("Add", ["xs0", "past_end"], ["where_f"]),
            helper.make_node("Cast", ["where_f"], ["where"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "where"], ["read"], axis=0),
            helper.make_node("Mul", ["read", "nought"], ["read0"]),
            helper.make_node("Add", [final, "read0"], ["logits_read"]),
        ]
        final = "logits_read"
    nodes.append(helper.make_node("Softmax", [final], ["probs"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
