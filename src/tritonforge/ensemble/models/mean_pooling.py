"""Mean pooling (Triton Python backend): token embeddings and attention mask in, one L2-normalised vector out.

``EMBEDDING[i] = sum_t mask[i,t] * tokens[i,t,:] / sum_t mask[i,t]``, then divided by its L2 norm (unless the
``normalize`` parameter is "0"), as sentence-transformers' all-MiniLM models do. Needs numpy only.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.normalize = params.get("normalize", "1") != "0"

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tokens = pb_utils.get_input_tensor_by_name(request, "TOKEN_EMBEDDINGS").as_numpy()
                mask = pb_utils.get_input_tensor_by_name(request, "ATTENTION_MASK").as_numpy()
                if tokens.shape[:2] != mask.shape:
                    raise ValueError(
                        f"token embeddings {tokens.shape} and mask {mask.shape} disagree on "
                        "batch and sequence dims"
                    )
                weights = mask.astype(np.float32)[..., None]
                pooled = (tokens.astype(np.float32) * weights).sum(axis=1) / np.maximum(
                    weights.sum(axis=1), 1e-9
                )
                if self.normalize:
                    pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor("EMBEDDING", pooled.astype(np.float32))]
                    )
                )
            except Exception as exc:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"mean_pooling: {exc}"))
                )
        return responses
