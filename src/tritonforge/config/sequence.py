"""Triton's sequence batcher (``sequence_batching { ... }``): strategies, control inputs, implicit state.

A stateful model sees every request of one sequence (one correlation id) on the same instance, in order.
Control inputs are tensors Triton itself feeds to the model (start, end, ready flags and the
correlation id); implicit state is a tensor Triton carries from one request of a sequence to the next.
Each dataclass mirrors one message of model_config.proto and checks in ``__post_init__`` what Triton
rejects about it alone; checks against the model's inputs and ``max_batch_size`` are in ``validate.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tritonforge.config._strictness import unusual
from tritonforge.config.enums import ControlKind, DataType
from tritonforge.errors import ConfigError

__all__ = [
    "ControlInput",
    "DirectStrategy",
    "InitialState",
    "OldestStrategy",
    "SequenceBatching",
    "SequenceControl",
    "SequenceState",
]

# The data types Triton accepts for a CORRID control (its error message lists them).
CORRID_TYPES = (DataType.UINT64, DataType.INT64, DataType.UINT32, DataType.INT32, DataType.STRING)


def _set(obj: object, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _tuple(owner: str, field: str, values: Any, kind: type | tuple[type, ...]) -> tuple[Any, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, tuple, list)):
        raise ConfigError(f"{owner}: {field} must be a sequence, got {values!r}")
    items = tuple(values)
    for item in items:
        if (isinstance(item, bool) and kind is not bool) or not isinstance(item, kind):
            raise ConfigError(
                f"{owner}: {field} must hold {getattr(kind, '__name__', kind)} items, got {item!r}"
            )
    return items


def _non_negative(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{owner}: {name} must be an integer >= 0, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DirectStrategy:
    """Each sequence gets its own batch slot (``direct { ... }``), Triton's default strategy.

    Example:
        >>> DirectStrategy(max_queue_delay_us=100).minimum_slot_utilization
        0.0

    Raises:
        ConfigError: for a negative delay or a slot utilization outside 0..1.
    """

    max_queue_delay_us: int = 0
    minimum_slot_utilization: float = 0.0

    def __post_init__(self) -> None:
        owner = "sequence_batching.direct"
        _non_negative(owner, max_queue_delay_us=self.max_queue_delay_us)
        value = self.minimum_slot_utilization
        # 0 is proto3's "unset" (Triton's default); anything else must be a fraction in (0, 1].
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{owner}: minimum_slot_utilization must be in (0.0, 1.0], got {value!r}")
        _set(self, "minimum_slot_utilization", float(value))


@dataclasses.dataclass(frozen=True, kw_only=True)
class OldestStrategy:
    """Batches the oldest requests of up to ``max_candidate_sequences`` sequences (``oldest { ... }``).

    Example:
        >>> OldestStrategy(max_candidate_sequences=4, preferred_batch_sizes=[2, 4]).preferred_batch_sizes
        (2, 4)

    Raises:
        ConfigError: for a negative count or delay, or a preferred size below 1.
    """

    max_candidate_sequences: int = 0
    preferred_batch_sizes: Sequence[int] = ()
    max_queue_delay_us: int = 0
    preserve_ordering: bool = False

    def __post_init__(self) -> None:
        owner = "sequence_batching.oldest"
        _non_negative(
            owner,
            max_candidate_sequences=self.max_candidate_sequences,
            max_queue_delay_us=self.max_queue_delay_us,
        )
        sizes = _tuple(owner, "preferred_batch_sizes", self.preferred_batch_sizes, int)
        for size in sizes:
            if size < 1:
                raise ConfigError(f"{owner}: preferred batch size {size} must be >= 1")
        _set(self, "preferred_batch_sizes", sizes)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceControl:
    """One control of a control input: a flag (``START``/``END``/``READY`` with false/true values) or
    the correlation id (``CORRID`` with a ``data_type``).

    Give a flag's values in exactly one of ``int32_false_true``, ``fp32_false_true`` or
    ``bool_false_true``, e.g. ``SequenceControl(kind="START", int32_false_true=[0, 1])``.

    Example:
        >>> SequenceControl(kind="CORRID", dtype="UINT64").kind
        <ControlKind.CORRID: 'CORRID'>

    Raises:
        ConfigError: for a flag without exactly two values in one list, or a CORRID without a data type
            Triton accepts (and, built in code, a data type on a flag, which Triton ignores).
    """

    kind: ControlKind
    int32_false_true: Sequence[int] = ()
    fp32_false_true: Sequence[float] = ()
    bool_false_true: Sequence[bool] = ()
    dtype: DataType | None = None

    def __post_init__(self) -> None:
        _set(self, "kind", ControlKind.parse(self.kind))
        owner = f"sequence control {self.kind.proto_name}"
        _set(self, "int32_false_true", _tuple(owner, "int32_false_true", self.int32_false_true, int))
        floats = _tuple(owner, "fp32_false_true", self.fp32_false_true, (int, float))
        _set(self, "fp32_false_true", tuple(float(v) for v in floats))
        _set(self, "bool_false_true", _tuple(owner, "bool_false_true", self.bool_false_true, bool))
        if self.dtype is not None:
            try:
                _set(self, "dtype", DataType.parse(self.dtype))
            except ConfigError as exc:
                raise ConfigError(f"{owner}: {exc.message}") from exc
        lists = [v for v in (self.int32_false_true, self.fp32_false_true, self.bool_false_true) if v]
        if self.kind is ControlKind.CORRID:
            if lists:
                raise ConfigError(f"{owner}: a CORRID control carries no false/true values; drop them")
            if self.dtype not in CORRID_TYPES:
                allowed = ", ".join(t.proto_name for t in CORRID_TYPES)
                raise ConfigError(f"{owner}: data_type must be one of {allowed}, got {self.dtype!r}")
            return
        if len(lists) != 1 or len(lists[0]) != 2:
            raise ConfigError(
                f"{owner}: give exactly one of int32_false_true, fp32_false_true or bool_false_true, "
                "with two values (false, true)"
            )
        if self.dtype is not None:
            unusual(f"{owner}: data_type is only read for CONTROL_SEQUENCE_CORRID; drop it")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlInput:
    """A model input that Triton fills with sequence controls (``control_input [{ name: ... }]``).

    Example:
        >>> ControlInput(name="START", controls=[SequenceControl(kind="START", int32_false_true=[0, 1])]).name
        'START'

    Raises:
        ConfigError: for an empty name (and, built in code, no controls).
    """

    name: str
    controls: Sequence[SequenceControl]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("sequence control input: name must be a non-empty string")
        owner = f"sequence control input {self.name!r}"
        _set(self, "controls", _tuple(owner, "controls", self.controls, SequenceControl))
        if not self.controls:
            unusual(f"{owner}: has no control, so Triton feeds it nothing; add one or drop the input")


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitialState:
    """The value an implicit state starts a sequence with: zeros or a file in the model's folder.

    Example:
        >>> InitialState(name="zeros", dtype="INT32", dims=[1], zero_data=True).dims
        (1,)

    Raises:
        ConfigError: unless exactly one of ``zero_data`` and ``data_file`` is given, or for a bad dim.
    """

    name: str
    dtype: DataType
    dims: Sequence[int]
    zero_data: bool = False
    data_file: str | None = None

    def __post_init__(self) -> None:
        owner = f"initial state {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("initial state: name must be a non-empty string")
        _set(self, "dtype", DataType.parse(self.dtype))
        dims = _tuple(owner, "dims", self.dims, int)
        for dim in dims:
            if dim < 1 and dim != -1:
                raise ConfigError(f"{owner}: each dimension must be >= 1 or -1, got {dim}")
        _set(self, "dims", dims)
        if bool(self.zero_data) == (self.data_file is not None):
            raise ConfigError(f"{owner}: give exactly one of zero_data=True or data_file")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceState:
    """An implicit state tensor (``state [{ input_name: ... output_name: ... }]``).

    Example:
        >>> SequenceState(input_name="IN_STATE", output_name="OUT_STATE", dtype="INT32", dims=[1]).dims
        (1,)

    Raises:
        ConfigError: for an empty tensor name, a bad dim or initial states that are not InitialState.
    """

    input_name: str
    output_name: str
    dtype: DataType | None
    dims: Sequence[int]
    initial_states: Sequence[InitialState] = ()
    use_same_buffer_for_input_output: bool = False
    use_growable_memory: bool = False

    def __post_init__(self) -> None:
        # Backends without implicit state (python) load a model whose state lacks names or a data type;
        # the ones that have it refuse it, so it is an error in code and a warning when read.
        for field in ("input_name", "output_name"):
            if not isinstance(getattr(self, field), str):
                raise ConfigError(f"sequence state: {field} must be a string")
            if not getattr(self, field):
                unusual(f"sequence state: {field} must be a non-empty string")
        owner = f"sequence state {self.input_name!r}"
        if self.dtype is None:
            unusual(f"{owner}: data_type is missing; set it, e.g. data_type: TYPE_FP32")
        else:
            try:
                _set(self, "dtype", DataType.parse(self.dtype))
            except ConfigError as exc:
                raise ConfigError(f"{owner}: {exc.message}") from exc
        dims = _tuple(owner, "dims", self.dims, int)
        for dim in dims:
            if dim < 1 and dim != -1:
                raise ConfigError(f"{owner}: each dimension must be >= 1 or -1, got {dim}")
        _set(self, "dims", dims)
        _set(self, "initial_states", _tuple(owner, "initial_states", self.initial_states, InitialState))


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequenceBatching:
    """Triton's sequence batcher, for stateful models (``sequence_batching { ... }``).

    ``strategy`` None means Triton's default (direct); ``max_sequence_idle_us`` 0 means Triton's default
    (1 s). ``iterative`` lets the model reschedule a request to itself (iterative decoding).

    Example:
        >>> start = SequenceControl(kind="START", int32_false_true=[0, 1])
        >>> corrid = SequenceControl(kind="CORRID", dtype="UINT64")
        >>> seq = SequenceBatching(
        ...     max_sequence_idle_us=5_000_000,
        ...     control_inputs=[
        ...         ControlInput(name="START", controls=[start]),
        ...         ControlInput(name="CORRID", controls=[corrid]),
        ...     ],
        ... )
        >>> [c.name for c in seq.control_inputs]
        ['START', 'CORRID']

    Raises:
        ConfigError: for a negative idle time, a strategy of another class, a control kind given twice
            or a control input listed twice.
    """

    strategy: DirectStrategy | OldestStrategy | None = None
    max_sequence_idle_us: int = 0
    control_inputs: Sequence[ControlInput] = ()
    states: Sequence[SequenceState] = ()
    iterative: bool = False

    def __post_init__(self) -> None:
        owner = "sequence_batching"
        if self.strategy is not None and not isinstance(self.strategy, (DirectStrategy, OldestStrategy)):
            raise ConfigError(f"{owner}: strategy must be DirectStrategy, OldestStrategy or None")
        _non_negative(owner, max_sequence_idle_us=self.max_sequence_idle_us)
        _set(self, "control_inputs", _tuple(owner, "control_inputs", self.control_inputs, ControlInput))
        _set(self, "states", _tuple(owner, "states", self.states, SequenceState))
        names: set[str] = set()
        kinds: set[ControlKind] = set()
        for control_input in self.control_inputs:
            if control_input.name in names:
                raise ConfigError(f"{owner}: control input {control_input.name!r} is listed twice")
            names.add(control_input.name)
            for control in control_input.controls:
                if control.kind in kinds:
                    raise ConfigError(
                        f"{owner}: {control.kind.proto_name} is given more than once; each control kind "
                        "goes to one input"
                    )
                kinds.add(control.kind)
        state_names: set[str] = set()
        for state in self.states:
            for name in (state.input_name, state.output_name):
                if name and name in state_names:
                    unusual(f"{owner}: state tensor {name!r} is named twice")
                state_names.add(name)
