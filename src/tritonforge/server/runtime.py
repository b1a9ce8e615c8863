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
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from tritonforge.error_accounting import error_counter, settle_errors
from tritonforge.server.stub_modules import defer_asyncio

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
    """Turns a list of Triton requests into batched runner calls and per-request responses.

    The per-request work is kept to what Triton's Python backend needs: inputs are read as zero-copy
    views of the request's shared memory (``as_numpy``), converted only when their dtype differs from the
    config's, concatenated once per batch (never for a lone request), and the outputs are handed back as
    contiguous slices of the batch's result (views, no per-request copy before Triton's own one into the
    response's shared memory). Tensor facts are looked up once at start, output dtypes and layout are
    settled once per batch, and a model with one output never asks a request which outputs it wants.
    """

    def __init__(self, model: ServedModel, runner: Runner, pb_utils: Any) -> None:
        self.model = model
        self.runner = runner
        self.pb = pb_utils
        self.batching = model.max_batch_size > 0
        # (name, dtype or None when any dtype is taken as is, optional) per input, in config order
        self._inputs = [
            (info.name, None if info.dtype == np.object_ else info.dtype, info.optional)
            for info in model.inputs
        ]
        self._output_dtypes = {
            info.name: None if info.dtype == np.object_ else info.dtype for info in model.outputs
        }
        self._all_outputs = [info.name for info in model.outputs]
        # one output: a request wants it whether it names it or not (Triton sends all when none is named)
        self._ask_wanted = len(self._all_outputs) != 1
        # Requests to a model of one numeric input that want one numeric output, with a runner that
        # computes just that output (``runner.single(array, output)``): the shortest path, no dicts or
        # per-output loops, and no work on outputs nobody asked for (an ensemble step maps one of two).
        single: Callable[[np.ndarray, str], Any] | None = getattr(runner, "single", None)
        numeric = np.object_ not in [info.dtype for info in (*model.inputs, *model.outputs)]
        one_input = len(model.inputs) == 1 and not model.inputs[0].optional
        self._single = single if one_input and numeric and model.outputs else None
        self._single_in = (model.inputs[0].name, model.inputs[0].dtype) if self._single is not None else None

    # The public entry point of the stub's execute().
    def execute(self, requests: Sequence[Any]) -> list[Any]:
        if self._single is not None:
            try:
                answered = self._answer_single(requests)
            except Exception:  # anything unforeseen: the general path answers, request by request
                answered = None
            if answered is not None:
                return answered
        if len(requests) == 1:  # the common case at low load: no grouping, no concatenation
            request = requests[0]
            try:
                arrays = self._read_inputs(request)
                wanted = self._requested_outputs(request)
            except Exception as exc:
                return [self._error(exc)]
            return [self._respond_run(arrays, wanted)]
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[tuple[int, Arrays, Collection[str]]]] = {}
        batching = self.batching
        for index, request in enumerate(requests):
            try:
                arrays = self._read_inputs(request)
                wanted = self._requested_outputs(request)
            except Exception as exc:
                responses[index] = self._error(exc)
                continue
            if not batching:
                responses[index] = self._respond_run(arrays, wanted)
                continue
            # requests that can share one run: same inputs present, same non-batch dims and dtypes
            key = tuple([(name, a.shape[1:], a.dtype.str) for name, a in arrays.items()])
            groups.setdefault(key, []).append((index, arrays, wanted))
        for group in groups.values():
            self._run_group(group, responses)
        return responses

    def _answer_single(self, requests: Sequence[Any]) -> list[Any] | None:
        """The requests to a model of one input, all wanting the same one output, run at once; ``None``
        to take the general path instead (a missing or extra input, another dtype or non-batch shape,
        several outputs wanted, a failed run — which the general path retries request by request —, an
        output the runner did not give as configured)."""
        single, into = self._single, self._single_in
        if single is None or into is None:
            return None
        name, dtype = into
        wanted: str | None = None
        arrays = []
        for request in requests:
            tensors = request.inputs()
            if len(tensors) != 1:
                return None
            tensor = tensors[0]
            if tensor.name() != name:
                return None
            array = tensor.as_numpy()
            if array.dtype != dtype:
                return None
            asked = self._requested_outputs(request)  # a set from Triton, a list from us
            if len(asked) != 1:
                return None
            (one,) = asked
            if wanted is not None and one != wanted:
                return None
            wanted = one
            arrays.append(array)
        out_dtype = None if wanted is None else self._output_dtypes.get(wanted)
        if wanted is None or out_dtype is None:
            return None  # not an output of the config: the general path says so
        if len(arrays) == 1:
            merged = arrays[0]
        elif not self.batching or any(a.ndim == 0 or a.shape[1:] != arrays[0].shape[1:] for a in arrays):
            return None
        else:
            merged = np.concatenate(arrays)
        try:
            out = single(merged, wanted)
        except Exception as exc:
            return [self._error(exc)] if len(arrays) == 1 else None
        if type(out) is not np.ndarray or out.dtype != out_dtype or not out.flags.c_contiguous:
            return None
        make, respond = self.pb.Tensor, self.pb.InferenceResponse
        if len(arrays) == 1:
            return [respond(output_tensors=[make(wanted, out)])]
        if out.ndim == 0 or out.shape[0] != merged.shape[0]:
            return None
        responses = []
        offset = 0
        for array in arrays:
            end = offset + array.shape[0]
            responses.append(respond(output_tensors=[make(wanted, out[offset:end])]))
            offset = end
        return responses

    def _read_inputs(self, request: Any) -> Arrays:
        """The request's inputs by config name, as numpy views of its shared memory (dtype per config).

        One pass over ``request.inputs()`` (``get_input_tensor_by_name`` would scan them once per input).
        """
        given = {tensor.name(): tensor for tensor in request.inputs()}
        arrays: Arrays = {}
        for name, dtype, optional in self._inputs:
            tensor = given.get(name)
            if tensor is None:
                if optional:
                    continue
                raise ValueError(f"input '{name}' is required by model '{self.model.name}' but missing")
            array = tensor.as_numpy()
            if dtype is not None and array.dtype != dtype:
                array = array.astype(dtype)
            arrays[name] = array
        return arrays

    def _requested_outputs(self, request: Any) -> Collection[str]:
        if not self._ask_wanted:
            return self._all_outputs
        return request.requested_output_names() or self._all_outputs

    def _run_group(self, group: list[tuple[int, Arrays, Collection[str]]], responses: list[Any]) -> None:
        if len(group) == 1:
            index, arrays, wanted = group[0]
            responses[index] = self._respond_run(arrays, wanted)
            return
        try:
            sizes = [self._batch_size(arrays) for _, arrays, _ in group]
        except ValueError:
            for item in group:  # the request whose inputs disagree fails alone
                self._run_group([item], responses)
            return
        names = list(group[0][1])
        merged = {name: np.concatenate([arrays[name] for _, arrays, _ in group]) for name in names}
        try:
            outputs = self._settled(self.runner(merged), sum(sizes))
        except Exception:
            # One request may be poisoning the batch: answer each alone so only the bad one fails.
            for item in group:
                self._run_group([item], responses)
            return
        make, respond = self.pb.Tensor, self.pb.InferenceResponse
        offset = 0
        for (index, _, wanted), size in zip(group, sizes, strict=True):
            end = offset + size
            try:
                responses[index] = respond(
                    output_tensors=[make(name, self._output(outputs, name)[offset:end]) for name in wanted]
                )
            except Exception as exc:
                responses[index] = self._error(exc)
            offset = end

    @staticmethod
    def _batch_size(arrays: Arrays) -> int:
        sizes = {a.shape[0] for a in arrays.values() if a.ndim > 0}
        if len(sizes) != 1:
            raise ValueError(f"inputs disagree on the batch size: {sorted(sizes)}")
        return sizes.pop()

    def _settled(self, outputs: Arrays, expected: int | None) -> Arrays:
        """The runner's outputs as C-contiguous arrays of the config's dtypes (once per run, not per request).

        ``expected``: the batch every output's first dim must have (``None``: no batch to split).
        """
        dtypes = self._output_dtypes
        settled: Arrays = {}
        for name, value in outputs.items():
            if not isinstance(value, np.ndarray):
                value = np.asarray(value)
            if expected is not None and (value.ndim == 0 or value.shape[0] != expected):
                raise ValueError(
                    f"output '{name}' has shape {value.shape}, whose first dim is not the batch of {expected}"
                )
            dtype = dtypes.get(name)
            if dtype is not None and value.dtype != dtype:
                value = value.astype(dtype)
            if not value.flags.c_contiguous:
                value = np.ascontiguousarray(value)
            settled[name] = value
        return settled

    def _output(self, outputs: Arrays, name: str) -> np.ndarray:
        value = outputs.get(name)
        if value is None:
            raise ValueError(
                f"model '{self.model.name}' produced no output '{name}' (it produced {sorted(outputs)})"
            )
        return value

    def _respond_run(self, arrays: Arrays, wanted: Collection[str]) -> Any:
        try:
            outputs = self._settled(self.runner(arrays), None)
            make = self.pb.Tensor
            return self.pb.InferenceResponse(
                output_tensors=[make(name, self._output(outputs, name)) for name in wanted]
            )
        except Exception as exc:
            return self._error(exc)

    def _error(self, exc: BaseException) -> Any:
        message = f"{type(exc).__name__}: {exc}"
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_intra_op_threads(model: ServedModel) -> int:
    """Intra-op threads for a model whose config names none: the CPUs shared out among its instances.

    Each instance is its own stub process with its own pool, so N instances of all-core pools would
    oversubscribe the machine N times over.
    """
    instances = sum(int(g.get("count", 1) or 1) for g in model.config.get("instance_group", [])) or 1
    return max(1, available_cpus() // instances)


def onnxruntime_options(model: ServedModel) -> Any:
    """onnxruntime ``SessionOptions`` from Triton's ORT backend parameters; no pool is left at its default.

    ``intra_op_thread_count`` / ``inter_op_thread_count`` as the C++ backend reads them (``0`` means
    onnxruntime's own default, as there); absent, intra-op threads are the CPUs shared among the model's
    instances and inter-op threads 1 (sequential execution uses none). ``execution_mode`` ``1`` runs
    branches in parallel. Every ``session.*`` parameter is a session config entry; spinning
    (``session.intra_op.allow_spinning`` / ``session.inter_op.allow_spinning``) is off unless set to
    ``1``, so idle pools of the many models of one server do not burn the cores the busy ones need.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    params = model.parameters
    intra = model.int_parameter("intra_op_thread_count", "INTRA_OP_THREAD_COUNT", default=-1)
    inter = model.int_parameter("inter_op_thread_count", "INTER_OP_THREAD_COUNT", default=-1)
    options.intra_op_num_threads = default_intra_op_threads(model) if intra < 0 else intra
    options.inter_op_num_threads = 1 if inter < 0 else inter
    if model.int_parameter("execution_mode", default=0) == 1:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    entries = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}
    entries.update({k: v for k, v in params.items() if k.startswith("session.")})
    for key, value in entries.items():
        if key.endswith(".allow_spinning") and value not in ("0", "1"):
            # onnxruntime would take any text here silently and spin
            raise ValueError(f'model \'{model.name}\': parameter {key}={value!r} must be "0" or "1"')
        try:
            options.add_session_config_entry(key, value)
        except Exception as exc:
            raise ValueError(f"model '{model.name}': parameter {key}={value!r} was refused: {exc}") from exc
    level = model.int_parameter("graph_optimization_level", default=99)
    options.graph_optimization_level = {
        -1: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        0: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        1: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }.get(level, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    return options


def onnxruntime_runner(model: ServedModel) -> Runner:
    """An onnxruntime session for the model, honouring Triton's ORT backend thread parameters."""
    import onnxruntime as ort

    options = onnxruntime_options(model)
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

    # The session's own binding, without the Python wrapper's per-call checks (input names, OrtValue
    # ownership, graph capture): the config's inputs were matched against the file above, and the binding
    # still refuses a missing or misshapen input. Falls back to the public run() if onnxruntime moves it.
    binding = getattr(session, "_sess", None)
    raw_run = binding.run if binding is not None and hasattr(binding, "run") else session.run
    options = ort.RunOptions()  # one for every call: None makes the binding build a fresh one each time

    def run(inputs: Arrays) -> Arrays:
        return dict(zip(known_outputs, raw_run(known_outputs, inputs, options), strict=True))

    if len(model.inputs) == 1:
        feed = model.inputs[0].name
        output_lists = {name: [name] for name in known_outputs}

        def single(array: np.ndarray, output: str) -> np.ndarray:
            """``output`` alone of the model's outputs (onnxruntime computes only what it needs)."""
            return raw_run(output_lists[output], {feed: array}, options)[0]

        run.single = single  # type: ignore[attr-defined]
    return run


def _suffix_index(name: str) -> int | None:
    """Triton's pytorch naming convention: ``INPUT__0`` -> 0."""
    head, sep, tail = name.rpartition("__")
    return int(tail) if sep and head and tail.isdigit() else None


def pytorch_runner(model: ServedModel) -> Runner:
    """A TorchScript module for the model, with Triton's pytorch backend naming and thread parameters."""
    import torch

    intra = model.int_parameter("INTRA_OP_THREAD_COUNT", "intra_op_thread_count", default=-1)
    inter = model.int_parameter("INTER_OP_THREAD_COUNT", "inter_op_thread_count", default=-1)
    # absent: the CPUs shared among the model's instances, and one inter-op thread (as for onnxruntime)
    if intra != 0:
        torch.set_num_threads(default_intra_op_threads(model) if intra < 0 else intra)
    if inter != 0:
        # may only be set once per process; the stub hosts one model instance, so first wins
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(1 if inter < 0 else inter)
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
    suffixes = [_suffix_index(name) for name in output_names]
    out_indices = [i for i in suffixes if i is not None]
    if len(out_indices) != len(output_names):
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
        self.pb = pb_utils
        self.error_counter = error_counter(pb_utils, args)
        defer_asyncio()

    def execute(self, requests: list[Any]) -> list[Any]:
        return settle_errors(self.pb, self.executor.execute(requests), self.error_counter)

    def finalize(self) -> None:
        self.executor = None  # type: ignore[assignment]


class OnnxRuntimeModel(PythonBackendModel):
    default_filename = "model.onnx"
    make_runner = staticmethod(onnxruntime_runner)


class PyTorchModel(PythonBackendModel):
    default_filename = "model.pt"
    make_runner = staticmethod(pytorch_runner)
