"""Specs for tritonforge.config: the dataclasses, their pbtxt/protobuf round trips and Triton's rules."""

# The dataclasses coerce "FP32", "GPU" and lists on purpose, and these specs exercise that.
# mypy: disable-error-code="arg-type"

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

import tritonforge.config as tc
from tritonforge.config import (
    CustomAccelerator,
    DataType,
    DynamicBatching,
    EnsembleStep,
    InstanceGroup,
    InstanceKind,
    ModelConfig,
    ModelWarmup,
    OpenVINOAccelerator,
    Optimization,
    QueuePolicy,
    TensorRTAccelerator,
    TensorSpec,
    TimeoutAction,
    VersionPolicy,
    WarmupInput,
    read_config,
    write_config,
)
from tritonforge.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"


def fp32(name: str, *dims: int, **kwargs: object) -> TensorSpec:
    return TensorSpec(name=name, dtype=DataType.FP32, dims=dims, **kwargs)


def onnx_config(**changes: object) -> ModelConfig:
    """A small valid ONNX config that each rejection test breaks in one way."""
    fields: dict[str, object] = {
        "name": "mlp",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 8,
        "inputs": [fp32("x", 4)],
        "outputs": [fp32("y", 2)],
    }
    fields.update(changes)
    return ModelConfig(**fields)


# ---------------------------------------------------------------- golden configs


def golden_minimal_onnx() -> ModelConfig:
    return ModelConfig(
        name="minimal_onnx",
        platform="onnxruntime_onnx",
        max_batch_size=0,
        inputs=[fp32("x", 1, 4)],
        outputs=[fp32("y", 1, 2)],
        instance_groups=[InstanceGroup(count=1, kind=InstanceKind.CPU)],
    )


def golden_dynamic_batching() -> ModelConfig:
    return ModelConfig(
        name="batched_classifier",
        platform="onnxruntime_onnx",
        max_batch_size=32,
        inputs=[fp32("image", 3, -1, -1), TensorSpec(name="mask", dtype="BOOL", dims=[-1])],
        outputs=[fp32("logits", 1000), TensorSpec(name="label", dtype="STRING", dims=[1])],
        dynamic_batching=DynamicBatching(
            preferred_batch_sizes=[8, 16, 32],
            max_queue_delay_us=500,
            priority_levels=2,
            default_priority_level=2,
            default_queue_policy=QueuePolicy(
                timeout_action=TimeoutAction.REJECT, default_timeout_us=100_000, max_queue_size=64
            ),
            priority_queue_policy={
                1: QueuePolicy(timeout_action="DELAY", default_timeout_us=20_000, allow_timeout_override=True)
            },
        ),
        instance_groups=[InstanceGroup(count=2, kind="CPU")],
    )


def golden_gpu_tensorrt() -> ModelConfig:
    return ModelConfig(
        name="detector_trt",
        platform="onnxruntime_onnx",
        max_batch_size=16,
        inputs=[TensorSpec(name="images", dtype="FP16", dims=[3, 640, 640])],
        outputs=[TensorSpec(name="boxes", dtype="FP16", dims=[-1, 6])],
        dynamic_batching=DynamicBatching(preferred_batch_sizes=[4, 16], max_queue_delay_us=2000),
        instance_groups=[InstanceGroup(name="gpu_pool", count=2, kind=InstanceKind.GPU, gpus=[0, 1])],
        optimization=Optimization(
            gpu_accelerators=[
                TensorRTAccelerator(
                    precision_mode="FP16",
                    max_workspace_size_bytes=1 << 30,
                    trt_engine_cache_enable=True,
                    trt_engine_cache_path="/tmp/trt_cache",
                )
            ],
            cuda_graphs=True,
        ),
    )


def golden_version_policy_specific() -> ModelConfig:
    return ModelConfig(
        name="torch_regressor",
        platform="pytorch_libtorch",
        max_batch_size=4,
        inputs=[fp32("INPUT__0", 10)],
        outputs=[fp32("OUTPUT__0", 1)],
        version_policy=VersionPolicy.specific(1, 3),
        instance_groups=[InstanceGroup(count=1, kind=InstanceKind.CPU)],
        default_model_filename="model.pt",
    )


