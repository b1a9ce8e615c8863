"""The pieces of a model config: tensors, batching, instances, versions, warmup, ensemble steps, agents.

Each is a frozen, keyword-only dataclass mirroring one message of Triton's model_config.proto and
checking, in ``__post_init__``, what Triton would reject about it on its own. Checks that need the
whole config (batch sizes against ``max_batch_size``, warmup against inputs) live in ``validate.py``.
The accelerators and ``Optimization`` live in ``optimization.py`` and are re-exported here; the shared
field checks are in ``_fields.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, Literal

from tritonclient.grpc import model_config_pb2 as pb2

from tritonforge.config._fields import (
    WILDCARD_DIM,
    _check_dims,
    _check_extra,
    _check_non_negative,
    _check_positive,
    _element_count,
    _int_tuple,
    _segments,
    _set,
)
from tritonforge.config._frozen import FrozenDict
from tritonforge.config._strictness import unusual
from tritonforge.config.enums import DataType, InstanceKind, TimeoutAction
from tritonforge.config.optimization import (
    CustomAccelerator,
    OpenVINOAccelerator,
    Optimization,
    TensorRTAccelerator,
)
from tritonforge.errors import ConfigError

__all__ = [
    "CustomAccelerator",
    "DynamicBatching",
    "EnsembleStep",
    "InstanceGroup",
    "ModelWarmup",
    "OpenVINOAccelerator",
    "Optimization",
    "QueuePolicy",
    "RepositoryAgent",
    "TensorRTAccelerator",
    "TensorSpec",
    "VersionPolicy",
    "WarmupInput",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorSpec:
    """One model input or output: ``input { name: "x" data_type: TYPE_FP32 dims: [3, -1] }``.

    ``dims`` leave out the batch dimension when the model batches (``max_batch_size > 0``); -1 marks
    a variable-size dimension. ``reshape`` is the shape the model itself sees, when it differs (an
    empty reshape turns a ``[1]`` tensor into a scalar; only batching models may do that).
    ``optional`` and ``allow_ragged_batch`` apply to inputs only. ``is_shape_tensor`` marks a tensor that
    holds a shape (TensorRT shape tensors). ``extra`` is config.pbtxt text for the fields of
    ``ModelInput`` / ``ModelOutput`` not modelled here (``format``, ``label_filename``,
    ``is_non_linear_format_io``), carried through unchanged.

    Example:
        >>> TensorSpec(name="image", dtype="FP32", dims=[3, 224, 224]).dims
        (3, 224, 224)

    Raises:
        ConfigError: for an empty name, no dims, a dim of 0 or below -1, or a reshape whose element
            count differs from the dims'.
    """

    name: str
    dtype: DataType
    dims: Sequence[int]
    optional: bool = False
    reshape: Sequence[int] | None = None
    allow_ragged_batch: bool = False
    is_shape_tensor: bool = False
    extra: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"tensor name must be a non-empty string, got {self.name!r}")
        owner = f"tensor {self.name!r}"
        _check_extra(self, owner, pb2.ModelInput, pb2.ModelOutput)
        try:
            _set(self, "dtype", DataType.parse(self.dtype))
        except ConfigError as exc:
            raise ConfigError(f"{owner}: {exc.message}") from exc
        _set(self, "dims", _int_tuple(owner, "dims", self.dims))
        if not self.dims:
            raise ConfigError(
                f"{owner}: dims is empty; Triton needs at least one dimension. For a scalar in a "
                "batching model write dims=(1,) with reshape=()"
            )
        _check_dims(owner, "dims", self.dims)
        if self.reshape is not None:
            _set(self, "reshape", _int_tuple(owner, "reshape", self.reshape))
            self._check_reshape(owner)

    def _check_reshape(self, owner: str) -> None:
        assert self.reshape is not None
        _check_dims(owner, "reshape", self.reshape)
        dims_count, reshape_count = _element_count(self.dims), _element_count(self.reshape)
        if not self.reshape:
            if dims_count != 1:
                raise ConfigError(
                    f"{owner}: an empty reshape (a scalar) needs dims with exactly one element, "
                    f"got dims {list(self.dims)}"
                )
            return
        mismatch = dims_count != reshape_count or (
            dims_count == WILDCARD_DIM and _segments(self.dims) != _segments(self.reshape)
        )
        if mismatch:
            raise ConfigError(
                f"{owner}: reshape {list(self.reshape)} does not hold the same elements as dims "
                f"{list(self.dims)}; make the products match (between -1 entries, when there are any)"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class QueuePolicy:
    """How a scheduler queue treats waiting requests (``ModelQueuePolicy``).

    Example:
        >>> QueuePolicy(timeout_action="DELAY", default_timeout_us=50_000).timeout_action
        <TimeoutAction.DELAY: 'DELAY'>

    Raises:
        ConfigError: for a negative timeout or queue size.
    """

    timeout_action: TimeoutAction = TimeoutAction.REJECT
    default_timeout_us: int = 0
    allow_timeout_override: bool = False
    max_queue_size: int = 0

    def __post_init__(self) -> None:
        _set(self, "timeout_action", TimeoutAction.parse(self.timeout_action))
        _check_non_negative(
            "queue policy", default_timeout_us=self.default_timeout_us, max_queue_size=self.max_queue_size
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DynamicBatching:
    """Triton's dynamic batcher (``dynamic_batching { ... }``); needs ``max_batch_size > 0``.

    Priority levels run 1..``priority_levels``; ``priority_queue_policy`` maps a level to its queue
    policy and is stored as a read-only mapping.

    Example:
        >>> DynamicBatching(preferred_batch_sizes=[4, 8], max_queue_delay_us=100).preferred_batch_sizes
        (4, 8)

    Raises:
        ConfigError: for a preferred size < 1, a default priority level outside 1..priority_levels,
            a queue policy for an unknown level, or ordering combined with priorities or DELAY.
    """

    preferred_batch_sizes: Sequence[int] = ()
    max_queue_delay_us: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy | None = None
    priority_queue_policy: Mapping[int, QueuePolicy] = dataclasses.field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        owner = "dynamic_batching"
        _set(
            self,
            "preferred_batch_sizes",
            _int_tuple(owner, "preferred_batch_sizes", self.preferred_batch_sizes),
        )
        for size in self.preferred_batch_sizes:
            if size < 1:
                raise ConfigError(f"{owner}: preferred batch size {size} must be >= 1")
        _check_non_negative(
            owner,
            max_queue_delay_us=self.max_queue_delay_us,
            priority_levels=self.priority_levels,
            default_priority_level=self.default_priority_level,
        )
        _set(self, "priority_queue_policy", FrozenDict(self.priority_queue_policy))
        levels = self.priority_levels
        if levels:
            if not 1 <= self.default_priority_level <= levels:
                raise ConfigError(
                    f"{owner}: default_priority_level must be in 1..{levels} when priority_levels is "
                    f"{levels}, got {self.default_priority_level}"
                )
        elif self.default_priority_level:
            unusual(
                f"{owner}: default_priority_level is {self.default_priority_level} but priority_levels "
                "is 0; set priority_levels too, or drop default_priority_level"
            )
        for level, policy in self.priority_queue_policy.items():
            if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= levels:
                raise ConfigError(
                    f"{owner}: priority_queue_policy has level {level!r}; levels must be in "
                    f"1..priority_levels ({levels})"
                )
            if not isinstance(policy, QueuePolicy):
                raise ConfigError(f"{owner}: priority_queue_policy[{level}] must be a QueuePolicy")
        if self.preserve_ordering:
            self._check_ordering(owner)

    def _check_ordering(self, owner: str) -> None:
        if self.priority_levels > 1:
            raise ConfigError(f"{owner}: preserve_ordering allows one priority level at most")
        policies = [self.default_queue_policy, *self.priority_queue_policy.values()]
        for policy in policies:
            if policy and policy.timeout_action is TimeoutAction.DELAY and policy.default_timeout_us:
                raise ConfigError(
                    f"{owner}: a queue policy can't DELAY timed-out requests when preserve_ordering "
                    "is on; use REJECT or turn preserve_ordering off"
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class InstanceGroup:
    """A group of model instances (``instance_group [{ count: 2 kind: KIND_GPU gpus: [0] }]``).

    ``KIND_GPU`` groups are valid anywhere: the generated repositories run on NVIDIA GPU containers.
    With no ``gpus`` listed Triton spreads the group over every GPU it sees. ``extra`` is config.pbtxt
    text for the fields of ``ModelInstanceGroup`` not modelled here (``rate_limiter``, ``passive``,
    ``host_policy``, ``profile``, ``secondary_devices``), carried through unchanged.

    Example:
        >>> InstanceGroup(count=2, kind="GPU").kind
        <InstanceKind.GPU: 'GPU'>

    Raises:
        ConfigError: for count < 1, a negative GPU id, or GPUs listed on a CPU or MODEL group.
    """

    count: int = 1
    kind: InstanceKind = InstanceKind.CPU
    gpus: Sequence[int] = ()
    name: str = ""
    extra: str = ""

    def __post_init__(self) -> None:
        owner = f"instance group {self.name!r}" if self.name else "instance group"
        _set(self, "kind", InstanceKind.parse(self.kind))
        _check_extra(self, owner, pb2.ModelInstanceGroup)
        if isinstance(self.count, bool) or not isinstance(self.count, int):
            raise ConfigError(f"{owner}: count must be an integer >= 1, got {self.count!r}")
        if self.count < 1:
            # Triton loads a negative count (as one instance), but it is surely not what was meant.
            unusual(f"{owner}: count must be an integer >= 1, got {self.count!r}")
        _set(self, "gpus", _int_tuple(owner, "gpus", self.gpus))
        if any(gpu < 0 for gpu in self.gpus):
            raise ConfigError(f"{owner}: GPU ids must be >= 0, got {list(self.gpus)}")
        if self.gpus and self.kind in (InstanceKind.CPU, InstanceKind.MODEL):
            raise ConfigError(
                f"{owner}: kind {self.kind.proto_name} can't list gpus; use kind GPU or drop gpus"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class VersionPolicy:
    """Which versions of a model Triton serves. Build it with ``latest``, ``all`` or ``specific``.

    Example:
        >>> VersionPolicy.specific(1, 3).versions
        (1, 3)

    Raises:
        ConfigError: for latest(n < 1), or specific() without versions or with a version < 1.
    """

    kind: Literal["latest", "all", "specific"] = "latest"
    num_versions: int = 1
    versions: Sequence[int] = ()

    _KINDS: ClassVar[tuple[str, ...]] = ("latest", "all", "specific")

    def __post_init__(self) -> None:
        owner = "version_policy"
        if self.kind not in self._KINDS:
            raise ConfigError(f"{owner}: kind must be one of {self._KINDS}, got {self.kind!r}")
        _set(self, "versions", _int_tuple(owner, "versions", self.versions))
        if self.kind == "latest":
            _check_positive(owner, num_versions=self.num_versions)
        if self.kind == "specific":
            if not self.versions:
                raise ConfigError(f"{owner}: specific() needs at least one version")
            _check_dims(owner, "versions", self.versions, wildcard=False)
        elif self.versions:
            raise ConfigError(f"{owner}: versions are only for specific(), not {self.kind}()")

    def __str__(self) -> str:
        """As config.pbtxt writes it: ``specific { versions: [2, 3] }``, ``latest { num_versions: 1 }``."""
        if self.kind == "specific":
            return f"specific {{ versions: [{', '.join(map(str, self.versions))}] }}"
        if self.kind == "latest":
            return f"latest {{ num_versions: {self.num_versions} }}"
        return "all { }"

    def serves(self, available: Iterable[int]) -> list[int]:
        """The versions Triton serves under this policy, of those ``available`` (ascending).

        Example:
            >>> VersionPolicy.specific(2, 99).serves([1, 2, 3]), VersionPolicy.latest(2).serves([1, 2, 3])
            ([2], [2, 3])
        """
        found = sorted(set(available))
        if self.kind == "all":
            return found
        if self.kind == "specific":
            return [v for v in found if v in set(self.versions)]
        return found[-self.num_versions :] if found else []

    @classmethod
    def latest(cls, n: int = 1) -> VersionPolicy:
        """Serve the ``n`` highest versions (Triton's default is ``latest(1)``)."""
        return cls(kind="latest", num_versions=n)

    @classmethod
    def all(cls) -> VersionPolicy:
        """Serve every version in the repository."""
        return cls(kind="all")

    @classmethod
    def specific(cls, *versions: int) -> VersionPolicy:
        """Serve exactly these versions."""
        return cls(kind="specific", versions=versions)


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmupInput:
    """The data for one input of a warmup request: zeros, random data, or a file of raw bytes.

    ``input_data_file`` is relative to the model's ``warmup/`` folder, as Triton reads it.

    Example:
        >>> WarmupInput(dtype="FP32", dims=[3], zero_data=True).dims
        (3,)

    Raises:
        ConfigError: unless exactly one data source is given, or for a dim < 1.
    """

    dtype: DataType
    dims: Sequence[int]
    zero_data: bool = False
    random_data: bool = False
    input_data_file: str | None = None

    def __post_init__(self) -> None:
        owner = "warmup input"
        _set(self, "dtype", DataType.parse(self.dtype))
        _set(self, "dims", _int_tuple(owner, "dims", self.dims))
        _check_dims(owner, "dims", self.dims, wildcard=False)
        sources = [self.zero_data, self.random_data, self.input_data_file is not None]
        if sum(bool(s) for s in sources) != 1:
            raise ConfigError(
                f"{owner}: give exactly one of zero_data=True, random_data=True or input_data_file"
            )
        if self.input_data_file is not None and not self.input_data_file:
            raise ConfigError(f"{owner}: input_data_file must name a file in the model's warmup/ folder")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelWarmup:
    """A warmup request Triton sends before it marks the model ready (``model_warmup [...]``).

    Example:
        >>> w = ModelWarmup(name="zeros", batch_size=1,
        ...                 inputs={"x": WarmupInput(dtype="FP32", dims=[3], zero_data=True)})
        >>> list(w.inputs)
        ['x']

    Raises:
        ConfigError: for an empty name, batch_size < 1 or count < 1.
    """

    name: str
    batch_size: int
    inputs: Mapping[str, WarmupInput]
    count: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("model warmup: name must be a non-empty string")
        owner = f"model warmup {self.name!r}"
        _check_positive(owner, batch_size=self.batch_size, count=self.count)
        _set(self, "inputs", FrozenDict(self.inputs))
        for key, value in self.inputs.items():
            if not isinstance(key, str) or not key:
                raise ConfigError(f"{owner}: input names must be non-empty strings, got {key!r}")
            if not isinstance(value, WarmupInput):
                raise ConfigError(f"{owner}: inputs[{key!r}] must be a WarmupInput")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnsembleStep:
    """One step of an ensemble: which model runs, and how its tensors map to the ensemble's.

    ``input_map`` maps the step model's input name to the ensemble tensor it reads;
    ``output_map`` maps the step model's output name to the ensemble tensor it writes.
    ``model_version=-1`` means the latest version. ``extra`` is config.pbtxt text for the fields of a
    ``Step`` not modelled here (``model_namespace``), carried through unchanged.

    Example:
        >>> step = EnsembleStep(model_name="tokenizer", input_map={"TEXT": "raw"},
        ...                     output_map={"IDS": "ids"})
        >>> step.model_version
        -1

    Raises:
        ConfigError: for an empty model name, empty maps, or a version that is neither -1 nor >= 1.
    """

    model_name: str
    input_map: Mapping[str, str]
    output_map: Mapping[str, str]
    model_version: int = -1
    extra: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ConfigError("ensemble step: model_name must be a non-empty string")
        owner = f"ensemble step {self.model_name!r}"
        _check_extra(self, owner, pb2.ModelEnsembling.Step)
        if (
            isinstance(self.model_version, bool)
            or not isinstance(self.model_version, int)
            or (self.model_version < 1 and self.model_version != -1)
        ):
            raise ConfigError(
                f"{owner}: model_version must be -1 (latest) or >= 1, got {self.model_version!r}"
            )
        for field in ("input_map", "output_map"):
            mapping = FrozenDict(getattr(self, field))
            if not mapping:
                raise ConfigError(f"{owner}: {field} must map at least one tensor")
            for key, value in mapping.items():
                if not isinstance(key, str) or not key or not isinstance(value, str) or not value:
                    raise ConfigError(f"{owner}: {field} must map non-empty names, got {key!r}: {value!r}")
            _set(self, field, mapping)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RepositoryAgent:
    """A model repository agent Triton runs on the model's files before loading (e.g. ``checksum``).

    Example:
        >>> RepositoryAgent(name="checksum", parameters={"MD5:1/model.onnx": "..."}).name
        'checksum'

    Raises:
        ConfigError: for an empty name or non-string parameters.
    """

    name: str
    parameters: Mapping[str, str] = dataclasses.field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("model repository agent: name must be a non-empty string")
        params = FrozenDict(self.parameters)
        for key, value in params.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigError(
                    f"model repository agent {self.name!r}: parameters must map strings to strings, "
                    f"got {key!r}: {value!r}"
                )
        _set(self, "parameters", params)
