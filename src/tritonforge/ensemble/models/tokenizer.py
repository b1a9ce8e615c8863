"""Tokenizer step (Triton Python backend): strings in, ``input_ids`` and ``attention_mask`` out.

Uses a Hugging Face ``tokenizer.json`` (the ``tokenizers`` package) kept beside this file. Each request's
texts are padded to the longest among them (at most ``max_length`` tokens). Needs numpy and tokenizers only.

All the texts of the requests one ``execute`` receives are tokenised in one ``encode_batch`` call, unpadded;
each request's arrays are then filled straight into int64 arrays of its own length (the same answer as
tokenising it alone). The ``threads`` parameter sizes the tokenizer's thread pool (default 1: the model
servers beside it need the cores more than a few sentences need parallel tokenising).

``padding: bucket`` pads each request further, to the next power of two of at least ``BUCKET_MIN`` tokens
(at most ``max_length``), with ``attention_mask`` 0 over the padding: texts of different lengths then give
tensors of the same shape, which a dynamic batcher downstream can batch together (Triton batches only
requests whose shapes match). Only for a consumer whose answer ignores masked tokens — the compiler uses
it in front of a fused encoder that trims the columns no row attends to.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

BUCKET_MIN = 16


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("threads", "1") or "1")
        # read by tokenizers when it first parallelises (after this point), never left at "all cores"
        if threads <= 1:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            os.environ["RAYON_RS_NUM_CPUS"] = str(threads)
            os.environ["RAYON_NUM_THREADS"] = str(threads)
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.tokenizer = Tokenizer.from_file(
            os.path.join(folder, params.get("tokenizer_file", "tokenizer.json"))
        )
        self.max_length = int(params.get("max_length", "256"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()  # padded here, per request, to that request's own longest text
        self.bucket = params.get("padding", "none") == "bucket"
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0

    def execute(self, requests):
        responses = [None] * len(requests)
        texts = []
        spans = []  # (request index, first text, text count)
        for index, request in enumerate(requests):
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
                items = [_text(item) for item in raw.reshape(-1)]
            except Exception as exc:  # one bad request fails alone, with its reason
                responses[index] = _error(exc)
                continue
            spans.append((index, len(texts), len(items)))
            texts.extend(items)
        try:
            encodings = self.tokenizer.encode_batch(texts) if texts else []
        except Exception:
            encodings = None  # find the request at fault: tokenise each alone below
        for index, first, count in spans:
            try:
                own = (
                    encodings[first : first + count]
                    if encodings is not None
                    else (self.tokenizer.encode_batch(texts[first : first + count]))
                )
                ids, mask = self._arrays(own)
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("input_ids", ids),
                        pb_utils.Tensor("attention_mask", mask),
                    ]
                )
            except Exception as exc:
                responses[index] = _error(exc)
        return responses

    def _arrays(self, encodings):
        if len(encodings) == 1 and not self.bucket:  # one sentence per request, the usual case: no padding
            ids = np.asarray(encodings[0].ids, dtype=np.int64)[None, :]
            return ids, np.ones_like(ids)
        lengths = [len(e.ids) for e in encodings]
        width = max(lengths, default=0)
        if self.bucket:
            bucket = max(BUCKET_MIN, 1 << max(width - 1, 0).bit_length())
            width = max(width, min(bucket, self.max_length))
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, (encoding, length) in enumerate(zip(encodings, lengths, strict=True)):
            ids[row, :length] = encoding.ids
            mask[row, :length] = 1
        return ids, mask


def _error(exc):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenizer: {exc}"))


def _text(item):
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)
