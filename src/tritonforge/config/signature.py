"""What a model file takes and returns: read from ONNX / TorchScript, made into or checked against a config.

torch is imported only inside ``torchscript_signature``: ``import tritonforge.config`` works without it.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tritonforge.config.enums import DataType, InstanceKind
from tritonforge.config.model import ModelConfig
from tritonforge.config.parts import DynamicBatching, InstanceGroup, TensorSpec
from tritonforge.errors import ConfigError, SignatureError
from tritonforge.files import MAX_ONNX_BYTES, read_bytes

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "Signature",
    "check_signature",
    "config_from_signature",
    "onnx_signature",
    "torchscript_signature",
]

#: max_batch_size that ``config_from_signature`` gives a batched model when none is asked for.
DEFAULT_MAX_BATCH_SIZE = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class Signature:
    """A model's inputs and outputs. When ``batched``, dims leave out the leading batch dimension.

    Example:
        >>> sig = Signature(inputs=(TensorSpec(name="x", dtype="FP32", dims=[4]),),
        ...                 outputs=(TensorSpec(name="y", dtype="FP32", dims=[2]),), batched=True)
        >>> [t.name for t in sig.inputs]
        ['x']
    """

    inputs: Sequence[TensorSpec]
    outputs: Sequence[TensorSpec]
    batched: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))


# ---------------------------------------------------------------- ONNX


def _onnx_dtypes() -> dict[int, DataType]:
    from onnx import TensorProto as T

    return {
        T.BOOL: DataType.BOOL,
        T.UINT8: DataType.UINT8,
        T.UINT16: DataType.UINT16,
        T.UINT32: DataType.UINT32,
        T.UINT64: DataType.UINT64,
        T.INT8: DataType.INT8,
        T.INT16: DataType.INT16,
        T.INT32: DataType.INT32,
        T.INT64: DataType.INT64,
        T.FLOAT16: DataType.FP16,
        T.FLOAT: DataType.FP32,
        T.DOUBLE: DataType.FP64,
        T.BFLOAT16: DataType.BF16,
        T.STRING: DataType.STRING,
    }


def _onnx_value(value: Any, path: Path) -> tuple[str, DataType, list[int | str | None]]:
    """(name, dtype, shape) with each dim an int, a symbolic name, or None when unknown."""
    if not value.type.HasField("tensor_type"):
        raise SignatureError(f"{path}: {value.name!r} is not a tensor (sequences and maps can't be served)")
    tensor = value.type.tensor_type
    dtypes = _onnx_dtypes()
    if tensor.elem_type not in dtypes:
        raise SignatureError(
            f"{path}: {value.name!r} has ONNX element type {tensor.elem_type}, which Triton can't serve"
        )
    if not tensor.HasField("shape"):
        raise SignatureError(
            f"{path}: {value.name!r} has no shape (unknown rank); export with shapes or run "
            "onnx.shape_inference on the model"
        )
    shape: list[int | str | None] = []
    for dim in tensor.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(dim.dim_value)
        elif dim.HasField("dim_param") and dim.dim_param:
            shape.append(dim.dim_param)
        else:
            shape.append(None)
    return value.name, dtypes[tensor.elem_type], shape


def _is_batched(inputs: Sequence[list[Any]], outputs: Sequence[list[Any]]) -> bool:
    """Batched when every tensor leads with a free dim and the inputs' named leading dims agree."""
    shapes = [*inputs, *outputs]
    if not shapes or any(not shape or isinstance(shape[0], int) for shape in shapes):
        return False
    # Outputs often get generated names for their leading dim; the inputs' names are the user's.
    named = {shape[0] for shape in inputs if isinstance(shape[0], str)}
    return len(named) <= 1


def _spec(name: str, dtype: DataType, dims: Sequence[int], path: Path) -> TensorSpec:
    if not dims:
        # Triton has no scalar tensors; a batched scalar is dims [1] with an empty reshape.
        return TensorSpec(name=name, dtype=dtype, dims=(1,), reshape=())
    try:
        return TensorSpec(name=name, dtype=dtype, dims=tuple(dims))
    except ConfigError as exc:
        raise SignatureError(f"{path}: {exc.message}") from exc


