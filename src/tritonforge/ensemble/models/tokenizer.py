"""Tokenizer step (Triton Python backend): strings in, ``input_ids`` and ``attention_mask`` out.

Uses a Hugging Face ``tokenizer.json`` (the ``tokenizers`` package) kept beside this file. Each request's
texts are padded to the longest among them (at most ``max_length`` tokens). Needs numpy and tokenizers only.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.tokenizer = Tokenizer.from_file(
            os.path.join(folder, params.get("tokenizer_file", "tokenizer.json"))
        )
        self.tokenizer.enable_truncation(int(params.get("max_length", "256")))
        pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token="[PAD]")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
                texts = [_text(item) for item in raw.reshape(-1)]
                encodings = self.tokenizer.encode_batch(texts)
                ids = np.array([e.ids for e in encodings], dtype=np.int64)
                mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("input_ids", ids),
                            pb_utils.Tensor("attention_mask", mask),
                        ]
                    )
                )
            except Exception as exc:  # one bad request fails alone, with its reason
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenizer: {exc}")))
        return responses


def _text(item):
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)
