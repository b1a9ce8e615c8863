"""Mean pooling (Triton Python backend): token embeddings and attention mask in, one L2-normalised vector out.

``EMBEDDING[i] = sum_t mask[i,t] * tokens[i,t,:] / sum_t mask[i,t]``, then divided by its L2 norm (unless the
``normalize`` parameter is "0"), as sentence-transformers' all-MiniLM models do. Needs numpy only.

The token embeddings are the largest tensor of the text pipeline, so they are never copied: each request's
are read in place from Triton's shared memory (a zero-copy view) and reduced by one ``einsum`` (no
[rows, tokens, dim] temporary, no BLAS thread pool). Requests are not concatenated, since that would copy
the embeddings only to save a few numpy calls per request.
"""

import json
import re

import numpy as np
import triton_python_backend_utils as pb_utils

# -- error accounting (the same block in every Python model tritonforge generates) --------------------
# Triton 2.51's Python backend counts an error *response* as a success (nv_inference_request_success);
# only an exception raised from execute counts in nv_inference_request_failure, and it fails every
# request of that execute. So an execute whose requests all failed alike raises (Triton counts each),
# and an error answered beside successful requests is counted in tritonforge_error_responses_total
# {model, version}, which tritonforge's SLO rules add to Triton's failures.
ERROR_RESPONSES = "tritonforge_error_responses_total"
_TRACEBACK = re.compile(r"\n+At:\n(?:  .*\n?)*")


def _error_counter(args):
    try:
        family = pb_utils.MetricFamily(
            name=ERROR_RESPONSES,
            description="Error responses a Python model answered beside successful ones (Triton counts "
            "them as successes)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        return family, family.Metric(labels={"model": args["model_name"], "version": args["model_version"]})
    except Exception:  # metrics are off on this server: nothing reads the counter
        return None, None


def _settle(responses, counter):
    """``responses``, after raising when every one is an error with the same message, or counting them."""
    errors = [r.error().message() for r in responses if r is not None and r.has_error()]
    if errors and len(errors) == len(responses) and len(set(errors)) == 1:
        # the stub appends the raise's traceback ("At: ..."); the nested ones inside are dropped
        raise pb_utils.TritonModelException(_TRACEBACK.sub("", errors[0]))
    if errors and counter[1] is not None:
        counter[1].increment(len(errors))
    return responses


# -- end of error accounting ------------------------------------------------------------------------------


class TritonPythonModel:
    def initialize(self, args):
        self.error_counter = _error_counter(args)
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.normalize = params.get("normalize", "1") != "0"

    def execute(self, requests):
        return _settle(self._execute(requests), self.error_counter)

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
