"""``ModelConfig``: one model's config.pbtxt as a frozen dataclass."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tritonclient.grpc import model_config_pb2 as pb2

from tritonforge.config._fields import canonical_extra
from tritonforge.config._frozen import FrozenDict
from tritonforge.config.parts import (
    DynamicBatching,
    EnsembleStep,
    InstanceGroup,
    ModelWarmup,
    Optimization,
    RepositoryAgent,
    TensorSpec,
    VersionPolicy,
)
from tritonforge.config.sequence import SequenceBatching
from tritonforge.config.validate import validate_config
from tritonforge.errors import ConfigError

__all__ = ["ModelConfig"]


def _tuple_of(owner: str, field: str, values: Any, cls: type) -> tuple[Any, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, tuple, list)):
        raise ConfigError(f"{owner}: {field} must be a sequence of {cls.__name__}, got {values!r}")
    items = tuple(values)
    for item in items:
        if not isinstance(item, cls):
            raise ConfigError(f"{owner}: {field} must hold {cls.__name__} objects, got {item!r}")
    return items


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A Triton model config (``config.pbtxt``), checked as Triton would check it when loading.

    Give ``platform`` (``onnxruntime_onnx``, ``pytorch_libtorch``, ``tensorrt_plan``,
    ``tensorflow_savedmodel``, ``tensorflow_graphdef``, ``ensemble``), or ``backend`` (``onnxruntime``,
    ``python``, ...), or both when they agree. ``max_batch_size=0`` means the model does not batch and
    its tensors' dims are full shapes; otherwise dims leave out the batch dimension.

    Every field of Triton's ``model_config.proto`` is kept: the common ones as fields here (a stateful
    model's ``sequence_batching``, a ``decoupled`` model's transaction policy, ``repository_agents``, ...),
    and the rest in ``extra``, config.pbtxt text carried through unchanged (e.g.
    ``extra='model_operations { op_library_filename: "ops.so" }'``). Inputs and outputs may be empty for a
    backend that auto-completes them (the python backend's ``auto_complete_config``, ONNX Runtime).

    Built in code, a config is refused for anything Triton would refuse and for what is surely a mistake
    though Triton loads it (two inputs of one name, a dynamic batcher on a model that does not batch).
    Read from text or protobuf, only what Triton refuses raises; the rest is listed in :attr:`warnings`.

    Example:
        >>> cfg = ModelConfig(
        ...     name="resnet",
        ...     platform="onnxruntime_onnx",
        ...     max_batch_size=8,
        ...     inputs=[TensorSpec(name="x", dtype="FP32", dims=[3, 224, 224])],
        ...     outputs=[TensorSpec(name="y", dtype="FP32", dims=[1000])],
        ...     dynamic_batching=DynamicBatching(preferred_batch_sizes=[4, 8]),
        ... )
        >>> ModelConfig.from_pbtxt(cfg.to_pbtxt()) == cfg
        True

    Raises:
        ConfigError: naming the model and field, for anything Triton would reject.
    """

    name: str
    inputs: Sequence[TensorSpec] = ()
    outputs: Sequence[TensorSpec] = ()
    max_batch_size: int = 0
    platform: str | None = None
    backend: str | None = None
    dynamic_batching: DynamicBatching | None = None
    instance_groups: Sequence[InstanceGroup] = ()
    version_policy: VersionPolicy | None = None
    warmup: Sequence[ModelWarmup] = ()
    response_cache: bool = False
    parameters: Mapping[str, str] = dataclasses.field(default_factory=FrozenDict)
    optimization: Optimization | None = None
    default_model_filename: str | None = None
    ensemble_steps: Sequence[EnsembleStep] | None = None
    sequence_batching: SequenceBatching | None = None
    decoupled: bool = False
    repository_agents: Sequence[RepositoryAgent] = ()
    extra: str = ""

    def __post_init__(self) -> None:
        owner = f"model {self.name!r}"
        object.__setattr__(self, "inputs", _tuple_of(owner, "inputs", self.inputs, TensorSpec))
        object.__setattr__(self, "outputs", _tuple_of(owner, "outputs", self.outputs, TensorSpec))
        groups = _tuple_of(owner, "instance_groups", self.instance_groups, InstanceGroup)
        object.__setattr__(self, "instance_groups", groups)
        object.__setattr__(self, "warmup", _tuple_of(owner, "warmup", self.warmup, ModelWarmup))
        if self.ensemble_steps is not None:
            steps = _tuple_of(owner, "ensemble_steps", self.ensemble_steps, EnsembleStep)
            object.__setattr__(self, "ensemble_steps", steps)
        agents = _tuple_of(owner, "repository_agents", self.repository_agents, RepositoryAgent)
        object.__setattr__(self, "repository_agents", agents)
        object.__setattr__(self, "parameters", FrozenDict(self.parameters))
        object.__setattr__(self, "extra", canonical_extra(owner, self.extra, pb2.ModelConfig))
        for field, cls in (
            ("dynamic_batching", DynamicBatching),
            ("sequence_batching", SequenceBatching),
            ("version_policy", VersionPolicy),
            ("optimization", Optimization),
        ):
            value = getattr(self, field)
            if value is not None and not isinstance(value, cls):
                raise ConfigError(
                    f"{owner}: {field} must be a {cls.__name__} or None, got {value!r}", model=self.name
                )
        self.validate()
        parts: tuple[TensorSpec | InstanceGroup | EnsembleStep, ...] = (
            *self.inputs,
            *self.outputs,
            *self.instance_groups,
            *(self.ensemble_steps or ()),
        )
        if self.extra or any(part.extra for part in parts):
            # The carried-through text must parse and must not set a field modelled here.
            from tritonforge.config.proto import check_extras

            check_extras(self)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What Triton accepts in this config but is likely a mistake (set when read from text/protobuf)."""
        return tuple(getattr(self, "_warnings", ()))

    def validate(self) -> None:
        """Check the fields against each other; ``__post_init__`` already calls this.

        Raises:
            ConfigError: for the first thing Triton would reject.
        """
        validate_config(self)

    @property
    def is_ensemble(self) -> bool:
        """Whether this is an ensemble (``platform: "ensemble"``)."""
        return self.ensemble_steps is not None

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed, checked again.

        Example:
            >>> cfg.replace(max_batch_size=16)  # doctest: +SKIP
        """
        return dataclasses.replace(self, **changes)

    def with_batching(
        self,
        max_batch_size: int,
        *,
        dynamic: bool = True,
        preferred: Sequence[int] = (),
        max_queue_delay_us: int = 0,
    ) -> ModelConfig:
        """A copy that batches up to ``max_batch_size``, with a dynamic batcher unless ``dynamic=False``.

        Example:
            >>> cfg.with_batching(16, preferred=[8, 16], max_queue_delay_us=500)  # doctest: +SKIP
        """
        batching = (
            DynamicBatching(preferred_batch_sizes=tuple(preferred), max_queue_delay_us=max_queue_delay_us)
            if dynamic
            else None
        )
        return self.replace(max_batch_size=max_batch_size, dynamic_batching=batching)

    def to_proto(self) -> pb2.ModelConfig:
        """This config as ``tritonclient.grpc.model_config_pb2.ModelConfig``."""
        # proto.py imports this module for from_proto; importing it here keeps the cycle one-way.
        from tritonforge.config.proto import config_to_proto

        return config_to_proto(self)

    @classmethod
    def from_proto(cls, pb: pb2.ModelConfig) -> ModelConfig:
        """Build from a ``model_config_pb2.ModelConfig`` message.

        Fields without a dataclass field of their own are kept in ``extra``; what Triton accepts but
        looks wrong is listed in :attr:`warnings` rather than raised.

        Raises:
            ConfigError: for anything Triton would reject (naming the field).
        """
        from tritonforge.config.proto import config_from_proto

        return config_from_proto(pb)

    def to_pbtxt(self) -> str:
        """This config as config.pbtxt text, with ``max_batch_size`` always written."""
        from tritonforge.config.pbtxt import proto_to_pbtxt

        return proto_to_pbtxt(self.to_proto())

    @classmethod
    def from_pbtxt(cls, text: str, *, source: str | Path | None = None) -> ModelConfig:
        """Parse config.pbtxt text; ``source`` (a path) is named in error messages.

        Raises:
            ConfigError: for a syntax error (with its line and column) or an invalid config.
        """
        from tritonforge.config.pbtxt import pbtxt_to_proto

        pb = pbtxt_to_proto(text, source=source)
        if source is None:
            return cls.from_proto(pb)
        try:
            return cls.from_proto(pb)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc.message}", model=exc.model) from exc
