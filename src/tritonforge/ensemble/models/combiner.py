"""Ensemble-learning combiner (Triton Python backend): N probability tensors in, one decision out.

Methods (the ``method`` parameter): ``average`` (mean of the probabilities), ``weighted`` (weighted mean,
``weights`` parameter), ``vote`` (majority of the members' argmax; PROBABILITIES holds the vote shares and
ties go to the class with the highest mean probability). Outputs PROBABILITIES [N, classes] and LABEL [N, 1].
Needs numpy only.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.method = params.get("method", "average")
        self.count = int(params["inputs"])
        weights = np.asarray(json.loads(params.get("weights", "[]")) or [1.0] * self.count, dtype=np.float64)
        self.weights = weights / weights.sum()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                probs = np.stack(
                    [
                        pb_utils.get_input_tensor_by_name(request, f"PROBS_{i}").as_numpy()
                        for i in range(self.count)
                    ]
                ).astype(np.float64)  # [members, N, classes]
                combined, label = combine(probs, self.method, self.weights)
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("PROBABILITIES", combined.astype(np.float32)),
                            pb_utils.Tensor("LABEL", label.astype(np.int64)[:, None]),
                        ]
                    )
                )
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"combiner: {exc}")))
        return responses


def combine(probs, method, weights):
    """probs [members, N, classes] -> (combined [N, classes], label [N])."""
    if method == "vote":
        classes = probs.shape[2]
        votes = np.eye(classes)[probs.argmax(axis=2)].sum(axis=0)  # [N, classes]
        mean = probs.mean(axis=0)
        # among the classes with the most votes, the one with the highest mean probability wins
        label = np.where(votes == votes.max(axis=1, keepdims=True), mean, -1.0).argmax(axis=1)
        return votes / probs.shape[0], label
    combined = np.tensordot(weights, probs, axes=1)
    return combined, combined.argmax(axis=1)
