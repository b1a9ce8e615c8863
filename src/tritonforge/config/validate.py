"""Checks across a whole model config, as Triton's ValidateModelConfig makes them at load time.

Each piece (a tensor, a batcher) checks itself when built; what needs two pieces at once is here:
batch sizes against ``max_batch_size``, platform against backend, warmup against inputs, and the
data flow of an ensemble.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tritonforge.config._strictness import unusual
from tritonforge.config.parts import EnsembleStep, TensorSpec
from tritonforge.errors import ConfigError

if TYPE_CHECKING:
    from tritonforge.config.model import ModelConfig

__all__ = [
    "BACKEND_OF_PLATFORM",
    "ENSEMBLE_PLATFORM",
    "INT32_MAX",
    "INT64_MAX",
    "MAX_MODEL_NAME_CHARS",
    "MODEL_NAME_RULE",
    "model_name_problem",
    "validate_config",
]

INT32_MAX = 2**31 - 1
"""max_batch_size, instance counts, preferred batch sizes: int32 in model_config.proto."""
INT64_MAX = 2**63 - 1
"""Dims and model versions: int64 in model_config.proto (a version folder beyond it is not a version)."""
MAX_MODEL_NAME_CHARS = 255
"""A model name is a folder name: at most 255 bytes on Linux file systems."""
MODEL_NAME_RULE = (
    f"a model name is 1 to {MAX_MODEL_NAME_CHARS} ASCII letters, digits, '_', '-' or '.', starting with a "
    "letter, digit or '_' (Triton's Python backend starts each model's process through a shell command "
    "line holding the model's path: a space, tab or ';' there breaks the model's start, '*' is a glob, "
    "and non-ASCII names are not found)"
)
_MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

ENSEMBLE_PLATFORM = "ensemble"

#: Platforms Triton knows, and the backend that serves each (None: Triton's own ensemble scheduler).
BACKEND_OF_PLATFORM: dict[str, str | None] = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "pytorch",
    "tensorrt_plan": "tensorrt",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
    ENSEMBLE_PLATFORM: None,
}

# Backends Triton ties to platforms; any other backend name is a custom one (python, openvino, ...).
_PLATFORM_BACKENDS = {b for b in BACKEND_OF_PLATFORM.values() if b}


def validate_config(config: ModelConfig) -> None:
    """Raise ConfigError for the first thing in ``config`` that Triton would reject.

    Raises:
        ConfigError: naming the model and the field, and saying how to fix it.
    """
    for check in (
        _check_name,
        _check_platform,
        _check_tensors,
        _check_batching,
        _check_sequence,
        _check_response_cache,
        _check_warmup,
        _check_ensemble,
    ):
        try:
            check(config)
        except ConfigError as exc:
            if exc.model is not None:
                raise
            raise ConfigError(f"model {config.name!r}: {exc.message}", model=config.name or None) from exc


def model_name_problem(name: object) -> str | None:
    """Why ``name`` can't be a model's name (None when it can), as one sentence stating the rule.

    Example:
        >>> model_name_problem("resnet50-v1.5") is None
        True
        >>> model_name_problem("a b")[:45]
        "'a b' is not a usable model name: a model nam"
    """
    if not isinstance(name, str):
        return f"a model name is a string, not {type(name).__name__}"
    if len(name) <= MAX_MODEL_NAME_CHARS and _MODEL_NAME.fullmatch(name):
        return None
    shown = repr(name) if len(name) <= 80 else repr(name[:60]) + f"... ({len(name)} characters)"
    return f"{shown} is not a usable model name: {MODEL_NAME_RULE}"


def _check_name(config: ModelConfig) -> None:
    if not isinstance(config.name, str) or not config.name:
        raise ConfigError("name must be a non-empty string (it is the model's folder name)")
    problem = model_name_problem(config.name)
    if problem is not None:
        raise ConfigError(problem, model=config.name)
    if config.default_model_filename is not None and (
        not config.default_model_filename or "/" in config.default_model_filename
    ):
        raise ConfigError("default_model_filename must be a file name inside the version folder")
    for key, value in config.parameters.items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ConfigError(f"parameters must map non-empty strings to strings, got {key!r}: {value!r}")


def _check_platform(config: ModelConfig) -> None:
    platform, backend = config.platform, config.backend
    if not platform and not backend:
        raise ConfigError(
            "set platform (e.g. 'onnxruntime_onnx', 'pytorch_libtorch', 'ensemble') or backend "
            "(e.g. 'onnxruntime', 'python')"
        )
    if platform is not None and platform not in BACKEND_OF_PLATFORM:
        message = (
            f"unknown platform {platform!r}; use one of {', '.join(sorted(BACKEND_OF_PLATFORM))}, "
            "or set backend instead"
        )
        if not backend:
            raise ConfigError(message)
        unusual(message + " (Triton ignores it since backend is set)")
    if backend is not None and not backend:
        raise ConfigError("backend must be a non-empty name, or None")
    if platform == ENSEMBLE_PLATFORM and backend:
        raise ConfigError(f"an ensemble has platform 'ensemble' and no backend; drop backend={backend!r}")
    if platform and backend in _PLATFORM_BACKENDS and BACKEND_OF_PLATFORM[platform] != backend:
        raise ConfigError(
            f"platform {platform!r} is served by backend {BACKEND_OF_PLATFORM[platform]!r}, not "
            f"{backend!r}; drop one of them or make them agree"
        )


def _check_unique(kind: str, tensors: Sequence[TensorSpec]) -> None:
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name in seen:
            # Triton 2.51 loads such a model, but no request to it can succeed.
            raise ConfigError(
                f"{kind} name {tensor.name!r} appears twice: Triton loads the model but every request to it "
                f"fails; give each {kind} its own name"
            )
        seen.add(tensor.name)


def _check_shape_tensors(config: ModelConfig) -> None:
    shaped = [t.name for t in (*config.inputs, *config.outputs) if t.is_shape_tensor]
    tensorrt = config.platform == "tensorrt_plan" or config.backend == "tensorrt"
    if shaped and not tensorrt:
        raise ConfigError(
            f"tensors {shaped} are shape tensors, which Triton supports only for the TensorRT platform "
            "(tensorrt_plan); drop is_shape_tensor"
        )


def _check_tensors(config: ModelConfig) -> None:
    _check_shape_tensors(config)
    # An output may share its name with an input: Triton keeps the two lists apart.
    _check_unique("input", config.inputs)
    _check_unique("output", config.outputs)
    for output in config.outputs:
        if output.optional or output.allow_ragged_batch:
            raise ConfigError(f"output {output.name!r}: optional and allow_ragged_batch apply to inputs only")
    if config.max_batch_size == 0:
        for tensor in (*config.inputs, *config.outputs):
            if tensor.reshape == ():
                raise ConfigError(
                    f"tensor {tensor.name!r}: an empty reshape (a scalar) needs a batching model; "
                    "set max_batch_size > 0 or give reshape a dimension"
                )


def _check_batching(config: ModelConfig) -> None:
    mbs = config.max_batch_size
    if isinstance(mbs, bool) or not isinstance(mbs, int) or mbs < 0:
        raise ConfigError(f"max_batch_size must be an integer >= 0 (0: no batching), got {mbs!r}")
    if mbs > INT32_MAX:
        raise ConfigError(
            f"max_batch_size {mbs} is more than {INT32_MAX}, the largest model_config.proto holds (int32); "
            "use a batch size the model can run (8 to 256 are usual)"
        )
    batching = config.dynamic_batching
    if batching is None:
        return
    if mbs == 0:
        # Triton accepts it (the batcher then only queues), but it batches nothing.
        unusual("dynamic_batching needs a batching model; set max_batch_size > 0 or drop dynamic_batching")
    too_big = [size for size in batching.preferred_batch_sizes if size > mbs]
    if too_big:
        raise ConfigError(
            f"preferred batch sizes {too_big} exceed max_batch_size {mbs}; lower them or raise max_batch_size"
        )


def _check_response_cache(config: ModelConfig) -> None:
    if not config.response_cache:
        return
    if config.sequence_batching is not None:
        raise ConfigError("the response cache does not support sequence batching; drop response_cache")
    if config.decoupled:
        raise ConfigError("the response cache does not support decoupled models; drop response_cache")


def _check_sequence(config: ModelConfig) -> None:
    seq = config.sequence_batching
    if seq is None:
        return
    if config.dynamic_batching is not None:
        raise ConfigError("a model has one scheduler: dynamic_batching or sequence_batching, not both")
    strategy = seq.strategy
    limit = max(config.max_batch_size, 1)
    for size in getattr(strategy, "preferred_batch_sizes", ()):
        if size > limit:
            raise ConfigError(
                f"sequence_batching.oldest: preferred batch size {size} exceeds max_batch_size "
                f"{config.max_batch_size}; lower it or raise max_batch_size"
            )
    inputs = {tensor.name for tensor in config.inputs}
    for control_input in seq.control_inputs:
        if control_input.name in inputs:
            unusual(
                f"sequence control input {control_input.name!r} is also a model input; Triton fills "
                "control inputs itself, so leave it out of the inputs"
            )


def _check_warmup(config: ModelConfig) -> None:
    limit = max(config.max_batch_size, 1)
    inputs = {tensor.name: tensor for tensor in config.inputs}
    for warmup in config.warmup:
        where = f"model warmup {warmup.name!r}"
        if warmup.batch_size > limit:
            hint = "1 for a model that does not batch" if config.max_batch_size == 0 else f"<= {limit}"
            raise ConfigError(f"{where}: batch_size {warmup.batch_size} must be {hint} (max_batch_size)")
        for name, data in warmup.inputs.items():
            if name not in inputs:
                raise ConfigError(f"{where}: input {name!r} is not a model input; known: {', '.join(inputs)}")
            if data.dtype is not inputs[name].dtype:
                raise ConfigError(
                    f"{where}: input {name!r} has dtype {data.dtype.value} but the model input is "
                    f"{inputs[name].dtype.value}"
                )
        missing = [n for n, t in inputs.items() if not t.optional and n not in warmup.inputs]
        if missing:
            raise ConfigError(f"{where}: no data for required inputs {missing}; add a WarmupInput for each")


def _check_ensemble(config: ModelConfig) -> None:
    is_ensemble = config.platform == ENSEMBLE_PLATFORM
    if config.ensemble_steps is None:
        if is_ensemble:
            raise ConfigError("an ensemble needs ensemble_steps (its ensemble_scheduling)")
        return
    if not is_ensemble:
        raise ConfigError("ensemble_steps need platform='ensemble'")
    for field, value in (
        ("instance_groups", config.instance_groups),
        ("optimization", config.optimization),
        ("warmup", config.warmup),
    ):
        if value:
            raise ConfigError(f"an ensemble can't have {field}; Triton rejects it (its steps have their own)")
    if not config.ensemble_steps:
        raise ConfigError("an ensemble needs at least one step")
    _check_data_flow(config.ensemble_steps, [t.name for t in config.inputs], [t.name for t in config.outputs])


def _check_data_flow(steps: Sequence[EnsembleStep], inputs: Iterable[str], outputs: Iterable[str]) -> None:
    """Every tensor is written once, read by someone, and reachable from the ensemble's inputs."""
    inputs, outputs = list(inputs), list(outputs)
    writers: dict[str, int] = {}
    for index, step in enumerate(steps):
        for tensor in step.output_map.values():
            if tensor in writers or tensor in inputs:
                raise ConfigError(
                    f"step {index} ({step.model_name}): ensemble tensor {tensor!r} is already written "
                    "elsewhere; each ensemble tensor has exactly one writer"
                )
            writers[tensor] = index
    read = {tensor for step in steps for tensor in step.input_map.values()}
    for name in inputs:
        if name not in read:
            raise ConfigError(f"ensemble input {name!r} is not read by any step")
    ready = set(inputs)
    pending = list(enumerate(steps))
    while pending:
        runnable = [(i, s) for i, s in pending if set(s.input_map.values()) <= ready]
        if not runnable:
            index, step = pending[0]
            missing = sorted(set(step.input_map.values()) - ready)
            raise ConfigError(
                f"step {index} ({step.model_name}) reads {missing}, which no ensemble input or "
                "earlier step provides (or the steps form a cycle)"
            )
        for index, step in runnable:
            ready.update(step.output_map.values())
            pending.remove((index, step))
    output_names = set(outputs)
    for name in output_names:
        if name not in writers:
            raise ConfigError(f"ensemble output {name!r} is not written by any step")
    unused = sorted(set(writers) - read - output_names)
    if unused:
        raise ConfigError(
            f"ensemble tensors {unused} are written but never used; map them to an output or drop them"
        )
