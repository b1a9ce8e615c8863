"""Conversion between the config dataclasses and ``model_config_pb2`` messages, both ways.

Nothing is lost on the way: a field with a dataclass field of its own is converted, and every other
field of ``model_config.proto`` (set by a newer Triton, or simply not modelled here) is kept as
config.pbtxt text in the ``extra`` of the nearest dataclass and merged back when writing (that
bookkeeping, and ``check_extras``, re-exported here, live in ``_extras.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tritonclient.grpc import model_config_pb2 as pb2

from tritonforge.config._extras import _merge_extra, _residual, _to_text, check_extras
from tritonforge.config._strictness import lenient
from tritonforge.config.enums import ControlKind, DataType, InstanceKind, TimeoutAction
from tritonforge.config.model import ModelConfig
from tritonforge.config.optimization import Accelerator
from tritonforge.config.parts import (
    CustomAccelerator,
    DynamicBatching,
    EnsembleStep,
    InstanceGroup,
    ModelWarmup,
    OpenVINOAccelerator,
    Optimization,
    QueuePolicy,
    RepositoryAgent,
    TensorRTAccelerator,
    TensorSpec,
    VersionPolicy,
    WarmupInput,
)
from tritonforge.config.sequence import (
    ControlInput,
    DirectStrategy,
    InitialState,
    OldestStrategy,
    SequenceBatching,
    SequenceControl,
    SequenceState,
)
from tritonforge.errors import ConfigError

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

__all__ = ["check_extras", "config_from_proto", "config_to_proto"]

# ---------------------------------------------------------------- dataclass -> protobuf


def config_to_proto(config: ModelConfig) -> pb2.ModelConfig:
    """``ModelConfig`` -> ``model_config_pb2.ModelConfig``.

    Raises:
        ConfigError: a number too large for its field (int32 / int64 / uint64 in model_config.proto).
    """
    try:
        return _config_to_proto(config)
    except (ValueError, TypeError) as exc:  # protobuf: "Value out of range: 2147483648"
        raise ConfigError(
            f"model {config.name!r}: {exc}, too large for its field in model_config.proto (max_batch_size "
            "and counts are int32, dims and versions int64); use a smaller value",
            model=config.name,
        ) from None


def _config_to_proto(config: ModelConfig) -> pb2.ModelConfig:
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
        _merge_extra(item, group.extra)
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
            item = pb.ensemble_scheduling.step.add(
                model_name=step.model_name,
                model_version=step.model_version,
                input_map=dict(step.input_map),
                output_map=dict(step.output_map),
            )
            _merge_extra(item, step.extra)
    if config.sequence_batching is not None:
        _sequence_to_proto(config.sequence_batching, pb.sequence_batching)
    if config.decoupled:
        pb.model_transaction_policy.decoupled = True
    if config.repository_agents:
        for agent in config.repository_agents:
            pb.model_repository_agents.agents.add(name=agent.name, parameters=dict(agent.parameters))
    _merge_extra(pb, config.extra)
    return pb


def _sequence_to_proto(seq: SequenceBatching, pb: pb2.ModelSequenceBatching) -> None:
    pb.SetInParent()
    if isinstance(seq.strategy, DirectStrategy):
        pb.direct.SetInParent()
        pb.direct.max_queue_delay_microseconds = seq.strategy.max_queue_delay_us
        pb.direct.minimum_slot_utilization = seq.strategy.minimum_slot_utilization
    elif isinstance(seq.strategy, OldestStrategy):
        pb.oldest.SetInParent()
        pb.oldest.max_candidate_sequences = seq.strategy.max_candidate_sequences
        pb.oldest.preferred_batch_size.extend(seq.strategy.preferred_batch_sizes)
        pb.oldest.max_queue_delay_microseconds = seq.strategy.max_queue_delay_us
        pb.oldest.preserve_ordering = seq.strategy.preserve_ordering
    pb.max_sequence_idle_microseconds = seq.max_sequence_idle_us
    for control_input in seq.control_inputs:
        item = pb.control_input.add(name=control_input.name)
        for control in control_input.controls:
            entry = item.control.add(
                int32_false_true=control.int32_false_true,
                fp32_false_true=control.fp32_false_true,
                bool_false_true=control.bool_false_true,
            )
            entry.kind = pb2.ModelSequenceBatching.Control.Kind.Value(control.kind.proto_name)
            if control.dtype is not None:
                entry.data_type = _dtype_to_proto(control.dtype)
    for state in seq.states:
        item = pb.state.add(
            input_name=state.input_name,
            output_name=state.output_name,
            data_type=0 if state.dtype is None else _dtype_to_proto(state.dtype),
            dims=state.dims,
            use_same_buffer_for_input_output=state.use_same_buffer_for_input_output,
            use_growable_memory=state.use_growable_memory,
        )
        for initial in state.initial_states:
            entry = item.initial_state.add(name=initial.name, data_type=_dtype_to_proto(initial.dtype))
            entry.dims.extend(initial.dims)
            if initial.zero_data:
                entry.zero_data = True
            else:
                assert initial.data_file is not None
                entry.data_file = initial.data_file
    pb.iterative_sequence = seq.iterative


def _dtype_to_proto(dtype: DataType) -> int:
    return pb2.DataType.Value(dtype.proto_name)


def _tensor_to_proto(spec: TensorSpec, pb: pb2.ModelInput | pb2.ModelOutput) -> None:
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
    if spec.is_shape_tensor:
        pb.is_shape_tensor = True
    _merge_extra(pb, spec.extra)


def _version_policy_to_proto(policy: VersionPolicy, pb: pb2.ModelVersionPolicy) -> None:
    if policy.kind == "latest":
        pb.latest.num_versions = policy.num_versions
    elif policy.kind == "all":
        pb.all.SetInParent()
    else:
        pb.specific.versions.extend(policy.versions)


def _queue_policy_to_proto(policy: QueuePolicy, pb: pb2.ModelQueuePolicy) -> None:
    pb.SetInParent()
    pb.timeout_action = pb2.ModelQueuePolicy.TimeoutAction.Value(policy.timeout_action.proto_name)
    pb.default_timeout_microseconds = policy.default_timeout_us
    pb.allow_timeout_override = policy.allow_timeout_override
    pb.max_queue_size = policy.max_queue_size


def _batching_to_proto(batching: DynamicBatching, pb: pb2.ModelDynamicBatching) -> None:
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


def _optimization_to_proto(opt: Optimization, pb: pb2.ModelOptimizationPolicy) -> None:
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


def _warmup_to_proto(warmup: ModelWarmup, pb: pb2.ModelWarmup) -> None:
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


def config_from_proto(pb: pb2.ModelConfig) -> ModelConfig:
    """``model_config_pb2.ModelConfig`` -> ``ModelConfig``, keeping every field (unmodelled ones in
    ``extra``). What Triton accepts but looks wrong goes to the config's ``warnings``.

    Raises:
        ConfigError: for what Triton would refuse, naming the model and the field.
    """
    if not isinstance(pb, pb2.ModelConfig):
        raise ConfigError(f"expected a model_config_pb2.ModelConfig, got {type(pb).__name__}")
    try:
        with lenient() as notes:
            config = _config_from_proto(pb)
    except ConfigError as exc:
        if exc.model is not None or not pb.name:
            raise
        raise ConfigError(f"model {pb.name!r}: {exc.message}", model=pb.name) from exc
    prefix = f"model {pb.name!r}: "
    object.__setattr__(
        config, "_warnings", tuple(n if n.startswith(prefix) else prefix + n for n in dict.fromkeys(notes))
    )
    return config


def _config_from_proto(pb: pb2.ModelConfig) -> ModelConfig:
    ensemble = pb.ensemble_scheduling if pb.HasField("ensemble_scheduling") else None
    policy = pb.model_repository_agents
    return ModelConfig(
        name=pb.name,
        platform=pb.platform or None,
        backend=pb.backend or None,
        max_batch_size=pb.max_batch_size,
        inputs=tuple(_tensor_from_proto(t, "input") for t in pb.input),
        outputs=tuple(_tensor_from_proto(t, "output") for t in pb.output),
        version_policy=_version_policy_from_proto(pb.version_policy)
        if pb.HasField("version_policy")
        else None,
        dynamic_batching=_batching_from_proto(pb.dynamic_batching)
        if pb.HasField("dynamic_batching")
        else None,
        sequence_batching=_sequence_from_proto(pb.sequence_batching)
        if pb.HasField("sequence_batching")
        else None,
        instance_groups=tuple(_instance_group_from_proto(g) for g in pb.instance_group),
        optimization=_optimization_from_proto(pb.optimization) if pb.HasField("optimization") else None,
        default_model_filename=pb.default_model_filename or None,
        parameters={key: value.string_value for key, value in sorted(pb.parameters.items())},
        warmup=tuple(_warmup_from_proto(w) for w in pb.model_warmup),
        response_cache=pb.response_cache.enable,
        decoupled=pb.model_transaction_policy.decoupled,
        repository_agents=tuple(
            RepositoryAgent(name=agent.name, parameters=dict(sorted(agent.parameters.items())))
            for agent in policy.agents
        ),
        ensemble_steps=None
        if ensemble is None
        else tuple(
            EnsembleStep(
                model_name=step.model_name,
                model_version=step.model_version,
                input_map=dict(sorted(step.input_map.items())),
                output_map=dict(sorted(step.output_map.items())),
                extra=_to_text(_residual(step)),
            )
            for step in ensemble.step
        ),
        extra=_to_text(_residual(pb)),
    )


def _enum_name(enum_type: EnumTypeWrapper, value: int, where: str, field: str) -> str:
    """The name of an enum value; a number the enum does not define is our ConfigError, not ValueError."""
    try:
        return str(enum_type.Name(value))
    except ValueError:
        known = ", ".join(name for name in enum_type.keys() if not name.endswith("INVALID"))  # noqa: SIM118
        raise ConfigError(f"{where}: {field} {value} is not one Triton knows; use one of {known}") from None


def _dtype_from_proto(value: int, where: str, field: str = "data_type") -> DataType:
    name = _enum_name(pb2.DataType, value, where, field)
    if name == "TYPE_INVALID":
        raise ConfigError(f"{where}: {field} is missing; set it, e.g. {field}: TYPE_FP32")
    return DataType.parse(name)


def _tensor_from_proto(pb: pb2.ModelInput | pb2.ModelOutput, kind: str) -> TensorSpec:
    where = f"{kind} {pb.name!r}"
    return TensorSpec(
        name=pb.name,
        dtype=_dtype_from_proto(pb.data_type, where),
        dims=tuple(pb.dims),
        reshape=tuple(pb.reshape.shape) if pb.HasField("reshape") else None,
        optional=getattr(pb, "optional", False),
        allow_ragged_batch=getattr(pb, "allow_ragged_batch", False),
        is_shape_tensor=pb.is_shape_tensor,
        extra=_to_text(_residual(pb)),
    )


def _sequence_from_proto(pb: pb2.ModelSequenceBatching) -> SequenceBatching:
    choice = pb.WhichOneof("strategy_choice")
    strategy: DirectStrategy | OldestStrategy | None = None
    if choice == "direct":
        strategy = DirectStrategy(
            max_queue_delay_us=pb.direct.max_queue_delay_microseconds,
            minimum_slot_utilization=pb.direct.minimum_slot_utilization,
        )
    elif choice == "oldest":
        strategy = OldestStrategy(
            max_candidate_sequences=pb.oldest.max_candidate_sequences,
            preferred_batch_sizes=tuple(pb.oldest.preferred_batch_size),
            max_queue_delay_us=pb.oldest.max_queue_delay_microseconds,
            preserve_ordering=pb.oldest.preserve_ordering,
        )
    control_inputs = []
    for item in pb.control_input:
        controls = []
        for control in item.control:
            where = f"sequence control input {item.name!r}"
            kind = _enum_name(pb2.ModelSequenceBatching.Control.Kind, control.kind, where, "kind")
            dtype_name = _enum_name(pb2.DataType, control.data_type, where, "data_type")
            controls.append(
                SequenceControl(
                    kind=ControlKind.parse(kind),
                    int32_false_true=tuple(control.int32_false_true),
                    fp32_false_true=tuple(control.fp32_false_true),
                    bool_false_true=tuple(control.bool_false_true),
                    dtype=None if dtype_name == "TYPE_INVALID" else DataType.parse(dtype_name),
                )
            )
        control_inputs.append(ControlInput(name=item.name, controls=tuple(controls)))
    states = []
    for state in pb.state:
        where = f"sequence state {state.input_name!r}"
        initial = tuple(
            InitialState(
                name=init.name,
                dtype=_dtype_from_proto(init.data_type, f"{where} initial state {init.name!r}"),
                dims=tuple(init.dims),
                zero_data=init.WhichOneof("state_data") == "zero_data",
                data_file=init.data_file if init.WhichOneof("state_data") == "data_file" else None,
            )
            for init in state.initial_state
        )
        states.append(
            SequenceState(
                input_name=state.input_name,
                output_name=state.output_name,
                dtype=None if state.data_type == 0 else _dtype_from_proto(state.data_type, where),
                dims=tuple(state.dims),
                initial_states=initial,
                use_same_buffer_for_input_output=state.use_same_buffer_for_input_output,
                use_growable_memory=state.use_growable_memory,
            )
        )
    return SequenceBatching(
        strategy=strategy,
        max_sequence_idle_us=pb.max_sequence_idle_microseconds,
        control_inputs=tuple(control_inputs),
        states=tuple(states),
        iterative=pb.iterative_sequence,
    )


def _version_policy_from_proto(pb: pb2.ModelVersionPolicy) -> VersionPolicy:
    choice = pb.WhichOneof("policy_choice")
    if choice == "all":
        return VersionPolicy.all()
    if choice == "specific":
        return VersionPolicy.specific(*pb.specific.versions)
    if choice == "latest" and pb.latest.num_versions == 0:
        # Seen with Triton 2.51: "at least one version must be available under the version policy".
        raise ConfigError(
            "version_policy latest { num_versions: 0 } (or latest { }) serves no version, and Triton refuses "
            "the model; write latest { num_versions: 1 }, or leave version_policy out"
        )
    # An empty version_policy {} means Triton's default, the single latest version.
    return VersionPolicy.latest(pb.latest.num_versions or 1)


def _queue_policy_from_proto(pb: pb2.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(
        timeout_action=TimeoutAction.parse(
            _enum_name(
                pb2.ModelQueuePolicy.TimeoutAction, pb.timeout_action, "queue policy", "timeout_action"
            )
        ),
        default_timeout_us=pb.default_timeout_microseconds,
        allow_timeout_override=pb.allow_timeout_override,
        max_queue_size=pb.max_queue_size,
    )


def _batching_from_proto(pb: pb2.ModelDynamicBatching) -> DynamicBatching:
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


def _instance_group_from_proto(pb: pb2.ModelInstanceGroup) -> InstanceGroup:
    where = f"instance group {pb.name!r}" if pb.name else "instance group"
    return InstanceGroup(
        name=pb.name,
        kind=InstanceKind.parse(_enum_name(pb2.ModelInstanceGroup.Kind, pb.kind, where, "kind")),
        # Triton reads a missing count as 1.
        count=pb.count or 1,
        gpus=tuple(pb.gpus),
        extra=_to_text(_residual(pb)),
    )


def _accelerator_from_proto(pb: pb2.ModelOptimizationPolicy.ExecutionAccelerators.Accelerator) -> Accelerator:
    params = dict(sorted(pb.parameters.items()))
    if pb.name == TensorRTAccelerator.name:
        return TensorRTAccelerator.from_parameters(params)
    if pb.name == OpenVINOAccelerator.name and not params:
        return OpenVINOAccelerator()
    return CustomAccelerator(name=pb.name, params=params)


def _optimization_from_proto(pb: pb2.ModelOptimizationPolicy) -> Optimization:
    accelerators = pb.execution_accelerators
    return Optimization(
        gpu_accelerators=tuple(_accelerator_from_proto(a) for a in accelerators.gpu_execution_accelerator),
        cpu_accelerators=tuple(_accelerator_from_proto(a) for a in accelerators.cpu_execution_accelerator),
        cuda_graphs=pb.cuda.graphs,
        input_pinned_memory=pb.input_pinned_memory.enable if pb.HasField("input_pinned_memory") else True,
        output_pinned_memory=pb.output_pinned_memory.enable if pb.HasField("output_pinned_memory") else True,
    )


def _warmup_from_proto(pb: pb2.ModelWarmup) -> ModelWarmup:
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
