"""Imputation (Triton Python backend): NaN and ±inf in ``INPUT`` replaced before the models see them.

``OUTPUT`` is ``INPUT`` with every non-finite value replaced by the fill (the ``fill`` parameter: one
number for strategy ``constant``, one per feature for ``mean``); ``MISSING`` is True where a value was
replaced. Every request Triton's dynamic batcher hands over in one ``execute`` is filled in one vectorised
pass over the concatenated rows (no per-row Python), and handed back per request as slices of the result.
Needs numpy only (and the error accounting, ``tritonforge_error_accounting.py``, that the repository writer
puts beside it); numpy's element-wise operations run on the calling thread (no thread pool to size).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge_error_accounting import error_counter, settle_errors


class TritonPythonModel:
    def initialize(self, args):
        self.error_counter = error_counter(pb_utils, args)
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        dtype = pb_utils.triton_string_to_numpy(config["output"][0]["data_type"])
        self.dtype = np.dtype(dtype)
        self.fill = np.asarray(json.loads(params.get("fill", "0")), dtype=self.dtype)

    def execute(self, requests):
        return settle_errors(pb_utils, self._execute(requests), self.error_counter)

    def _execute(self, requests):
        responses = [None] * len(requests)
        good = []  # (index, array) of the requests whose input is usable
        for index, request in enumerate(requests):
            try:
                array = pb_utils.get_input_tensor_by_name(request, "INPUT").as_numpy()
                if array.ndim != 2 or (self.fill.ndim == 1 and array.shape[1] != self.fill.shape[0]):
                    raise ValueError(
                        f"INPUT must be [rows, {self.fill.shape[0] if self.fill.ndim else 'features'}], "
                        f"got {list(array.shape)}"
                    )
                if good and array.shape[1] != good[0][1].shape[1]:
                    responses[index] = self._answer([(index, array)])[0][1]  # another width: alone
                    continue
                good.append((index, array))
            except Exception as exc:
                responses[index] = _error(exc)
        if good:
            for index, response in self._answer(good):
                responses[index] = response
        return responses

    def _answer(self, items):
        try:
            batch = items[0][1] if len(items) == 1 else np.concatenate([a for _, a in items])
            missing = ~np.isfinite(batch)
            filled = np.where(missing, self.fill, batch).astype(self.dtype, copy=False)
        except Exception as exc:
            return [(index, _error(exc)) for index, _ in items]
        answers = []
        offset = 0
        for index, array in items:
            end = offset + array.shape[0]
            tensors = [
                pb_utils.Tensor("OUTPUT", filled[offset:end]),
                pb_utils.Tensor("MISSING", missing[offset:end]),
            ]
            answers.append((index, pb_utils.InferenceResponse(output_tensors=tensors)))
            offset = end
        return answers


def _error(exc):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"impute: {exc}"))