def golden_warmup() -> ModelConfig:
    return ModelConfig(
        name="warm_model",
        backend="onnxruntime",
        max_batch_size=8,
        inputs=[fp32("x", 4), TensorSpec(name="ids", dtype="INT64", dims=[-1])],
        outputs=[fp32("y", 2)],
        instance_groups=[InstanceGroup(count=1, kind=InstanceKind.CPU)],
        warmup=[
            ModelWarmup(
                name="zeros",
                batch_size=8,
                count=3,
                inputs={
                    "x": WarmupInput(dtype="FP32", dims=[4], zero_data=True),
                    "ids": WarmupInput(dtype="INT64", dims=[16], random_data=True),
                },
            ),
            ModelWarmup(
                name="from_file",
                batch_size=1,
                inputs={
                    "x": WarmupInput(dtype="FP32", dims=[4], input_data_file="x.bin"),
                    "ids": WarmupInput(dtype="INT64", dims=[16], zero_data=True),
                },
            ),
        ],
        response_cache=True,
        version_policy=VersionPolicy.latest(2),
    )


def golden_parameters() -> ModelConfig:
    return ModelConfig(
        name="postprocess",
        backend="python",
        max_batch_size=64,
        inputs=[
            fp32("scores", 1, reshape=()),
            TensorSpec(name="threshold", dtype="FP32", dims=[1], optional=True),
            TensorSpec(name="tokens", dtype="INT32", dims=[-1], allow_ragged_batch=True),
        ],
        outputs=[TensorSpec(name="decision", dtype="BOOL", dims=[2, 3], reshape=[6])],
        instance_groups=[InstanceGroup(count=4, kind=InstanceKind.CPU)],
        parameters={"EXECUTION_ENV_PATH": "$$TRITON_MODEL_DIRECTORY/env.tar.gz", "threads": "2"},
        optimization=Optimization(cpu_accelerators=[OpenVINOAccelerator()], input_pinned_memory=False),
        version_policy=VersionPolicy.all(),
    )


def golden_ensemble() -> ModelConfig:
    return ModelConfig(
        name="pipeline",
        platform="ensemble",
        max_batch_size=8,
        inputs=[TensorSpec(name="TEXT", dtype="STRING", dims=[1])],
        outputs=[fp32("SCORES", 3)],
        ensemble_steps=[
            EnsembleStep(
                model_name="tokenizer",
                input_map={"text": "TEXT"},
                output_map={"input_ids": "ids", "attention_mask": "mask"},
            ),
            EnsembleStep(
                model_name="classifier",
                model_version=2,
                input_map={"input_ids": "ids", "attention_mask": "mask"},
                output_map={"logits": "SCORES"},
            ),
        ],
    )


