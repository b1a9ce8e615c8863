"""Routed pipeline (Triton Python backend, BLS): conditional routing and fallback between models.

Generated per pipeline by ``tritonforge ensemble compile``: this file is generic and its plan lives in the
config's ``plan`` parameter (JSON), so the pipeline is data, not code. For each request:

1. Stages run in order. A stage with a ``when`` condition runs only on the batch rows where
   ``reduce(tensor) <comparison> value`` holds, the tensor being a pipeline input or the current result
   (rows without a result yet do not match); its answers replace those rows' result.
2. A stage calls its model through BLS; if the model fails or times out, its fallbacks are tried in order.
3. The ``route_output`` tensor names, per row, the model whose answer was kept.

A request fails (with every model's reason) only when a stage's model and all its fallbacks fail, or when a
row is left without an answer. Needs numpy only, and the error accounting
(``tritonforge_error_accounting.py``) that the repository writer puts beside it.
"""

import asyncio
import json

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge_error_accounting import error_counter, settle_errors

_REDUCE = {"max": np.max, "min": np.min, "mean": np.mean}
_COMPARE = {
    "below": np.less,
    "above": np.greater,
    "equals": np.equal,
    "not_equals": np.not_equal,
}


class TritonPythonModel:
    def initialize(self, args):
        self.error_counter = error_counter(pb_utils, args)
        config = json.loads(args["model_config"])
        self.plan = json.loads(config["parameters"]["plan"]["string_value"])
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    async def execute(self, requests):
        # a coroutine, so a step's timeout can stop the wait (asyncio.wait_for) and hand over to the fallback
        responses = await asyncio.gather(*[self._answer(request) for request in requests])
        return settle_errors(pb_utils, responses, self.error_counter)

    async def _answer(self, request):
        try:
            return await self._route(request)
        except Exception as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.plan['name']}: {exc}"))

    async def _route(self, request):
        plan = self.plan
        tensors = {}
        for name in plan["inputs"]:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                tensors[name] = tensor.as_numpy()
        rows = next(iter(tensors.values())).shape[0] if self.batched else 1
        result = {}
        answered_by = [""] * rows
        for stage in plan["stages"]:
            if stage.get("when"):
                selected = np.flatnonzero(self._condition(stage["when"], tensors, result, answered_by, rows))
            else:
                selected = np.arange(rows)
            if selected.size == 0:
                continue
            every_row = selected.size == rows
            sub = tensors if every_row else {k: v[selected] for k, v in tensors.items()}
            model, outputs = await self._call_with_fallback(stage, sub)
            for name, value in outputs.items():
                if every_row or name not in result:
                    if every_row:
                        result[name] = value
                        continue
                    result[name] = np.zeros((rows, *value.shape[1:]), dtype=value.dtype)
                result[name][selected] = value
            for row in selected:
                answered_by[row] = model
        missing = [row for row, model in enumerate(answered_by) if not model]
        if missing:
            raise RuntimeError(
                f"no route stage answered rows {missing}: every stage's condition was false; "
                "add a stage without 'when' first"
            )
        out = [
            pb_utils.Tensor(name, np.ascontiguousarray(result[name]).astype(self.dtypes[name]))
            for name in plan["outputs"]
        ]
        route = np.array([[m.encode()] for m in answered_by], dtype=np.object_)
        out.append(pb_utils.Tensor(plan["route_output"], route if self.batched else route.reshape(1)))
        return pb_utils.InferenceResponse(output_tensors=out)

    def _condition(self, when, tensors, result, answered_by, rows):
        name = when["tensor"]
        if name in tensors:
            values = tensors[name]
            known = np.ones(rows, dtype=bool)
        elif name in result:
            values = result[name]
            known = np.array([bool(m) for m in answered_by])
        else:
            return np.zeros(rows, dtype=bool)
        values = (
            np.asarray(values, dtype=np.float64).reshape(rows, -1)
            if self.batched
            else np.asarray(values, dtype=np.float64).reshape(1, -1)
        )
        reduced = _REDUCE[when["reduce"]](values, axis=1)
        return _COMPARE[when["comparison"]](reduced, when["value"]) & known

    async def _call_with_fallback(self, stage, tensors):
        failures = []
        for model in [stage["model"], *stage.get("fallback", [])]:
            try:
                return model, await self._call(model, stage, tensors)
            except asyncio.TimeoutError:
                failures.append(f"{model}: no answer within {stage['timeout_ms']:g} ms")
            except Exception as exc:
                failures.append(f"{model}: {exc}")
        raise RuntimeError(
            "stage '" + stage["model"] + "' failed, fallbacks included: " + "; ".join(failures)
        )

    async def _call(self, model, stage, tensors):
        inputs = [
            pb_utils.Tensor(model_input, np.ascontiguousarray(tensors[pipeline_input]))
            for model_input, pipeline_input in stage["inputs"].items()
            if pipeline_input in tensors
        ]
        kwargs = {"model_name": model, "requested_output_names": list(stage["outputs"]), "inputs": inputs}
        if model == stage["model"] and stage.get("version", -1) != -1:
            kwargs["model_version"] = int(stage["version"])
        pending = pb_utils.InferenceRequest(**kwargs).async_exec()
        if stage.get("timeout_ms"):
            response = await asyncio.wait_for(pending, stage["timeout_ms"] / 1000)
        else:
            response = await pending
        if response.has_error():
            raise RuntimeError(response.error().message())
        return {
            pipeline_output: pb_utils.get_output_tensor_by_name(response, model_output).as_numpy()
            for model_output, pipeline_output in stage["outputs"].items()
        }
