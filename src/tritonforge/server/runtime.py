"""The batching engine behind our Python-based ``onnxruntime`` and ``pytorch`` backends.

It runs inside Triton's Python-backend stub (where ``triton_python_backend_utils`` is importable), never
in the app. One ``execute`` call receives every request Triton's dynamic batcher grouped together; they are
concatenated along the batch axis, run once, and the outputs split back per request. Requests whose
non-batch dims differ (variable sequence lengths) form separate groups, and a group that fails is retried
request by request so that one bad request fails alone instead of taking its neighbours down with it.

The framework-specific part is a ``Runner``: ``run(inputs: dict[name, ndarray]) -> dict[name, ndarray]``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]
Runner = Callable[[Arrays], Arrays]

# Triton's wire names for config data types -> numpy; STRING travels as BYTES objects.
_NUMPY_OF_TYPE = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}


class TensorInfo:
    """One input or output of the served config."""

    __slots__ = ("dims", "dtype", "name", "optional")

    def __init__(self, entry: Mapping[str, Any]) -> None:
        self.name: str = entry["name"]
        data_type = entry.get("data_type", "TYPE_FP32")
        if data_type not in _NUMPY_OF_TYPE:
            raise ValueError(f"tensor '{self.name}': data type {data_type} is not supported by this backend")
        self.dtype = np.dtype(_NUMPY_OF_TYPE[data_type])
        self.dims = [int(d) for d in entry.get("dims", [])]
        self.optional = bool(entry.get("optional", False))


class ServedModel:
    """What a backend needs to know of its model: the config, file, tensors and parameters."""

    def __init__(self, args: Mapping[str, str], default_filename: str) -> None:
        self.config: dict[str, Any] = json.loads(args["model_config"])
        self.name: str = args["model_name"]
        self.version: str = args["model_version"]
        filename = self.config.get("default_model_filename") or default_filename
        self.path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.exists(self.path):
            raise FileNotFoundError(
                f"model '{self.name}' version {self.version}: no model file at {self.path} "
                f"(put the model there, or set default_model_filename in config.pbtxt)"
            )
        self.max_batch_size = int(self.config.get("max_batch_size", 0))
        self.inputs = [TensorInfo(e) for e in self.config.get("input", [])]
        self.outputs = [TensorInfo(e) for e in self.config.get("output", [])]
        self.parameters: dict[str, str] = {
            key: value.get("string_value", "") for key, value in self.config.get("parameters", {}).items()
        }

    def int_parameter(self, *names: str, default: int = 0) -> int:
        """The first of ``names`` set in the config's parameters, as an int (Triton's own keys first)."""
        for name in names:
            raw = self.parameters.get(name)
            if raw not in (None, ""):
                try:
                    return int(raw)
                except ValueError as exc:
                    raise ValueError(
                        f"model '{self.name}': parameter {name}={raw!r} is not an integer"
                    ) from exc
        return default


class BatchingExecutor:
    """Turns a list of Triton requests into batched runner calls and per-request responses."""

    def __init__(self, model: ServedModel, runner: Runner, pb_utils: Any) -> None:
        self.model = model
        self.runner = runner
        self.pb = pb_utils
        self.batching = model.max_batch_size > 0

    # The public entry point of the stub's execute().
    def execute(self, requests: Sequence[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: list[tuple[int, Arrays, list[str]]] = []
        for index, request in enumerate(requests):
            try:
                parsed.append((index, self._read_inputs(request), self._requested_outputs(request)))
            except Exception as exc:
                responses[index] = self._error(exc)
        for group in self._groups(parsed):
            self._run_group(group, responses)
        return responses

    def _read_inputs(self, request: Any) -> Arrays:
        arrays: Arrays = {}
        for info in self.model.inputs:
            tensor = self.pb.get_input_tensor_by_name(request, info.name)
            if tensor is None:
                if info.optional:
                    continue
                raise ValueError(f"input '{info.name}' is required by model '{self.model.name}' but missing")
            array = tensor.as_numpy()
            if array.dtype != info.dtype and info.dtype != np.object_:
                array = array.astype(info.dtype)
            arrays[info.name] = array
        return arrays

    def _requested_outputs(self, request: Any) -> list[str]:
        names = list(request.requested_output_names())
        return names or [info.name for info in self.model.outputs]

    def _groups(
        self, parsed: list[tuple[int, Arrays, list[str]]]
    ) -> list[list[tuple[int, Arrays, list[str]]]]:
        """Requests that can share one run: same inputs present, same non-batch dims."""
        if not self.batching:
            return [[item] for item in parsed]
        groups: dict[tuple[Any, ...], list[tuple[int, Arrays, list[str]]]] = {}
        for item in parsed:
            key = tuple(sorted((name, a.shape[1:], a.dtype.str) for name, a in item[1].items()))
            groups.setdefault(key, []).append(item)
        return list(groups.values())

    def _run_group(self, group: list[tuple[int, Arrays, list[str]]], responses: list[Any]) -> None:
        if len(group) == 1:
            index, arrays, wanted = group[0]
            responses[index] = self._respond(lambda: self.runner(arrays), wanted, None)
            return
        sizes = [self._batch_size(arrays) for _, arrays, _ in group]
        merged = {name: np.concatenate([arrays[name] for _, arrays, _ in group]) for name in group[0][1]}
        try:
            outputs = self.runner(merged)
            self._check_batch(outputs, sum(sizes))
        except Exception:
            # One request may be poisoning the batch: answer each alone so only the bad one fails.
            for item in group:
                self._run_group([item], responses)
            return
        offset = 0
        for (index, _, wanted), size in zip(group, sizes, strict=True):
            part = {name: value[offset : offset + size] for name, value in outputs.items()}
            responses[index] = self._respond(lambda part=part: part, wanted, size)
            offset += size

    @staticmethod
    def _batch_size(arrays: Arrays) -> int:
        sizes = {a.shape[0] for a in arrays.values() if a.ndim > 0}
        if len(sizes) != 1:
            raise ValueError(f"inputs disagree on the batch size: {sorted(sizes)}")
        return sizes.pop()

    def _check_batch(self, outputs: Arrays, expected: int) -> None:
        for name, value in outputs.items():
            if value.ndim == 0 or value.shape[0] != expected:
                raise ValueError(
                    f"output '{name}' has shape {value.shape}, whose first dim is not the batch of {expected}"
                )

    def _respond(self, run: Callable[[], Arrays], wanted: list[str], batch: int | None) -> Any:
        try:
            outputs = run()
            tensors = []
            by_name = {info.name: info for info in self.model.outputs}
            for name in wanted:
                if name not in outputs:
                    raise ValueError(
                        f"model '{self.model.name}' produced no output '{name}' "
                        f"(it produced {sorted(outputs)})"
                    )
                value = np.asarray(outputs[name])
                info = by_name.get(name)
                if info is not None and info.dtype != np.object_ and value.dtype != info.dtype:
                    value = value.astype(info.dtype)
                tensors.append(self.pb.Tensor(name, np.ascontiguousarray(value)))
            return self.pb.InferenceResponse(output_tensors=tensors)
        except Exception as exc:
            return self._error(exc)

    def _error(self, exc: BaseException) -> Any:
        message = f"{type(exc).__name__}: {exc}"
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))


def onnxruntime_runner(model: ServedModel) -> Runner:
    """An onnxruntime session for the model, honouring Triton's ORT backend thread parameters."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    intra = model.int_parameter("intra_op_thread_count", "INTRA_OP_THREAD_COUNT")
    inter = model.int_parameter("inter_op_thread_count", "INTER_OP_THREAD_COUNT")
    if intra > 0:
        options.intra_op_num_threads = intra
    if inter > 0:
        options.inter_op_num_threads = inter
    level = model.int_parameter("graph_optimization_level", default=99)
    options.graph_optimization_level = {
        -1: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        0: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    session = ort.InferenceSession(model.path, sess_options=options, providers=["CPUExecutionProvider"])
    known_inputs = {i.name for i in session.get_inputs()}
    known_outputs = [o.name for o in session.get_outputs()]
    for info in model.inputs:
        if info.name not in known_inputs:
            raise ValueError(
                f"model '{model.name}': config input '{info.name}' is not an input of {model.path} "
                f"(the file has {sorted(known_inputs)})"
            )
    for info in model.outputs:
        if info.name not in known_outputs:
            raise ValueError(
                f"model '{model.name}': config output '{info.name}' is not an output of {model.path} "
                f"(the file has {known_outputs})"
            )

    def run(inputs: Arrays) -> Arrays:
        return dict(zip(known_outputs, session.run(known_outputs, inputs), strict=True))

    return run


def _suffix_index(name: str) -> int | None:
    """Triton's pytorch naming convention: ``INPUT__0`` -> 0."""
    head, sep, tail = name.rpartition("__")
    return int(tail) if sep and head and tail.isdigit() else None


def pytorch_runner(model: ServedModel) -> Runner:
    """A TorchScript module for the model, with Triton's pytorch backend naming and thread parameters."""
    import torch

    intra = model.int_parameter("INTRA_OP_THREAD_COUNT", "intra_op_thread_count")
    inter = model.int_parameter("INTER_OP_THREAD_COUNT", "inter_op_thread_count")
    if intra > 0:
        torch.set_num_threads(intra)
    if inter > 0:
        # may only be set once per process; the stub hosts one model instance, so first wins
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(inter)
    module = torch.jit.load(model.path, map_location="cpu")
    module.eval()

    input_names = [info.name for info in model.inputs]
    indices = [_suffix_index(name) for name in input_names]
    by_index = all(i is not None for i in indices)
    try:
        arg_names = [a.name for a in module.forward.schema.arguments][1:]  # drop self
    except Exception:
        arg_names = []
    by_keyword = not by_index and set(input_names) <= set(arg_names)
    # INPUT__<i> names are positions; otherwise the config's order is the forward's order
    positional = [n for _, n in sorted(zip(indices, input_names, strict=True))] if by_index else input_names
    output_names = [info.name for info in model.outputs]
    out_indices = [_suffix_index(name) for name in output_names]
    if not all(i is not None for i in out_indices):
        out_indices = list(range(len(output_names)))

    def to_tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array))

    def run(inputs: Arrays) -> Arrays:
        with torch.inference_mode():
            if by_keyword:
                result = module(**{name: to_tensor(inputs[name]) for name in input_names if name in inputs})
            else:
                result = module(*[to_tensor(inputs[name]) for name in positional if name in inputs])
        if isinstance(result, dict):
            return {name: result[name].cpu().numpy() for name in output_names if name in result}
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        out: Arrays = {}
        for name, index in zip(output_names, out_indices, strict=True):
            if index >= len(values):
                raise ValueError(
                    f"output '{name}' asks for result {index}; the module returned {len(values)}"
                )
            out[name] = values[index].detach().cpu().numpy()
        return out

    return run


class PythonBackendModel:
    """Base of the ``TritonPythonModel`` classes our Python-based backends export."""

    default_filename = ""

    @staticmethod
    def make_runner(model: ServedModel) -> Runner:
        raise NotImplementedError

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        model = ServedModel(args, self.default_filename)
        self.executor = BatchingExecutor(model, self.make_runner(model), pb_utils)

    def execute(self, requests: list[Any]) -> list[Any]:
        return self.executor.execute(requests)

    def finalize(self) -> None:
        self.executor = None  # type: ignore[assignment]


class OnnxRuntimeModel(PythonBackendModel):
    default_filename = "model.onnx"
    make_runner = staticmethod(onnxruntime_runner)


class PyTorchModel(PythonBackendModel):
    default_filename = "model.pt"
    make_runner = staticmethod(pytorch_runner)