def onnx_signature(path: str | os.PathLike[str]) -> Signature:
    """Read an ONNX model's graph inputs (without initializers) and outputs.

    Symbolic or unknown dims become -1. The model counts as batched when every input and output
    leads with a symbolic/unknown dim (the inputs' named ones all alike); its dims then leave that
    dim out.

    Example:
        >>> sig = onnx_signature("model.onnx")  # doctest: +SKIP
        >>> sig.batched, sig.inputs[0].dims  # doctest: +SKIP
        (True, (3, 224, 224))

    Raises:
        SignatureError: for a missing or unreadable file, a tensor of unknown rank, an element type
            Triton can't serve, or a scalar in a model that does not batch.
    """
    import onnx

    file = Path(path)
    # bounded, regular files only: a FIFO or a link to /dev/zero is one line, not a hang or an OOM kill
    data = read_bytes(file, what="ONNX file", limit=MAX_ONNX_BYTES, error=SignatureError)
    if not data:
        raise SignatureError(
            f"{file}: the ONNX file is empty (0 bytes), which Triton can't load; export it again"
        )
    try:
        # The signature lives in the graph; external weights need not be read.
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # onnx raises DecodeError, ValueError, ... for a bad file
        raise SignatureError(f"{file}: not a readable ONNX model: {str(exc)[:200]}") from None
    del data
    if not model.ir_version or not model.graph.output:
        missing = "an IR version" if not model.ir_version else "graph outputs"
        raise SignatureError(
            f"{file}: not an ONNX model (it has no {missing}), which Triton can't load; check that this is "
            "the exported model"
        )
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [_onnx_value(v, file) for v in graph.input if v.name not in initializers]
    outputs = [_onnx_value(v, file) for v in graph.output]
    batched = _is_batched([s for _, _, s in inputs], [s for _, _, s in outputs])

    def specs(values: list[tuple[str, DataType, list[Any]]]) -> tuple[TensorSpec, ...]:
        result = []
        for name, dtype, shape in values:
            dims = [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]
            if not dims and not batched:
                raise SignatureError(
                    f"{file}: {name!r} is a scalar, which Triton serves only in a batched model; "
                    "give it a dimension of size 1, or a dynamic batch axis"
                )
            result.append(_spec(name, dtype, dims, file))
        return tuple(result)

    return Signature(inputs=specs(inputs), outputs=specs(outputs), batched=batched)


# ---------------------------------------------------------------- TorchScript


