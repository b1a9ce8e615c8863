"""Tokenizer step (Triton Python backend): strings in, ``input_ids`` and ``attention_mask`` out.

Reads a Hugging Face ``tokenizer.json`` of the BERT WordPiece kind kept beside this file, with
``wordpiece.py`` (and its character table) beside it too: the same ids as the ``tokenizers`` package, in
the standard library and numpy only — what the Python backend of NVIDIA's image has. Each request's texts
are padded to the longest among them (at most ``max_length`` tokens). The error accounting
(``tritonforge_error_accounting.py``) is put beside it by the repository writer.

All the texts of the requests one ``execute`` receives are tokenised unpadded; each request's arrays are
then filled straight into int64 arrays of its own length (the same answer as tokenising it alone).

``padding: bucket`` pads each request further, to the next power of two of at least ``BUCKET_MIN`` tokens
(at most ``max_length``), with ``attention_mask`` 0 over the padding: texts of different lengths then give
tensors of the same shape, which a dynamic batcher downstream can batch together (Triton batches only
requests whose shapes match). Only for a consumer whose answer ignores masked tokens.

**With its encoder** (what the ensemble compiler writes when a pipeline's tokenizer feeds nothing but a
fused encoder whose answer ignores padding): the ``encoder_*`` parameters name an ONNX graph beside this
file, and the model answers the graph's output instead of the token arrays — every text of the batch is
tokenised, padded to the batch's longest and run through the graph in one call, so a pipeline's text
costs one Python-backend hop instead of two, and requests of any length batch together. The graph runs
in this process with onnxruntime (threads as the config's ``intra_op_thread_count`` /
``inter_op_thread_count``, spinning off) when onnxruntime can be imported and the instances are CPU ones;
otherwise (NVIDIA's container, whose Python has no onnxruntime, or GPU instances) each batch goes to
the model ``encoder_model`` (the same graph, served by the server's own onnxruntime backend) through
Triton's BLS. ``encoder_in_process: no`` always takes the BLS way.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from tritonforge_error_accounting import error_counter, settle_errors
from wordpiece import WordPiece

BUCKET_MIN = 16


class TritonPythonModel:
    def initialize(self, args):
        self.error_counter = error_counter(pb_utils, args)
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.max_length = int(params.get("max_length", "256"))
        # unpadded: padded here, per request, to that request's own longest text
        self.tokenizer = WordPiece(
            os.path.join(folder, params.get("tokenizer_file", "tokenizer.json")), self.max_length
        )
        self.bucket = params.get("padding", "none") == "bucket"
        self.pad_id = self.tokenizer.token_to_id("[PAD]") or 0
        self.encoder = None
        if params.get("encoder_file"):
            kinds = {group.get("kind", "KIND_CPU") for group in config.get("instance_group", [])}
            path = os.path.join(folder, params["encoder_file"])
            self.encoder = Encoder(path, params, cpu_instances=kinds <= {"KIND_CPU"})

    def execute(self, requests):
        return settle_errors(pb_utils, self._execute(requests), self.error_counter)

    def _execute(self, requests):
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
            encodings = self._encode_all(texts)
        except Exception:
            encodings = None  # find the request at fault: tokenise each alone below
        if self.encoder is not None:
            return self._encode(spans, texts, encodings, responses)
        for index, first, count in spans:
            try:
                own = (
                    encodings[first : first + count]
                    if encodings is not None
                    else self._encode_all(texts[first : first + count])
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

    def _encode(self, spans, texts, encodings, responses):
        """Every request's texts through the encoder in one call; a batch that fails is rerun request by
        request, so a bad request fails alone with its reason."""
        if encodings is not None and encodings:
            try:
                ids, mask = self._arrays(encodings)
                out = self.encoder.run(ids, mask)
                for index, first, count in spans:
                    responses[index] = self.encoder.response(out[first : first + count])
                return responses
            except Exception:
                pass
        for index, first, count in spans:
            try:
                own = self._encode_all(texts[first : first + count])
                responses[index] = self.encoder.response(self.encoder.run(*self._arrays(own)))
            except Exception as exc:
                responses[index] = _error(exc)
        return responses

    def _encode_all(self, texts):
        return [self.tokenizer.encode(text) for text in texts]

    def _arrays(self, encodings):
        if len(encodings) == 1 and not self.bucket:  # one sentence per request, the usual case: no padding
            ids = np.asarray(encodings[0], dtype=np.int64)[None, :]
            return ids, np.ones_like(ids)
        lengths = [len(e) for e in encodings]
        width = max(lengths, default=0)
        if self.bucket:
            bucket = max(BUCKET_MIN, 1 << max(width - 1, 0).bit_length())
            width = max(width, min(bucket, self.max_length))
        ids = np.full((len(encodings), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), width), dtype=np.int64)
        for row, (encoding, length) in enumerate(zip(encodings, lengths, strict=True)):
            ids[row, :length] = encoding
            mask[row, :length] = 1
        return ids, mask


class Encoder:
    """The ONNX graph a tokenizer with its encoder runs: in this process, or through BLS."""

    def __init__(self, path, params, cpu_instances):
        self.output = params["encoder_output"]
        # {graph input: "input_ids" or "attention_mask"}
        self.inputs = json.loads(params["encoder_inputs"])
        self.model = params.get("encoder_model", "")
        self.version = int(params.get("encoder_model_version", "-1") or "-1")
        self.session = None  # None: through BLS
        if params.get("encoder_in_process", "auto") != "no" and cpu_instances:
            self.session = _session(path, params)
        if self.session is None and not self.model:
            raise pb_utils.TritonModelException(
                "tokenizer: the encoder can't run here: onnxruntime can't be imported in this Python and "
                "no 'encoder_model' is named to call instead"
            )

    def run(self, ids, mask):
        arrays = {"input_ids": ids, "attention_mask": mask}
        feeds = {name: arrays[source] for name, source in self.inputs.items()}
        if self.session is not None:
            return self.session.run([self.output], feeds)[0]
        request = pb_utils.InferenceRequest(
            model_name=self.model,
            model_version=self.version,
            requested_output_names=[self.output],
            inputs=[pb_utils.Tensor(name, array) for name, array in feeds.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"encoder model '{self.model}': {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, self.output).as_numpy()

    def response(self, array):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output, array)])


def _session(path, params):
    """An onnxruntime session as Triton's onnxruntime backend would make it, or None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_thread_count", "1"))
    options.inter_op_num_threads = int(params.get("inter_op_thread_count", "1"))
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        options.add_session_config_entry(key, params.get(key, "0"))
    return ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])


def _error(exc):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenizer: {exc}"))


def _text(item):
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)
