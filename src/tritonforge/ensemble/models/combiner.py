"""Ensemble-learning combiner (Triton Python backend): N probability tensors in, one decision out.

Methods (the ``method`` parameter): ``average`` (mean of the probabilities), ``weighted`` (weighted mean,
``weights`` parameter), ``vote`` (majority of the members' argmax; PROBABILITIES holds the vote shares and
ties go to the class with the highest mean probability). Outputs PROBABILITIES [N, classes] and LABEL [N, 1].

``ECHO_<k>`` hands ``PROBS_<k>`` back (as FP32), for the requests that ask for it: a pipeline that also
outputs its members' probabilities reads them here instead of through a passthrough step.

Every request Triton's dynamic batcher hands over in one ``execute`` is combined in one vectorised pass:
the members' rows are copied once into one [members, rows, classes] array, combined, and the results
handed back per request as slices (views) of the batch's result. Needs numpy only, and the error accounting
(``tritonforge_error_accounting.py``) that the repository writer puts beside it.
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
        self.method = params.get("method", "average")
        self.count = int(params["inputs"])
        self.names = [f"PROBS_{i}" for i in range(self.count)]
        self.echoes = {f"ECHO_{i}": i for i in range(self.count)}
        weights = np.asarray(json.loads(params.get("weights", "[]")) or [1.0] * self.count, dtype=np.float64)
        self.weights = (weights / weights.sum()).astype(np.float32)

    def execute(self, requests):
        return settle_errors(pb_utils, self._execute(requests), self.error_counter)

    def _execute(self, requests):
        responses = [None] * len(requests)
        good = []  # (index, [member arrays], [echoes asked]) of the requests whose inputs are usable
        names = self.names
        for index, request in enumerate(requests):
            try:
                given = {t.name(): t for t in request.inputs()}  # one pass, not one scan per member
                if any(n not in given for n in names):
                    raise ValueError(f"inputs {names} are required, got {sorted(given)}")
                members = [given[n].as_numpy() for n in names]
                shape = members[0].shape
                if len(shape) != 2 or any(m.shape != shape for m in members):
                    raise ValueError(
                        f"inputs {self.names} must share one [rows, classes] shape, got "
                        f"{[m.shape for m in members]}"
                    )
                item = (index, members, self._echoes(request))
                if good and shape[1] != good[0][1][0].shape[1]:
                    # a different class count can't share the batch: answer it alone
                    responses[index] = self._answer([item])[0][1]
                    continue
                good.append(item)
            except Exception as exc:
                responses[index] = _error(exc)
        if good:
            for index, response in self._answer(good):
                responses[index] = response
        return responses

    def _echoes(self, request):
        """The ``ECHO_<k>`` outputs this request asks for, as (name, k)."""
        return [(n, self.echoes[n]) for n in request.requested_output_names() if n in self.echoes]

    def _answer(self, items):
        try:
            rows = [members[0].shape[0] for _, members, _ in items]
            probs = np.empty((self.count, sum(rows), items[0][1][0].shape[1]), dtype=np.float32)
            for k in range(self.count):  # the one copy (and cast) of every row, one call per member
                np.concatenate([members[k] for _, members, _ in items], out=probs[k], casting="unsafe")
            combined, label = combine(probs, self.method, self.weights)
            combined = combined.astype(np.float32, copy=False)
            label = label.astype(np.int64, copy=False)[:, None]
        except Exception as exc:
            return [(index, _error(exc)) for index, _, _ in items]
        answers = []
        offset = 0
        for (index, _, echoes), n in zip(items, rows, strict=True):
            end = offset + n
            tensors = [
                pb_utils.Tensor("PROBABILITIES", combined[offset:end]),
                pb_utils.Tensor("LABEL", label[offset:end]),
            ]
            # the member's rows from the batch's FP32 copy (contiguous), not the request's own buffer
            tensors.extend(pb_utils.Tensor(name, probs[k, offset:end]) for name, k in echoes)
            answers.append((index, pb_utils.InferenceResponse(output_tensors=tensors)))
            offset = end
        return answers


def _error(exc):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"combiner: {exc}"))


def combine(probs, method, weights):
    """probs [members, N, classes] -> (combined [N, classes], label [N]); the whole batch at once."""
    if method == "vote":
        members, _, classes = probs.shape
        picks = probs.argmax(axis=2)  # [members, N]
        votes = (picks[..., None] == np.arange(classes)).sum(axis=0, dtype=np.float32)  # [N, classes]
        mean = probs.mean(axis=0)
        # among the classes with the most votes, the one with the highest mean probability wins
        label = np.where(votes == votes.max(axis=1, keepdims=True), mean, -1.0).argmax(axis=1)
        return votes / np.float32(members), label
    combined = np.tensordot(np.asarray(weights, dtype=probs.dtype), probs, axes=1)
    return combined, combined.argmax(axis=1)
