"""Passthrough (Triton Python backend): each input ``IN_<k>`` comes back unchanged as ``OUT_<k>``.

The compiler puts one in an ensemble where Triton's request-time pruning would otherwise drop a step that
is still needed (see ``tritonforge.ensemble.compile.ensemble_config``). Needs numpy only.
"""

import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.count = len(config["input"])

    def execute(self, requests):
        responses = []
        for request in requests:
            outputs = [
                pb_utils.Tensor(f"OUT_{k}", pb_utils.get_input_tensor_by_name(request, f"IN_{k}").as_numpy())
                for k in range(self.count)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
