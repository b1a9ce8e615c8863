"""The ``optimization { ... }`` part of a model config: GPU/CPU execution accelerators and their flags.

``TensorRTAccelerator``, ``OpenVINOAccelerator`` and ``CustomAccelerator`` mirror Triton's accelerator
entries; ``Optimization`` holds them with CUDA graphs and pinned memory. Frozen, keyword-only dataclasses
checking in ``__post_init__`` what Triton would reject.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from tritonforge.config._fields import _check_non_negative, _set
from tritonforge.config._frozen import FrozenDict
from tritonforge.errors import ConfigError

__all__ = [
    "Accelerator",
    "CustomAccelerator",
    "OpenVINOAccelerator",
    "Optimization",
    "TensorRTAccelerator",
]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorRTAccelerator:
    """The ``tensorrt`` GPU execution accelerator of the ONNX Runtime (and TensorFlow) backends.

    Unset options are left out so the backend's defaults apply. ``minimum_segment_size`` and
    ``max_cached_engines`` are TF-TRT options; ONNX Runtime reads the ``trt_*`` ones.

    Example:
        >>> TensorRTAccelerator(precision_mode="FP16").parameters()
        {'precision_mode': 'FP16'}

    Raises:
        ConfigError: for a precision other than FP32, FP16 or INT8, or a negative size.
    """

    name: ClassVar[str] = "tensorrt"
    PRECISIONS: ClassVar[tuple[str, ...]] = ("FP32", "FP16", "INT8")

    precision_mode: str = "FP32"
    max_workspace_size_bytes: int | None = None
    max_cached_engines: int | None = None
    minimum_segment_size: int | None = None
    trt_engine_cache_enable: bool | None = None
    trt_engine_cache_path: str | None = None

    def __post_init__(self) -> None:
        owner = "tensorrt accelerator"
        precision = str(self.precision_mode).upper()
        if precision not in self.PRECISIONS:
            raise ConfigError(
                f"{owner}: precision_mode must be one of {self.PRECISIONS}, got {self.precision_mode!r}"
            )
        _set(self, "precision_mode", precision)
        sizes = {
            key: value
            for key, value in (
                ("max_workspace_size_bytes", self.max_workspace_size_bytes),
                ("max_cached_engines", self.max_cached_engines),
                ("minimum_segment_size", self.minimum_segment_size),
            )
            if value is not None
        }
        _check_non_negative(owner, **sizes)

    def parameters(self) -> dict[str, str]:
        """The accelerator's ``parameters`` map, as strings, leaving out unset options."""
        params = {"precision_mode": self.precision_mode}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "precision_mode" or value is None:
                continue
            params[field.name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
        return params

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> TensorRTAccelerator:
        """Read the accelerator back from its ``parameters`` map.

        Raises:
            ConfigError: for an unknown key or a value of the wrong type.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in params.items():
            if key not in known:
                raise ConfigError(
                    f"tensorrt accelerator: unknown parameter {key!r}; known: {', '.join(known)}"
                )
            if key in ("precision_mode", "trt_engine_cache_path"):
                values[key] = raw
            elif key == "trt_engine_cache_enable":
                if raw.lower() not in ("true", "false", "1", "0"):
                    raise ConfigError(f"tensorrt accelerator: {key} must be true or false, got {raw!r}")
                values[key] = raw.lower() in ("true", "1")
            else:
                try:
                    values[key] = int(raw)
                except ValueError as exc:
                    raise ConfigError(f"tensorrt accelerator: {key} must be an integer, got {raw!r}") from exc
        return cls(**values)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpenVINOAccelerator:
    """The ``openvino`` CPU execution accelerator of the ONNX Runtime backend.

    Example:
        >>> OpenVINOAccelerator().name
        'openvino'
    """

    name: ClassVar[str] = "openvino"

    def parameters(self) -> dict[str, str]:
        """No parameters: the backend takes OpenVINO's defaults."""
        return {}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CustomAccelerator:
    """Any other execution accelerator, by name and string parameters (e.g. ``cuda``), kept as is.

    Example:
        >>> CustomAccelerator(name="cuda", params={"cudnn_conv_algo_search": "1"}).parameters()
        {'cudnn_conv_algo_search': '1'}
    """

    name: str
    params: Mapping[str, str] = dataclasses.field(default_factory=FrozenDict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError("execution accelerator: name must be a non-empty string")
        _set(self, "params", FrozenDict({str(k): str(v) for k, v in self.params.items()}))

    def parameters(self) -> dict[str, str]:
        """The accelerator's ``parameters`` map."""
        return dict(self.params)


Accelerator = TensorRTAccelerator | OpenVINOAccelerator | CustomAccelerator


@dataclasses.dataclass(frozen=True, kw_only=True)
class Optimization:
    """The parts of ``optimization { ... }`` we generate: accelerators, CUDA graphs, pinned memory.

    Pinned-memory flags are written only when turned off, since on is Triton's default.

    Example:
        >>> opt = Optimization(gpu_accelerators=[TensorRTAccelerator(precision_mode="FP16")])
        >>> opt.gpu_accelerators[0].name
        'tensorrt'

    Raises:
        ConfigError: for an accelerator object of an unknown class.
    """

    gpu_accelerators: Sequence[Accelerator] = ()
    cpu_accelerators: Sequence[Accelerator] = ()
    cuda_graphs: bool = False
    input_pinned_memory: bool = True
    output_pinned_memory: bool = True

    def __post_init__(self) -> None:
        for field in ("gpu_accelerators", "cpu_accelerators"):
            accelerators = tuple(getattr(self, field))
            for acc in accelerators:
                if not isinstance(acc, (TensorRTAccelerator, OpenVINOAccelerator, CustomAccelerator)):
                    raise ConfigError(
                        f"optimization: {field} holds {acc!r}; use TensorRTAccelerator, "
                        "OpenVINOAccelerator or CustomAccelerator"
                    )
            _set(self, field, accelerators)
