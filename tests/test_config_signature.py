"""Specs for signature inference (ONNX, TorchScript) and for configs built from / checked against it."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import pytest
from onnx import TensorProto, helper

from tritonforge.config import (
    DataType,
    InstanceKind,
    ModelConfig,
    Signature,
    TensorSpec,
    check_signature,
    config_from_signature,
    onnx_signature,
    torchscript_signature,
)
from tritonforge.errors import ConfigError, SignatureError

Shape = Sequence[int | str | None]


def save_identity_onnx(
    path: Path,
    inputs: Sequence[tuple[str, int, Shape | None]],
    *,
    initializer_as_input: bool = False,
) -> Path:
    """An ONNX model whose outputs ``<name>_out`` copy its inputs (same dtype and shape)."""
    graph_inputs = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    graph_outputs = [helper.make_tensor_value_info(f"{n}_out", t, s) for n, t, s in inputs]
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n, _, _ in inputs]
    initializers = []
    if initializer_as_input:
        # Older exporters list weights among graph inputs too; they are not model inputs.
        weight = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
        initializers.append(weight)
        graph_inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]))
        graph_outputs.append(helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [2]))
        nodes.append(helper.make_node("Identity", ["w"], ["w_out"]))
    graph = helper.make_graph(nodes, "g", graph_inputs, graph_outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def fp32(name: str, *dims: int) -> TensorSpec:
    return TensorSpec(name=name, dtype=DataType.FP32, dims=dims)


# ---------------------------------------------------------------- ONNX


def test_onnx_signature_is_batched_when_every_tensor_leads_with_the_same_symbolic_dim(tmp_path: Path) -> None:
    path = save_identity_onnx(
        tmp_path / "m.onnx",
        [("x", TensorProto.FLOAT, ["batch", 4]), ("ids", TensorProto.INT64, ["batch", "seq"])],
    )
    sig = onnx_signature(path)
    assert sig.batched
    assert sig.inputs == (fp32("x", 4), TensorSpec(name="ids", dtype=DataType.INT64, dims=[-1]))
    assert [o.name for o in sig.outputs] == ["x_out", "ids_out"]
    assert sig.outputs[1].dtype is DataType.INT64


def test_onnx_signature_is_batched_when_leading_dims_are_unknown(tmp_path: Path) -> None:
    path = save_identity_onnx(tmp_path / "m.onnx", [("x", TensorProto.FLOAT, [None, 3])])
    sig = onnx_signature(path)
    assert sig.batched
    assert sig.inputs[0].dims == (3,)


def test_onnx_signature_is_not_batched_when_a_leading_dim_is_fixed(tmp_path: Path) -> None:
    path = save_identity_onnx(
        tmp_path / "m.onnx", [("x", TensorProto.FLOAT, [1, 4]), ("y", TensorProto.FLOAT, ["n", 4])]
    )
    sig = onnx_signature(path)
    assert not sig.batched
    assert sig.inputs == (fp32("x", 1, 4), fp32("y", -1, 4))


def test_onnx_signature_is_not_batched_when_inputs_lead_with_different_symbols(tmp_path: Path) -> None:
    path = save_identity_onnx(
        tmp_path / "m.onnx", [("a", TensorProto.FLOAT, ["batch", 2]), ("b", TensorProto.FLOAT, ["seq", 2])]
    )
    sig = onnx_signature(path)
    assert not sig.batched
    assert sig.inputs[0].dims == (-1, 2)


def test_onnx_signature_leaves_out_initializers_and_maps_dtypes(tmp_path: Path) -> None:
    path = save_identity_onnx(
        tmp_path / "m.onnx",
        [("flag", TensorProto.BOOL, [2]), ("text", TensorProto.STRING, [3]), ("h", TensorProto.FLOAT16, [5])],
        initializer_as_input=True,
    )
    sig = onnx_signature(path)
    assert [(t.name, t.dtype) for t in sig.inputs] == [
        ("flag", DataType.BOOL),
        ("text", DataType.STRING),
        ("h", DataType.FP16),
    ]
    assert "w_out" in [t.name for t in sig.outputs]


def test_onnx_signature_gives_batched_scalars_a_dim_of_one_with_empty_reshape(tmp_path: Path) -> None:
    path = save_identity_onnx(tmp_path / "m.onnx", [("s", TensorProto.FLOAT, ["batch"])])
    sig = onnx_signature(path)
    assert sig.inputs[0] == TensorSpec(name="s", dtype=DataType.FP32, dims=[1], reshape=[])
    cfg = config_from_signature("scalar", sig, "onnxruntime_onnx")
    assert check_signature(cfg, sig) == []


def test_onnx_signature_raises_signature_error_when_scalar_in_unbatched_model(tmp_path: Path) -> None:
    path = save_identity_onnx(
        tmp_path / "m.onnx", [("s", TensorProto.FLOAT, []), ("x", TensorProto.FLOAT, [2])]
    )
    with pytest.raises(SignatureError, match="'s' is a scalar"):
        onnx_signature(path)


def test_onnx_signature_raises_signature_error_when_rank_unknown(tmp_path: Path) -> None:
    path = save_identity_onnx(tmp_path / "m.onnx", [("x", TensorProto.FLOAT, None)])
    with pytest.raises(SignatureError, match="no shape"):
        onnx_signature(path)


def test_onnx_signature_raises_signature_error_when_file_missing_or_garbage(tmp_path: Path) -> None:
    with pytest.raises(SignatureError, match=r"ONNX file .*missing.onnx does not exist"):
        onnx_signature(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\x00not a protobuf at all")
    with pytest.raises(SignatureError, match="not a readable ONNX model"):
        onnx_signature(garbage)


# ---------------------------------------------------------------- config from / against a signature


def test_config_from_signature_builds_batched_config_that_matches(tmp_path: Path) -> None:
    path = save_identity_onnx(tmp_path / "m.onnx", [("x", TensorProto.FLOAT, ["batch", 4])])
    sig = onnx_signature(path)
    cfg = config_from_signature("ident", sig, "onnxruntime_onnx", max_batch_size=16, instances=2, kind="GPU")
    assert cfg.max_batch_size == 16
    assert cfg.dynamic_batching is not None
    assert cfg.instance_groups[0].count == 2
    assert cfg.instance_groups[0].kind is InstanceKind.GPU
    assert check_signature(cfg, sig) == []
    assert ModelConfig.from_pbtxt(cfg.to_pbtxt()) == cfg


def test_config_from_signature_defaults_max_batch_size_from_batched() -> None:
    batched = Signature(inputs=(fp32("x", 4),), outputs=(fp32("y", 2),), batched=True)
    unbatched = Signature(inputs=(fp32("x", 1, 4),), outputs=(fp32("y", 1, 2),), batched=False)
    assert config_from_signature("a", batched, "onnxruntime_onnx").max_batch_size == 8
    plain = config_from_signature("b", unbatched, None, backend="python", dynamic_batching=True)
    assert (plain.max_batch_size, plain.dynamic_batching, plain.backend) == (0, None, "python")


def test_config_from_signature_turns_batch_axis_into_variable_dim_when_batching_off() -> None:
    sig = Signature(inputs=(fp32("x", 4),), outputs=(fp32("y", 2),), batched=True)
    cfg = config_from_signature("a", sig, "onnxruntime_onnx", max_batch_size=0)
    assert cfg.inputs[0].dims == (-1, 4)
    assert check_signature(cfg, sig) == []


def test_config_from_signature_raises_config_error_when_batching_a_model_without_batch_axis() -> None:
    sig = Signature(inputs=(fp32("x", 1, 4),), outputs=(fp32("y", 1, 2),), batched=False)
    with pytest.raises(ConfigError, match="needs a signature with a batch dimension"):
        config_from_signature("a", sig, "onnxruntime_onnx", max_batch_size=4)


def test_check_signature_reports_name_dtype_and_dims_mismatches() -> None:
    sig = Signature(
        inputs=(fp32("x", 4), TensorSpec(name="ids", dtype=DataType.INT64, dims=[-1])),
        outputs=(fp32("y", 2),),
        batched=True,
    )
    cfg = ModelConfig(
        name="m",
        platform="onnxruntime_onnx",
        max_batch_size=4,
        inputs=[fp32("x", 5), TensorSpec(name="ids", dtype=DataType.INT32, dims=[7])],
        outputs=[fp32("z", 2)],
    )
    problems = check_signature(cfg, sig)
    assert any("input 'x'" in p and "[-1, 5]" in p and "[-1, 4]" in p for p in problems)
    assert any("input 'ids'" in p and "TYPE_INT32" in p and "TYPE_INT64" in p for p in problems)
    assert not any("input 'ids'" in p and "shape" in p for p in problems)  # -1 matches 7
    assert any("output 'z' is in the config but not in the model" in p for p in problems)
    assert any("output 'y' is in the model but not in the config" in p for p in problems)


def test_check_signature_reports_batching_mismatch_and_accepts_missing_optional_inputs() -> None:
    sig = Signature(inputs=(fp32("x", 1, 4),), outputs=(fp32("y", 1, 2),), batched=False)
    cfg = ModelConfig(
        name="m",
        platform="onnxruntime_onnx",
        max_batch_size=2,
        inputs=[fp32("x", 4), TensorSpec(name="extra", dtype=DataType.FP32, dims=[1], optional=True)],
        outputs=[fp32("y", 2)],
    )
    problems = check_signature(cfg, sig)
    assert any("no batch dimension" in p for p in problems)
    assert not any("extra" in p for p in problems)


def test_import_tritonforge_config_does_not_import_torch() -> None:
    code = "import sys, tritonforge.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-W", "error::DeprecationWarning:tritonforge", "-c", code], check=True)


# ---------------------------------------------------------------- TorchScript


def script_and_save(module: Any, path: Path) -> Path:
    torch = pytest.importorskip("torch")
    with warnings.catch_warnings():
        # Building the fixture uses torch's deprecated TorchScript writers; that's torch's concern.
        warnings.filterwarnings("ignore", message="`torch.jit", category=DeprecationWarning)
        torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.fixture
def two_in_two_out(tmp_path: Path) -> Path:
    torch: Any = pytest.importorskip("torch")

    class TwoInTwoOut(torch.nn.Module):
        # TorchScript types unannotated arguments as tensors.
        def forward(self, x, tokens):
            return x * 2.0, tokens.sum(dim=1, keepdim=True)

    return script_and_save(TwoInTwoOut(), tmp_path / "model.pt")


def test_torchscript_signature_uses_triton_names_and_drops_batch_dim(two_in_two_out: Path) -> None:
    torch = pytest.importorskip("torch")
    sig = torchscript_signature(two_in_two_out, [torch.zeros(3, 4), torch.ones(3, 7, dtype=torch.int64)])
    assert sig.batched
    assert sig.inputs == (fp32("INPUT__0", 4), TensorSpec(name="INPUT__1", dtype=DataType.INT64, dims=[7]))
    assert sig.outputs == (fp32("OUTPUT__0", 4), TensorSpec(name="OUTPUT__1", dtype=DataType.INT64, dims=[1]))
    cfg = config_from_signature("scripted", sig, "pytorch_libtorch")
    assert check_signature(cfg, sig) == []


def test_torchscript_signature_names_inputs_by_mapping_and_marks_variable_dims(two_in_two_out: Path) -> None:
    torch = pytest.importorskip("torch")
    sig = torchscript_signature(
        two_in_two_out,
        {"x": torch.zeros(2, 4), "tokens": torch.ones(2, 7, dtype=torch.int64)},
        variable_dims={1: [1]},
    )
    assert [t.name for t in sig.inputs] == ["x", "tokens"]
    assert sig.inputs[1].dims == (-1,)


def test_torchscript_signature_is_unbatched_when_leading_sizes_differ(two_in_two_out: Path) -> None:
    torch = pytest.importorskip("torch")
    sig = torchscript_signature(two_in_two_out, [torch.zeros(1, 4), torch.ones(5, 7, dtype=torch.int64)])
    assert not sig.batched
    assert sig.inputs[0].dims == (1, 4)
    forced = torchscript_signature(
        two_in_two_out, [torch.zeros(1, 4), torch.ones(5, 7, dtype=torch.int64)], batched=True
    )
    assert forced.inputs[1].dims == (7,)


def test_torchscript_signature_raises_signature_error_when_model_fails_or_file_bad(
    two_in_two_out: Path, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(SignatureError, match="failed on the example inputs"):
        torchscript_signature(two_in_two_out, [torch.zeros(2, 4)])
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(SignatureError, match="not a loadable TorchScript model"):
        torchscript_signature(bad, [torch.zeros(1)])