GOLDEN_CASES: dict[str, Callable[[], ModelConfig]] = {
    "minimal_onnx": golden_minimal_onnx,
    "dynamic_batching": golden_dynamic_batching,
    "gpu_tensorrt": golden_gpu_tensorrt,
    "version_policy_specific": golden_version_policy_specific,
    "warmup": golden_warmup,
    "parameters": golden_parameters,
    "ensemble": golden_ensemble,
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_to_pbtxt_matches_golden_file(case: str) -> None:
    expected = (GOLDEN / f"{case}.pbtxt").read_text(encoding="utf-8")
    assert GOLDEN_CASES[case]().to_pbtxt() == expected


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_from_pbtxt_of_golden_file_equals_built_config(case: str) -> None:
    parsed = read_config(GOLDEN / f"{case}.pbtxt")
    assert parsed == GOLDEN_CASES[case]()
    assert hash(parsed) == hash(GOLDEN_CASES[case]())


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_file_parses_with_protobuf_text_format(case: str) -> None:
    pb = text_format.Parse((GOLDEN / f"{case}.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert pb.name
    assert ModelConfig.from_proto(pb).to_proto() == pb


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_pbtxt_round_trip_is_stable(case: str) -> None:
    text = (GOLDEN / f"{case}.pbtxt").read_text()
    once = ModelConfig.from_pbtxt(text).to_pbtxt()
    assert once == text
    assert ModelConfig.from_pbtxt(once).to_pbtxt() == once


def test_to_pbtxt_writes_max_batch_size_zero_explicitly() -> None:
    text = golden_minimal_onnx().to_pbtxt()
    assert "max_batch_size: 0\n" in text.splitlines(keepends=True)
    assert text.index("platform:") < text.index("max_batch_size: 0") < text.index("input {")


def test_to_pbtxt_writes_max_batch_size_zero_when_only_name_and_backend_come_first() -> None:
    cfg = ModelConfig(name="py", backend="python", inputs=[fp32("a", 1)], outputs=[fp32("b", 1)])
    assert cfg.to_pbtxt().splitlines()[:3] == ['name: "py"', 'backend: "python"', "max_batch_size: 0"]


# ---------------------------------------------------------------- data types and enums


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("FP32", DataType.FP32),
        ("TYPE_FP32", DataType.FP32),
        ("fp32", DataType.FP32),
        ("float32", DataType.FP32),
        (np.float32, DataType.FP32),
        (np.dtype("float16"), DataType.FP16),
        ("BYTES", DataType.STRING),
        ("TYPE_STRING", DataType.STRING),
        (np.object_, DataType.STRING),
        (np.dtype("S5"), DataType.STRING),
        ("int64", DataType.INT64),
        (np.bool_, DataType.BOOL),
        ("bfloat16", DataType.BF16),
        (DataType.UINT8, DataType.UINT8),
    ],
)
def test_datatype_parse_accepts_triton_proto_and_numpy_names(value: object, expected: DataType) -> None:
    assert DataType.parse(value) is expected


def test_datatype_names_follow_proto_and_wire_protocol() -> None:
    assert DataType.FP32.proto_name == "TYPE_FP32"
    assert DataType.FP32.triton_name == "FP32"
    assert DataType.STRING.proto_name == "TYPE_STRING"
    assert DataType.STRING.triton_name == "BYTES"
    for data_type in DataType:
        assert data_type.proto_name in model_config_pb2.DataType.keys()  # noqa: SIM118 (an enum wrapper, not a dict)


@pytest.mark.parametrize("data_type", [t for t in DataType if t is not DataType.BF16])
def test_datatype_to_numpy_round_trips_through_from_numpy(data_type: DataType) -> None:
    assert DataType.from_numpy(data_type.to_numpy()) is data_type


def test_datatype_to_numpy_raises_config_error_when_bf16() -> None:
    with pytest.raises(ConfigError, match="BF16"):
        DataType.BF16.to_numpy()


@pytest.mark.parametrize("value", ["float128", "TYPE_INVALID", np.complex64, "complex"])
def test_datatype_parse_raises_config_error_when_type_unknown(value: object) -> None:
    with pytest.raises(ConfigError):
        DataType.parse(value)


def test_instance_kind_and_timeout_action_parse_proto_names() -> None:
    assert InstanceKind.parse("KIND_GPU") is InstanceKind.GPU
    assert InstanceKind.parse("model") is InstanceKind.MODEL
    assert TimeoutAction.parse("DELAY") is TimeoutAction.DELAY
    with pytest.raises(ConfigError, match="instance kind"):
        InstanceKind.parse("TPU")


# ---------------------------------------------------------------- what Triton accepts


def test_model_config_accepts_gpu_instance_group_without_gpu_ids() -> None:
    cfg = onnx_config(instance_groups=[InstanceGroup(count=2, kind="KIND_GPU")])
    assert cfg.instance_groups[0].kind is InstanceKind.GPU


def test_model_config_accepts_output_named_like_an_input() -> None:
    # Triton keeps inputs and outputs in separate namespaces (pass-through models do this).
    cfg = onnx_config(inputs=[fp32("x", 4)], outputs=[fp32("x", 4)])
    assert cfg.outputs[0].name == "x"


def test_model_config_accepts_string_tensors_and_matching_platform_backend_pair() -> None:
    cfg = onnx_config(backend="onnxruntime", inputs=[TensorSpec(name="t", dtype="BYTES", dims=[1])])
    assert cfg.inputs[0].dtype is DataType.STRING


def test_model_config_accepts_custom_backend_with_any_platform() -> None:
    assert onnx_config(backend="python").backend == "python"


def test_model_config_is_frozen_hashable_and_normalises_sequences() -> None:
    cfg = onnx_config(parameters={"k": "v"})
    assert isinstance(cfg.inputs, tuple)
    assert cfg.inputs[0].dims == (4,)
    assert {cfg: 1}[onnx_config(parameters={"k": "v"})] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "other"  # type: ignore[misc]


def test_replace_and_with_batching_return_checked_copies() -> None:
    cfg = onnx_config(max_batch_size=0)
    batched = cfg.with_batching(16, preferred=[8, 16], max_queue_delay_us=100)
    assert batched.max_batch_size == 16
    assert batched.dynamic_batching == DynamicBatching(preferred_batch_sizes=(8, 16), max_queue_delay_us=100)
    assert cfg.replace(name="other").name == "other"
    with pytest.raises(ConfigError, match="max_batch_size"):
        batched.replace(max_batch_size=0)


def test_from_pbtxt_reads_missing_instance_count_as_one_and_missing_kind_as_auto() -> None:
    text = (
        'name: "m" backend: "python" input [{name: "a" data_type: TYPE_FP32 dims: [1]}] instance_group [{}]'
    )
    cfg = ModelConfig.from_pbtxt(text)
    assert cfg.instance_groups == (InstanceGroup(count=1, kind=InstanceKind.AUTO),)


def test_from_pbtxt_keeps_custom_accelerators() -> None:
    cfg = onnx_config(
        optimization=Optimization(gpu_accelerators=[CustomAccelerator(name="cuda", params={"a": "1"})])
    )
    assert ModelConfig.from_pbtxt(cfg.to_pbtxt()) == cfg


# ---------------------------------------------------------------- what Triton rejects


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"name": ""}, "name"),
        ({"name": "a/b"}, "not a usable model name"),
        ({"name": "a b"}, "not a usable model name"),
        ({"max_batch_size": 2**31}, "more than 2147483647"),
        ({"platform": None}, "set platform"),
        ({"platform": "onnx"}, "unknown platform"),
        ({"backend": "pytorch"}, "served by backend 'onnxruntime'"),
        ({"platform": "ensemble", "backend": "onnxruntime"}, "no backend"),
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"inputs": [fp32("x", 4), fp32("x", 2)]}, "appears twice"),
        ({"outputs": [fp32("y", 2), fp32("y", 2)]}, "appears twice"),
        ({"outputs": [fp32("y", 2, optional=True)]}, "inputs only"),
        ({"max_batch_size": 0, "dynamic_batching": DynamicBatching()}, "dynamic_batching needs a batching"),
        ({"dynamic_batching": DynamicBatching(preferred_batch_sizes=[4, 16])}, r"exceed max_batch_size 8"),
        ({"max_batch_size": 0, "inputs": [fp32("x", 1, reshape=())]}, "empty reshape"),
        (
            {"ensemble_steps": [EnsembleStep(model_name="a", input_map={"i": "x"}, output_map={"o": "y"})]},
            "platform='ensemble'",
        ),
        ({"parameters": {"k": 1}}, "parameters"),
    ],
)
def test_model_config_raises_config_error_when_fields_disagree(
    changes: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        onnx_config(**changes)
    assert info.value.model is not None or changes.get("name") == ""


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "", "dims": [1]}, "name"),
        ({"name": "t", "dims": []}, "dims is empty"),
        ({"name": "t", "dims": [3, 0]}, r"dims\[1\] is 0"),
        ({"name": "t", "dims": [-2]}, r"dims\[0\] is -2"),
        ({"name": "t", "dims": [2, 3], "reshape": [5]}, "does not hold the same elements"),
        (
            {"name": "t", "dims": [2, 4, -1, 6], "reshape": [8, -1, 3, 2, 2]},
            "does not hold the same elements",
        ),
        ({"name": "t", "dims": [2, 3], "reshape": []}, "exactly one element"),
        ({"name": "t", "dims": [2], "reshape": [0]}, r"reshape\[0\] is 0"),
        ({"name": "t", "dims": [2.5]}, "integers"),
    ],
)
def test_tensor_spec_raises_config_error_when_shape_invalid(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TensorSpec(dtype="FP32", **kwargs)


def test_tensor_spec_accepts_reshape_with_matching_variable_segments() -> None:
    assert TensorSpec(name="t", dtype="FP32", dims=[2, 4, -1, 6], reshape=[8, -1, 1, 6]).reshape == (
        8,
        -1,
        1,
        6,
    )


def test_tensor_spec_raises_config_error_when_dtype_unknown() -> None:
    with pytest.raises(ConfigError, match="tensor 't': unknown data type"):
        TensorSpec(name="t", dtype="FP33", dims=[1])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preferred_batch_sizes": [0]}, "preferred batch size 0"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"priority_levels": 2, "default_priority_level": 0}, r"in 1\.\.2"),
        ({"priority_levels": 2, "default_priority_level": 3}, r"in 1\.\.2"),
        ({"default_priority_level": 1}, "priority_levels is 0"),
        (
            {"priority_levels": 2, "default_priority_level": 1, "priority_queue_policy": {3: QueuePolicy()}},
            "level 3",
        ),
        (
            {"priority_levels": 2, "default_priority_level": 1, "priority_queue_policy": {0: QueuePolicy()}},
            "level 0",
        ),
        ({"priority_queue_policy": {1: QueuePolicy()}}, "level 1"),
        (
            {"preserve_ordering": True, "priority_levels": 2, "default_priority_level": 1},
            "one priority level",
        ),
        (
            {
                "preserve_ordering": True,
                "default_queue_policy": QueuePolicy(timeout_action="DELAY", default_timeout_us=10),
            },
            "DELAY",
        ),
    ],
)
def test_dynamic_batching_raises_config_error_when_invalid(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DynamicBatching(**kwargs)


def test_queue_policy_raises_config_error_when_negative() -> None:
    with pytest.raises(ConfigError, match="default_timeout_us"):
        QueuePolicy(default_timeout_us=-5)
    with pytest.raises(ConfigError, match="max_queue_size"):
        QueuePolicy(max_queue_size=-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 0}, "count must be an integer >= 1"),
        ({"count": -2}, "count"),
        ({"kind": "GPU", "gpus": [0, -1]}, "GPU ids must be >= 0"),
        ({"kind": "CPU", "gpus": [0]}, "KIND_CPU can't list gpus"),
        ({"kind": "MODEL", "gpus": [1]}, "KIND_MODEL can't list gpus"),
        ({"kind": "TPU"}, "instance kind"),
    ],
)
def test_instance_group_raises_config_error_when_invalid(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        InstanceGroup(**kwargs)


def test_version_policy_raises_config_error_when_versions_invalid() -> None:
    with pytest.raises(ConfigError, match="at least one version"):
        VersionPolicy.specific()
    with pytest.raises(ConfigError, match=">= 1"):
        VersionPolicy.specific(0)
    with pytest.raises(ConfigError, match="num_versions"):
        VersionPolicy.latest(0)


def test_warmup_input_raises_config_error_unless_exactly_one_source() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        WarmupInput(dtype="FP32", dims=[1])
    with pytest.raises(ConfigError, match="exactly one"):
        WarmupInput(dtype="FP32", dims=[1], zero_data=True, random_data=True)
    with pytest.raises(ConfigError, match=r"dims\[0\] is -1"):
        WarmupInput(dtype="FP32", dims=[-1], zero_data=True)


def _zeros_warmup(batch_size: int, **inputs: WarmupInput) -> ModelWarmup:
    data = inputs or {"x": WarmupInput(dtype="FP32", dims=[4], zero_data=True)}
    return ModelWarmup(name="w", batch_size=batch_size, inputs=data)


@pytest.mark.parametrize(
    ("max_batch_size", "warmup", "match"),
    [
        (8, _zeros_warmup(9), "batch_size 9"),
        (0, _zeros_warmup(2), "1 for a model that does not batch"),
        (8, _zeros_warmup(1, z=WarmupInput(dtype="FP32", dims=[4], zero_data=True)), "not a model input"),
        (8, _zeros_warmup(1, x=WarmupInput(dtype="INT32", dims=[4], zero_data=True)), "dtype INT32"),
    ],
)
def test_model_config_raises_config_error_when_warmup_disagrees(
    max_batch_size: int, warmup: ModelWarmup, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        onnx_config(max_batch_size=max_batch_size, warmup=[warmup])


def test_model_config_raises_config_error_when_warmup_misses_a_required_input() -> None:
    with pytest.raises(ConfigError, match="required inputs"):
        onnx_config(inputs=[fp32("x", 4), fp32("extra", 1)], warmup=[_zeros_warmup(1)])


def test_model_warmup_raises_config_error_when_batch_size_below_one() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        _zeros_warmup(0)


def test_tensorrt_accelerator_raises_config_error_when_precision_unknown() -> None:
    with pytest.raises(ConfigError, match="precision_mode"):
        TensorRTAccelerator(precision_mode="FP8")
    with pytest.raises(ConfigError, match="unknown parameter"):
        TensorRTAccelerator.from_parameters({"precision": "FP16"})


def _ensemble(**changes: object) -> ModelConfig:
    fields: dict[str, object] = {
        "name": "ens",
        "platform": "ensemble",
        "inputs": [fp32("IN", 4)],
        "outputs": [fp32("OUT", 2)],
        "ensemble_steps": [
            EnsembleStep(model_name="a", input_map={"x": "IN"}, output_map={"y": "mid"}),
            EnsembleStep(model_name="b", input_map={"x": "mid"}, output_map={"y": "OUT"}),
        ],
    }
    fields.update(changes)
    return ModelConfig(**fields)


def test_ensemble_accepts_steps_listed_out_of_order() -> None:
    steps = _ensemble().ensemble_steps
    assert steps is not None
    assert _ensemble(ensemble_steps=list(reversed(steps))).is_ensemble


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"ensemble_steps": None}, "needs ensemble_steps"),
        ({"ensemble_steps": []}, "at least one step"),
        ({"instance_groups": [InstanceGroup()]}, "can't have instance_groups"),
        ({"optimization": Optimization()}, "can't have optimization"),
        ({"inputs": [fp32("IN", 4), fp32("UNUSED", 1)]}, "'UNUSED' is not read"),
        ({"outputs": [fp32("OUT", 2), fp32("NOWHERE", 1)]}, "'NOWHERE' is not written"),
        (
            {
                "ensemble_steps": [
                    EnsembleStep(model_name="a", input_map={"x": "IN"}, output_map={"y": "OUT"}),
                    EnsembleStep(model_name="b", input_map={"x": "IN"}, output_map={"y": "OUT"}),
                ]
            },
            "already written",
        ),
        (
            {
                "ensemble_steps": [
                    EnsembleStep(
                        model_name="a", input_map={"x": "IN", "h": "loop"}, output_map={"y": "loop"}
                    ),
                    EnsembleStep(model_name="b", input_map={"x": "loop"}, output_map={"y": "OUT"}),
                ]
            },
            "no ensemble input or earlier step provides",
        ),
        (
            {
                "ensemble_steps": [
                    EnsembleStep(model_name="a", input_map={"x": "IN"}, output_map={"y": "OUT", "z": "junk"}),
                ]
            },
            "never used",
        ),
    ],
)
def test_ensemble_raises_config_error_when_graph_invalid(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        _ensemble(**changes)


def test_ensemble_step_raises_config_error_when_maps_or_version_invalid() -> None:
    with pytest.raises(ConfigError, match="input_map"):
        EnsembleStep(model_name="a", input_map={}, output_map={"y": "Y"})
    with pytest.raises(ConfigError, match="model_version"):
        EnsembleStep(model_name="a", model_version=0, input_map={"x": "X"}, output_map={"y": "Y"})


# ---------------------------------------------------------------- protobuf and files


def test_from_proto_carries_fields_without_a_dataclass_field_through_unchanged() -> None:
    pb = golden_minimal_onnx().to_proto()
    pb.runtime = "model.py"
    pb.model_operations.op_library_filename.append("ops.so")
    pb.optimization.graph.level = 1
    pb.optimization.cuda.busy_wait_events = True
    pb.input[0].format = model_config_pb2.ModelInput.FORMAT_NCHW
    pb.output[0].label_filename = "labels.txt"
    pb.instance_group[0].rate_limiter.priority = 2
    pb.batch_input.add(target_name=["n"], source_input=["x"], data_type=model_config_pb2.TYPE_FP32)
    cfg = ModelConfig.from_proto(pb)
    assert "model_operations" in cfg.extra and "graph" in cfg.extra
    assert cfg.inputs[0].extra == "format: FORMAT_NCHW"
    assert cfg.to_proto() == pb
    assert ModelConfig.from_pbtxt(cfg.to_pbtxt()) == cfg


def test_from_proto_raises_config_error_when_data_type_missing() -> None:
    with pytest.raises(ConfigError, match="data_type is missing"):
        ModelConfig.from_pbtxt('name: "m" backend: "python" input [{ name: "a" dims: [1] }]')


def test_read_config_raises_config_error_naming_file_and_line_when_syntax_invalid(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "m"\nbackend: "python"\nmax_batch_size: "eight"\n')
    with pytest.raises(ConfigError, match=rf"{path}:3:\d+: invalid config.pbtxt"):
        read_config(path)


def test_read_config_raises_config_error_naming_file_when_config_invalid(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_text('name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: -1\n')
    with pytest.raises(ConfigError, match=f"{path}: model 'm': max_batch_size"):
        read_config(path)


def test_read_config_raises_config_error_when_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        read_config(tmp_path / "nope" / "config.pbtxt")


def test_write_config_replaces_file_atomically_and_reads_back(tmp_path: Path) -> None:
    model_dir = tmp_path / "repo" / "minimal_onnx"
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text("stale")
    written = write_config(golden_minimal_onnx(), model_dir)
    assert written == model_dir / "config.pbtxt"
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.pbtxt"]  # no temp file left behind
    assert read_config(model_dir) == golden_minimal_onnx()


def test_public_api_exports_exactly_all() -> None:
    exported = {name for name in dir(tc) if not name.startswith("_")}
    assert set(tc.__all__) <= exported
    for name in tc.__all__:
        assert getattr(tc, name) is not None