def torchscript_signature(
    path: str | os.PathLike[str],
    example_inputs: Sequence[Any] | Mapping[str, Any],
    *,
    batched: bool | None = None,
    variable_dims: Mapping[int, Sequence[int]] | None = None,
    output_variable_dims: Mapping[int, Sequence[int]] | None = None,
) -> Signature:
    """Load a TorchScript model, run it once on ``example_inputs`` and read names, dtypes and shapes.

    Tensors are named as Triton's PyTorch backend expects by default: ``INPUT__0``, ``INPUT__1`` ...
    and ``OUTPUT__0`` ...; a mapping of examples names the inputs by its keys instead (they are
    passed by position, in the mapping's order). ``batched`` defaults to whether every example and
    every output share one leading size. ``variable_dims`` maps an input's index to the axes (of its
    full shape, batch axis included) that vary, like ``dynamic_axes`` in ``torch.onnx.export``;
    ``output_variable_dims`` does the same for outputs.

    Example:
        >>> sig = torchscript_signature("model.pt", [torch.zeros(2, 4)])  # doctest: +SKIP
        >>> sig.inputs[0].name, sig.inputs[0].dims  # doctest: +SKIP
        ('INPUT__0', (4,))

    Raises:
        SignatureError: for a file torch can't load, a model that fails on the examples, or
            outputs that are not tensors.
    """
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SignatureError("torchscript_signature needs torch: pip install 'tritonforge[torch]'") from exc

    file = Path(path)
    if isinstance(example_inputs, Mapping):
        names, examples = list(example_inputs), list(example_inputs.values())
    else:
        examples = list(example_inputs)
        names = [f"INPUT__{i}" for i in range(len(examples))]
    for name, example in zip(names, examples, strict=True):
        if not isinstance(example, torch.Tensor):
            raise SignatureError(
                f"example input {name!r} must be a torch.Tensor, got {type(example).__name__}"
            )
    try:
        with warnings.catch_warnings():
            # TorchScript is what Triton's PyTorch backend loads; torch's deprecation notice of
            # jit.load is not something a caller of ours can act on.
            warnings.filterwarnings("ignore", message="`torch.jit.load`", category=DeprecationWarning)
            module = torch.jit.load(str(file), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError/ValueError for missing or foreign files
        raise SignatureError(f"{file}: not a loadable TorchScript model: {exc}") from exc
    module.eval()
    try:
        with torch.no_grad():
            result = module(*examples)
    except Exception as exc:
        raise SignatureError(f"{file}: the model failed on the example inputs: {exc}") from exc
    outputs = [result] if isinstance(result, torch.Tensor) else result
    if not isinstance(outputs, (tuple, list)) or not all(isinstance(o, torch.Tensor) for o in outputs):
        raise SignatureError(
            f"{file}: outputs must be a tensor or a tuple/list of tensors, got {type(result).__name__}"
        )
    shapes_in = [tuple(t.shape) for t in examples]
    shapes_out = [tuple(t.shape) for t in outputs]
    if batched is None:
        leading = {shape[0] if shape else None for shape in (*shapes_in, *shapes_out)}
        batched = len(leading) == 1 and None not in leading

    def specs(
        prefix_names: list[str],
        tensors: list[Any],
        shapes: list[tuple[int, ...]],
        variable: Mapping[int, Sequence[int]] | None,
    ) -> tuple[TensorSpec, ...]:
        result_specs = []
        for index, (name, tensor, shape) in enumerate(zip(prefix_names, tensors, shapes, strict=True)):
            dims = list(shape)
            for axis in (variable or {}).get(index, ()):
                if not -len(dims) <= axis < len(dims):
                    raise SignatureError(f"{name!r}: variable axis {axis} is outside its shape {list(shape)}")
                dims[axis] = -1
            if batched:
                if not dims:
                    raise SignatureError(
                        f"{name!r} is a scalar, so the model can't be batched; pass batched=False"
                    )
                dims = dims[1:]
            elif not dims:
                raise SignatureError(f"{name!r} is a scalar, which Triton serves only in a batched model")
            dtype = DataType.parse(str(tensor.dtype))
            result_specs.append(_spec(name, dtype, dims, file))
        return tuple(result_specs)

    output_names = [f"OUTPUT__{i}" for i in range(len(outputs))]
    return Signature(
        inputs=specs(names, examples, shapes_in, variable_dims),
        outputs=specs(output_names, list(outputs), shapes_out, output_variable_dims),
        batched=batched,
    )


# ---------------------------------------------------------------- signature <-> config


def config_from_signature(
    name: str,
    signature: Signature,
    platform: str | None,
    *,
    max_batch_size: int | None = None,
    dynamic_batching: bool | DynamicBatching = True,
    instances: int = 1,
    kind: InstanceKind | str = InstanceKind.CPU,
    **extra: Any,
) -> ModelConfig:
    """A config that serves a model with this signature.

    ``max_batch_size`` defaults to ``DEFAULT_MAX_BATCH_SIZE`` for a batched signature and 0 otherwise.
    ``dynamic_batching=True`` adds a plain dynamic batcher when the model batches. ``platform`` may be
    None when ``backend=`` is given in ``extra``; other ModelConfig fields go in ``extra`` too.

    Example:
        >>> cfg = config_from_signature("resnet", onnx_signature("model.onnx"),  # doctest: +SKIP
        ...                             "onnxruntime_onnx", max_batch_size=16, instances=2)

    Raises:
        ConfigError: for a batch size on a signature without a batch dimension, or an invalid config.
    """
    if max_batch_size is None:
        max_batch_size = DEFAULT_MAX_BATCH_SIZE if signature.batched else 0
    if max_batch_size > 0 and not signature.batched:
        raise ConfigError(
            f"model {name!r}: max_batch_size {max_batch_size} needs a signature with a batch dimension; "
            "use max_batch_size=0, or export the model with a dynamic batch axis",
            model=name,
        )
    if isinstance(dynamic_batching, DynamicBatching):
        batching: DynamicBatching | None = dynamic_batching
    else:
        batching = DynamicBatching() if dynamic_batching and max_batch_size > 0 else None
    inputs, outputs = signature.inputs, signature.outputs
    if signature.batched and max_batch_size == 0:
        # Without Triton's batching the batch axis becomes an ordinary variable dimension.
        inputs = tuple(_with_leading_wildcard(t) for t in inputs)
        outputs = tuple(_with_leading_wildcard(t) for t in outputs)
    groups = extra.pop("instance_groups", None)
    if groups is None and platform != "ensemble":
        groups = (InstanceGroup(count=instances, kind=InstanceKind.parse(kind)),)
    return ModelConfig(
        name=name,
        platform=platform,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        dynamic_batching=batching,
        instance_groups=groups or (),
        **extra,
    )


def _with_leading_wildcard(spec: TensorSpec) -> TensorSpec:
    if spec.reshape == ():
        return dataclasses.replace(spec, dims=(-1,), reshape=None)
    reshape = None if spec.reshape is None else (-1, *spec.reshape)
    return dataclasses.replace(spec, dims=(-1, *spec.dims), reshape=reshape)


def _dims_match(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def _model_shape(spec: TensorSpec, batched: bool) -> tuple[int, ...]:
    """The full shape the model itself sees: reshape when given, batch axis in front when batching."""
    dims = spec.reshape if spec.reshape is not None else spec.dims
    return (-1, *dims) if batched else tuple(dims)


def check_signature(config: ModelConfig, signature: Signature) -> list[str]:
    """Differences between a config and a model file's signature, one readable sentence each.

    Names must match both ways (an optional config input may be absent from the model), dtypes must
    be equal, and full shapes (batch axis included) must agree, -1 on either side matching anything.

    Example:
        >>> sig = onnx_signature("repo/resnet/1/model.onnx")  # doctest: +SKIP
        >>> check_signature(read_config("repo/resnet"), sig)  # doctest: +SKIP
        []

    Returns:
        An empty list when they agree.
    """
    problems: list[str] = []
    config_batched = config.max_batch_size > 0
    if config_batched and not signature.batched:
        problems.append(
            f"config has max_batch_size {config.max_batch_size} but the model has no batch dimension; "
            "set max_batch_size: 0 or export with a dynamic batch axis"
        )
    if config.is_ensemble:
        return problems  # an ensemble has no model file of its own
    for kind, declared, actual in (
        ("input", config.inputs, signature.inputs),
        ("output", config.outputs, signature.outputs),
    ):
        actual_by_name = {t.name: t for t in actual}
        declared_names = {t.name for t in declared}
        for spec in declared:
            model_spec = actual_by_name.get(spec.name)
            if model_spec is None:
                if not spec.optional:
                    problems.append(
                        f"{kind} {spec.name!r} is in the config but not in the model "
                        f"(the model's {kind}s: {', '.join(actual_by_name) or 'none'})"
                    )
                continue
            if spec.dtype is not model_spec.dtype:
                problems.append(
                    f"{kind} {spec.name!r}: config says {spec.dtype.proto_name}, the model has "
                    f"{model_spec.dtype.proto_name}"
                )
            want = _model_shape(spec, config_batched)
            have = _model_shape(model_spec, signature.batched)
            if not _dims_match(want, have):
                problems.append(
                    f"{kind} {spec.name!r}: config shape {list(want)} (batch axis included) does not "
                    f"match the model's {list(have)}"
                )
        for name in actual_by_name:
            if name not in declared_names:
                problems.append(f"{kind} {name!r} is in the model but not in the config")
    return problems
