"""Mean pooling (Triton Python backend): token embeddings and attention mask in, one L2-normalised vector out.

``EMBEDDING[i] = sum_t mask[i,t] * tokens[i,t,:] / sum_t mask[i,t]``, then divided by its L2 norm (unless the
``normalize`` parameter is "0"), as sentence-transformers' all-MiniLM models do. Needs numpy only,
and the error accounting (``tritonforge_error_accounting.py``) that the repository writer puts beside it.

The token embeddings are the largest tensor of the text pipeline, so they are never copied: each request's
are read in place from Triton's shared memory (a zero-copy view) and reduced by one ``einsum`` (no
[rows, tokens, dim] temporary, no BLAS thread pool). Requests are not concatenated, since that would copy
the embeddings only to save a few numpy calls per request.
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
        self.normalize = params.get("normalize", "1") != "0"

    def execute(self, requests):
        return settle_errors(pb_utils, self._execute(requests), self.error_counter)

    def _execute(self, requests):
        responses = []
        for request in requests:
            try:
                tokens = pb_utils.get_input_tensor_by_name(request, "TOKEN_EMBEDDINGS").as_numpy()
                mask = pb_utils.get_input_tensor_by_name(request, "ATTENTION_MASK").as_numpy()
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor("EMBEDDING", pool(tokens, mask, self.normalize))]
                    )
                )
            except Exception as exc:
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"mean_pooling: {exc}"))
                )
        return responses


def pool(tokens, mask, normalize):
    """tokens [N, T, D], mask [N, T] -> float32 [N, D] (L2-normalised when ``normalize``)."""
    if tokens.ndim != 3 or tokens.shape[:2] != mask.shape:
        raise ValueError(
            f"token embeddings {tokens.shape} and mask {mask.shape} disagree on batch and sequence dims"
        )
    if tokens.dtype != np.float32:
        tokens = tokens.astype(np.float32)
    weights = mask.astype(np.float32)
    pooled = np.einsum("nt,ntd->nd", weights, tokens)
    pooled /= np.maximum(weights.sum(axis=1, keepdims=True), np.float32(1e-9))
    if normalize:
        pooled /= np.maximum(np.sqrt(np.einsum("nd,nd->n", pooled, pooled))[:, None], np.float32(1e-12))
    return pooled
