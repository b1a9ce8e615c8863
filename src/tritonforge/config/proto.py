"""Conversion between the config dataclasses and ``model_config_pb2`` messages, both ways.

Reading refuses fields tritonforge does not model, rather than dropping them: a config read and
written back must mean what it meant.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as pb2

from tritonforge.config.enums import DataType, InstanceKind, TimeoutAction
from tritonforge.config.model import ModelConfig
from tritonforge.config.parts import (
    Accelerator,
    CustomAccelerator,
    DynamicBatching,
    EnsembleStep,
    InstanceGroup,
    ModelWarmup,
    OpenVINOAccelerator,
    Optimization,
    QueuePolicy,
    TensorRTAccelerator,
    TensorSpec,
    VersionPolicy,
    WarmupInput,
)
from tritonforge.errors import ConfigError

__all__ = ["config_from_proto", "config_to_proto"]

# The fields each message may carry for us to read it without losing anything.
_SUPPORTED: dict[str, set[str]] = {
    "ModelConfig": {
        "name",
        "platform",
        "backend",
        "version_policy",
        "max_batch_size",
        "input",
        "output",
        "optimization",
        "dynamic_batching",
        "ensemble_scheduling",
        "instance_group",
        "default_model_filename",
        "parameters",
        "model_warmup",
        "response_cache",
    },
    "ModelInput": {"name", "data_type", "dims", "reshape", "allow_ragged_batch", "optional"},
    "ModelOutput": {"name", "data_type", "dims", "reshape"},
    "ModelTensorReshape": {"shape"},
    "ModelVersionPolicy": {"latest", "all", "specific"},
    "Latest": {"num_versions"},
    "All": set(),
    "Specific": {"versions"},
    "ModelDynamicBatching": {
        "preferred_batch_size",
        "max_queue_delay_microseconds",
        "preserve_ordering",
        "priority_levels",
        "default_priority_level",
        "default_queue_policy",
        "priority_queue_policy",
    },
    "ModelQueuePolicy": {
        "timeout_action",
        "default_timeout_microseconds",
        "allow_timeout_override",
        "max_queue_size",
    },
    "ModelInstanceGroup": {"name", "kind", "count", "gpus"},
    "ModelWarmup": {"name", "batch_size", "inputs", "count"},
    "Input": {"data_type", "dims", "zero_data", "random_data", "input_data_file"},
    "ModelEnsembling": {"step"},
    "Step": {"model_name", "model_version", "input_map", "output_map"},
    "ModelOptimizationPolicy": {
        "cuda",
        "execution_accelerators",
        "input_pinned_memory",
        "output_pinned_memory",
    },
    "Cuda": {"graphs"},
    "ExecutionAccelerators": {"gpu_execution_accelerator", "cpu_execution_accelerator"},
    "Accelerator": {"name", "parameters"},
    "PinnedMemoryBuffer": {"enable"},
    "ModelParameter": {"string_value"},
    "ModelResponseCache": {"enable"},
}


def _unsupported_fields(message: Message, path: str = "") -> list[str]:
    found: list[str] = []
    supported = _SUPPORTED.get(message.DESCRIPTOR.name)
    for field, value in message.ListFields():
        where = f"{path}{field.name}"
        if supported is not None and field.name not in supported:
            found.append(where)
            continue
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for key, item in value.items():
                    found += _unsupported_fields(item, f"{where}[{key!r}].")
        elif field.is_repeated:
            for index, item in enumerate(value):
                found += _unsupported_fields(item, f"{where}[{index}].")
        else:
            found += _unsupported_fields(value, f"{where}.")
    return found


# ---------------------------------------------------------------- dataclass -> protobuf


def config_to_proto(config: ModelConfig) -> Any:
    """``ModelConfig`` -> ``model_config_pb2.ModelConfig``."""
    pb = pb2.ModelConfig(name=config.name, max_batch_size=config.max_batch_size)
    if config.platform:
        pb.platform = config.platform
    if config.backend:
        pb.backend = config.backend
    if config.version_policy is not None:
        _version_policy_to_proto(config.version_policy, pb.version_policy)
    for spec in config.inputs:
        _tensor_to_proto(spec, pb.input.add())
    for spec in config.outputs:
        _tensor_to_proto(spec, pb.output.add())
    if config.dynamic_batching is not None:
        _batching_to_proto(config.dynamic_batching, pb.dynamic_batching)
    for group in config.instance_groups:
        item = pb.instance_group.add(count=group.count, gpus=group.gpus)
        item.kind = pb2.ModelInstanceGroup.Kind.Value(group.kind.proto_name)
        if group.name:
            item.name = group.name
    if config.optimization is not None:
        _optimization_to_proto(config.optimization, pb.optimization)
    if config.default_model_filename:
        pb.default_model_filename = config.default_model_filename
    for key, value in config.parameters.items():
        pb.parameters[key].string_value = value
    for warmup in config.warmup:
        _warmup_to_proto(warmup, pb.model_warmup.add())
    if config.response_cache:
        pb.response_cache.enable = True
    if config.ensemble_steps is not None:
        pb.ensemble_scheduling.SetInParent()
        for step in config.ensemble_steps:
            pb.ensemble_scheduling.step.add(
                model_name=step.model_name,
                model_version=step.model_version,
                input_map=dict(step.input_map),
                output_map=dict(step.output_map),
            )
    return pb


def _dtype_to_proto(dtype: DataType) -> int:
    return pb2.DataType.Value(dtype.proto_name)


def _tensor_to_proto(spec: TensorSpec, pb: Any) -> None:
    pb.name = spec.name
    pb.data_type = _dtype_to_proto(spec.dtype)
    pb.dims.extend(spec.dims)
    if spec.reshape is not None:
        # SetInParent keeps an empty reshape (a scalar) present, which differs from no reshape.
        pb.reshape.SetInParent()
        pb.reshape.shape.extend(spec.reshape)
    if spec.optional:
        pb.optional = True
    if spec.allow_ragged_batch:
        pb.allow_ragged_batch = True


def _version_policy_to_proto(policy: VersionPolicy, pb: Any) -> None:
    if policy.kind == "latest":
        pb.latest.num_versions = policy.num_versions
    elif policy.kind == "all":
        pb.all.SetInParent()
    else:
        pb.specific.versions.extend(policy.versions)


def _queue_policy_to_proto(policy: QueuePolicy, pb: Any) -> None:
    pb.SetInParent()
    pb.timeout_action = pb2.ModelQueuePolicy.TimeoutAction.Value(policy.timeout_action.proto_name)
    pb.default_timeout_microseconds = policy.default_timeout_us
    pb.allow_timeout_override = policy.allow_timeout_override
    pb.max_queue_size = policy.max_queue_size


def _batching_to_proto(batching: DynamicBatching, pb: Any) -> None:
    pb.SetInParent()
    pb.preferred_batch_size.extend(batching.preferred_batch_sizes)
    pb.max_queue_delay_microseconds = batching.max_queue_delay_us
    pb.preserve_ordering = batching.preserve_ordering
    pb.priority_levels = batching.priority_levels
    pb.default_priority_level = batching.default_priority_level
    if batching.default_queue_policy is not None:
        _queue_policy_to_proto(batching.default_queue_policy, pb.default_queue_policy)
    for level, policy in batching.priority_queue_policy.items():
        _queue_policy_to_proto(policy, pb.priority_queue_policy[level])


def _optimization_to_proto(opt: Optimization, pb: Any) -> None:
    pb.SetInParent()
    if opt.cuda_graphs:
        pb.cuda.graphs = True
    for accelerators, target in (
        (opt.gpu_accelerators, pb.execution_accelerators.gpu_execution_accelerator),
        (opt.cpu_accelerators, pb.execution_accelerators.cpu_execution_accelerator),
    ):
        for acc in accelerators:
            target.add(name=acc.name, parameters=acc.parameters())
    # On is Triton's default; write the flag only when it changes something.
    if not opt.input_pinned_memory:
        pb.input_pinned_memory.enable = False
        pb.input_pinned_memory.SetInParent()
    if not opt.output_pinned_memory:
        pb.output_pinned_memory.enable = False
        pb.output_pinned_memory.SetInParent()


def _warmup_to_proto(warmup: ModelWarmup, pb: Any) -> None:
    pb.name = warmup.name
    pb.batch_size = warmup.batch_size
    # Triton runs a sample once for count 0 or 1; writing 1 would only add noise.
    if warmup.count > 1:
        pb.count = warmup.count
    for name, data in warmup.inputs.items():
        item = pb.inputs[name]
        item.data_type = _dtype_to_proto(data.dtype)
        item.dims.extend(data.dims)
        if data.zero_data:
            item.zero_data = True
        elif data.random_data:
            item.random_data = True
        else:
            assert data.input_data_file is not None
            item.input_data_file = data.input_data_file


# ---------------------------------------------------------------- protobuf -> dataclass


def config_from_proto(pb: Any) -> ModelConfig:
    """``model_config_pb2.ModelConfig`` -> ``ModelConfig``.

    Raises:
        ConfigError: for fields tritonforge does not model, and for invalid configs.
    """
    if not isinstance(pb, pb2.ModelConfig):
        raise ConfigError(f"expected a model_config_pb2.ModelConfig, got {type(pb).__name__}")
    unsupported = _unsupported_fields(pb)
    if unsupported:
        raise ConfigError(
            f"model {pb.name!r}: tritonforge.config does not support {', '.join(unsupported)} yet; "
            "remove them or extend tritonforge.config",
            model=pb.name or None,
        )
    ensemble = pb.ensemble_scheduling if pb.HasField("ensemble_scheduling") else None
    return ModelConfig(
        name=pb.name,
        platform=pb.platform or None,
        backend=pb.backend or None,
        max_batch_size=pb.max_batch_size,
        inputs=tuple(_tensor_from_proto(t) for t in pb.input),
        outputs=tuple(_tensor_from_proto(t) for t in pb.output),
        version_policy=_version_policy_from_proto(pb.version_policy)
        if pb.HasField("version_policy")
        else None,
        dynamic_batching=_batching_from_proto(pb.dynamic_batching)
        if pb.HasField("dynamic_batching")
        else None,
        instance_groups=tuple(_instance_group_from_proto(g) for g in pb.instance_group),
        optimization=_optimization_from_proto(pb.optimization) if pb.HasField("optimization") else None,
        default_model_filename=pb.default_model_filename or None,
        parameters={key: value.string_value for key, value in sorted(pb.parameters.items())},
        warmup=tuple(_warmup_from_proto(w) for w in pb.model_warmup),
        response_cache=pb.response_cache.enable,
        ensemble_steps=None
        if ensemble is None
        else tuple(
            EnsembleStep(
                model_name=step.model_name,
                model_version=step.model_version,
                input_map=dict(sorted(step.input_map.items())),
                output_map=dict(sorted(step.output_map.items())),
            )
            for step in ensemble.step
        ),
    )


def _dtype_from_proto(value: int, where: str) -> DataType:
    name = pb2.DataType.Name(value)
    if name == "TYPE_INVALID":
        raise ConfigError(f"{where}: data_type is missing; set it, e.g. data_type: TYPE_FP32")
    return DataType.parse(name)


def _tensor_from_proto(pb: Any) -> TensorSpec:
    return TensorSpec(
        name=pb.name,
        dtype=_dtype_from_proto(pb.data_type, f"tensor {pb.name!r}"),
        dims=tuple(pb.dims),
        reshape=tuple(pb.reshape.shape) if pb.HasField("reshape") else None,
        optional=getattr(pb, "optional", False),
        allow_ragged_batch=getattr(pb, "allow_ragged_batch", False),
    )


def _version_policy_from_proto(pb: Any) -> VersionPolicy:
    choice = pb.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy.all()
    if choice == "specific":
        return VersionPolicy.specific(*pb.specific.versions)
    # An empty version_policy {} or latest {} means Triton's default, the single latest version.
    return VersionPolicy.latest(pb.latest.num_versions or 1)


def _queue_policy_from_proto(pb: Any) -> QueuePolicy:
    return QueuePolicy(
        timeout_action=TimeoutAction.parse(pb2.ModelQueuePolicy.TimeoutAction.Name(pb.timeout_action)),
        default_timeout_us=pb.default_timeout_microseconds,
        allow_timeout_override=pb.allow_timeout_override,
        max_queue_size=pb.max_queue_size,
    )


def _batching_from_proto(pb: Any) -> DynamicBatching:
    return DynamicBatching(
        preferred_batch_sizes=tuple(pb.preferred_batch_size),
        max_queue_delay_us=pb.max_queue_delay_microseconds,
        preserve_ordering=pb.preserve_ordering,
        priority_levels=pb.priority_levels,
        default_priority_level=pb.default_priority_level,
        default_queue_policy=(
            _queue_policy_from_proto(pb.default_queue_policy) if pb.HasField("default_queue_policy") else None
        ),
        priority_queue_policy={
            level: _queue_policy_from_proto(policy)
            for level, policy in sorted(pb.priority_queue_policy.items())
        },
    )


def _instance_group_from_proto(pb: Any) -> InstanceGroup:
    return InstanceGroup(
        name=pb.name,
        kind=InstanceKind.parse(pb2.ModelInstanceGroup.Kind.Name(pb.kind)),
        # Triton reads a missing count as 1.
        count=pb.count or 1,
        gpus=tuple(pb.gpus),
    )


def _accelerator_from_proto(pb: Any) -> Accelerator:
    params = dict(sorted(pb.parameters.items()))
    if pb.name == TensorRTAccelerator.name:
        return TensorRTAccelerator.from_parameters(params)
    if pb.name == OpenVINOAccelerator.name and not params:
        return OpenVINOAccelerator()
    return CustomAccelerator(name=pb.name, params=params)


def _optimization_from_proto(pb: Any) -> Optimization:
    accelerators = pb.execution_accelerators
    return Optimization(
        gpu_accelerators=tuple(_accelerator_from_proto(a) for a in accelerators.gpu_execution_accelerator),
        cpu_accelerators=tuple(_accelerator_from_proto(a) for a in accelerators.cpu_execution_accelerator),
        cuda_graphs=pb.cuda.graphs,
        input_pinned_memory=pb.input_pinned_memory.enable if pb.HasField("input_pinned_memory") else True,
        output_pinned_memory=pb.output_pinned_memory.enable if pb.HasField("output_pinned_memory") else True,
    )


def _warmup_from_proto(pb: Any) -> ModelWarmup:
    inputs = {}
    for name, item in sorted(pb.inputs.items()):
        source = item.WhichOneof("input_data_type")
        inputs[name] = WarmupInput(
            dtype=_dtype_from_proto(item.data_type, f"warmup {pb.name!r} input {name!r}"),
            dims=tuple(item.dims),
            zero_data=source == "zero_data",
            random_data=source == "random_data",
            input_data_file=item.input_data_file if source == "input_data_file" else None,
        )
    return ModelWarmup(name=pb.name, batch_size=pb.batch_size, count=pb.count or 1, inputs=inputs)
