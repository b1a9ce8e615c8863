"""Enums mirroring model_config.proto: tensor data types, instance kinds, queue timeout actions,
sequence-control kinds."""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

from tritonforge.errors import ConfigError

__all__ = ["ControlKind", "DataType", "InstanceKind", "TimeoutAction"]


class DataType(enum.Enum):
    """A tensor element type as Triton names it (``TYPE_FP32`` in config.pbtxt, ``FP32`` on the wire).

    Example:
        >>> DataType.parse("float32") is DataType.FP32
        True
        >>> DataType.STRING.triton_name, DataType.FP16.proto_name
        ('BYTES', 'TYPE_FP16')
    """

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BF16 = "BF16"
    STRING = "STRING"

    @property
    def proto_name(self) -> str:
        """The name in model_config.proto and config.pbtxt, e.g. ``TYPE_FP32``."""
        return f"TYPE_{self.value}"

    @property
    def triton_name(self) -> str:
        """The name in Triton's inference protocol, e.g. ``FP32``; ``BYTES`` for strings."""
        return "BYTES" if self is DataType.STRING else self.value

    def to_numpy(self) -> np.dtype[Any]:
        """The numpy dtype that holds this type; strings are ``object`` arrays of ``bytes``.

        Raises:
            ConfigError: for BF16, which numpy can't represent.
        """
        if self is DataType.BF16:
            raise ConfigError(
                "BF16 has no numpy dtype; send float32 and convert on the server, or use FP16/FP32"
            )
        return np.dtype(_TO_NUMPY[self])

    @classmethod
    def from_numpy(cls, dtype: Any) -> DataType:
        """The data type for a numpy dtype (or anything ``np.dtype()`` accepts).

        Raises:
            ConfigError: for dtypes Triton has no type for (complex, datetime, ...).
        """
        try:
            np_dtype = np.dtype(dtype)
        except TypeError as exc:
            raise ConfigError(f"{dtype!r} is not a numpy dtype") from exc
        # Triton sends strings as length-prefixed bytes; numpy keeps them in object/bytes/str arrays.
        if np_dtype.kind in ("O", "S", "U"):
            return cls.STRING
        for data_type, np_type in _TO_NUMPY.items():
            if np_dtype == np.dtype(np_type) and data_type is not cls.STRING:
                return data_type
        raise ConfigError(
            f"numpy dtype {np_dtype} has no Triton data type; cast to one of "
            f"{', '.join(t.value for t in cls)}"
        )

    @classmethod
    def parse(cls, value: Any) -> DataType:
        """Read a data type from ``"FP32"``, ``"TYPE_FP32"``, ``"fp32"``, ``"float32"``, ``"BYTES"``,
        a numpy dtype, a torch dtype or a ``DataType``.

        Raises:
            ConfigError: when the value names no Triton data type.
        """
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().upper().removeprefix("TORCH.")
            key = key.removeprefix("TYPE_")
            if key in cls.__members__:
                return cls[key]
            if key in _ALIASES:
                return _ALIASES[key]
            raise ConfigError(
                f"unknown data type {value!r}; use one of {', '.join(t.value for t in cls)} "
                "(or TYPE_<name>, or a numpy dtype name such as 'float32')"
            )
        if type(value).__module__.startswith("torch"):
            # torch dtypes print as 'torch.float32'; parsing the name avoids importing torch.
            return cls.parse(str(value))
        return cls.from_numpy(value)


_TO_NUMPY: dict[DataType, type] = {
    DataType.BOOL: np.bool_,
    DataType.UINT8: np.uint8,
    DataType.UINT16: np.uint16,
    DataType.UINT32: np.uint32,
    DataType.UINT64: np.uint64,
    DataType.INT8: np.int8,
    DataType.INT16: np.int16,
    DataType.INT32: np.int32,
    DataType.INT64: np.int64,
    DataType.FP16: np.float16,
    DataType.FP32: np.float32,
    DataType.FP64: np.float64,
    DataType.STRING: np.object_,
}

_ALIASES: dict[str, DataType] = {
    "BYTES": DataType.STRING,
    "STR": DataType.STRING,
    "OBJECT": DataType.STRING,
    "FLOAT16": DataType.FP16,
    "HALF": DataType.FP16,
    "FLOAT32": DataType.FP32,
    "FLOAT": DataType.FP32,
    "FLOAT64": DataType.FP64,
    "DOUBLE": DataType.FP64,
    "BFLOAT16": DataType.BF16,
    "LONG": DataType.INT64,
    "INT": DataType.INT32,
}


class InstanceKind(enum.Enum):
    """Where model instances run (``KIND_CPU`` ...). ``AUTO`` lets Triton pick GPU when it has one.

    Example:
        >>> InstanceKind.parse("KIND_GPU") is InstanceKind.GPU
        True
    """

    AUTO = "AUTO"
    CPU = "CPU"
    GPU = "GPU"
    MODEL = "MODEL"

    @property
    def proto_name(self) -> str:
        """The name in config.pbtxt, e.g. ``KIND_GPU``."""
        return f"KIND_{self.value}"

    @classmethod
    def parse(cls, value: Any) -> InstanceKind:
        """Read a kind from ``"GPU"``, ``"KIND_GPU"``, ``"gpu"`` or an ``InstanceKind``.

        Raises:
            ConfigError: for any other value.
        """
        return _parse_enum(cls, value, "KIND_", "instance kind")


class TimeoutAction(enum.Enum):
    """What a queue does with a request whose timeout passed: ``REJECT`` it or ``DELAY`` it.

    Example:
        >>> TimeoutAction.parse("delay") is TimeoutAction.DELAY
        True
    """

    REJECT = "REJECT"
    DELAY = "DELAY"

    @property
    def proto_name(self) -> str:
        """The name in config.pbtxt."""
        return self.value

    @classmethod
    def parse(cls, value: Any) -> TimeoutAction:
        """Read an action from ``"REJECT"`` / ``"delay"`` or a ``TimeoutAction``.

        Raises:
            ConfigError: for any other value.
        """
        return _parse_enum(cls, value, "", "timeout action")


class ControlKind(enum.Enum):
    """What a sequence batcher's control input carries (``CONTROL_SEQUENCE_START`` ...).

    ``START``, ``END`` and ``READY`` are flags (two false/true values); ``CORRID`` carries the
    sequence's correlation id (a ``data_type``).

    Example:
        >>> ControlKind.parse("CONTROL_SEQUENCE_START") is ControlKind.START
        True
    """

    START = "START"
    READY = "READY"
    END = "END"
    CORRID = "CORRID"

    @property
    def proto_name(self) -> str:
        """The name in config.pbtxt, e.g. ``CONTROL_SEQUENCE_START``."""
        return f"CONTROL_SEQUENCE_{self.value}"

    @classmethod
    def parse(cls, value: Any) -> ControlKind:
        """Read a kind from ``"START"``, ``"CONTROL_SEQUENCE_START"``, ``"start"`` or a ``ControlKind``.

        Raises:
            ConfigError: for any other value.
        """
        return _parse_enum(cls, value, "CONTROL_SEQUENCE_", "sequence control kind")


def _parse_enum(cls: Any, value: Any, prefix: str, what: str) -> Any:
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        key = value.strip().upper()
        if prefix:
            key = key.removeprefix(prefix)
        if key in cls.__members__:
            return cls[key]
    raise ConfigError(f"unknown {what} {value!r}; use one of {', '.join(m.value for m in cls)}")
