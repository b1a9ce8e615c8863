"""The numbers behind a pooling fusion: the check of a fused graph against the unfused pair
(:func:`check_pooled`) and its instances/threads layout — reused from a source's manifest
(:func:`measured_layout`) or measured anew for a fused model whose requests batch (:func:`batched_layout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BUCKET_TOKENS",
    "LAYOUT_ROUNDS",
    "LAYOUT_RULE",
    "QUEUED_PER_CPU",
    "batched_layout",
    "check_pooled",
    "measured_layout",
]

#: a batching fused model's layout is measured with this many requests per CPU waiting at once ...
QUEUED_PER_CPU = 4
#: ... each this many tokens (a short sentence), every token real
BUCKET_TOKENS = 16
#: alternating rounds of that measurement (two candidates can be a few per cent apart)
LAYOUT_ROUNDS = 5
#: bumped when the fused graph or the measurement changes, so that a recorded layout is measured anew
LAYOUT_RULE = 3


def check_pooled(
    source: Path, fused: Path, tokens: str, output: str, normalize: bool, *, rows_alone: bool = False
) -> float:
    """Largest |fused - (source + the block's numpy pooling)| on a padded batch of two sequences.

    With ``rows_alone`` the batch is padded past its longest row and the reference is each row run alone
    at its own length — what the unfused pipeline answers for one text per request. A model that reads
    masked tokens fails it, so its fused graph is not allowed to trim or to be run on padded batches.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    first = ort.InferenceSession(str(source), sess_options=options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    lengths = (9, 5)
    mask = np.zeros((2, 16 if rows_alone else max(lengths)), dtype=np.int64)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    feeds: dict[str, np.ndarray] = {}
    for info in first.get_inputs():
        dtype = np.int64 if "int64" in info.type else np.int32 if "int32" in info.type else None
        if dtype is None:
            return float("inf")
        if "mask" in info.name.lower():
            feeds[info.name] = mask.astype(dtype)
        elif "type" in info.name.lower():
            feeds[info.name] = np.zeros_like(mask, dtype=dtype)
        else:
            # small ids: any vocabulary holds them
            feeds[info.name] = (rng.integers(1, 8, size=mask.shape) * mask).astype(dtype)
    mask_name = next((n for n in feeds if "mask" in n.lower()), None)
    if mask_name is None:
        return float("inf")
    if rows_alone:
        expected = np.concatenate(
            [
                _pool(first.run([tokens], alone)[0], alone[mask_name], normalize)
                for alone in (
                    {k: v[row : row + 1, :n] for k, v in feeds.items()} for row, n in enumerate(lengths)
                )
            ]
        )
    else:
        expected = _pool(first.run([tokens], feeds)[0], feeds[mask_name], normalize)
    second = ort.InferenceSession(str(fused), sess_options=options, providers=["CPUExecutionProvider"])
    got = second.run([output], feeds)[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(np.abs(got - expected).max())


def _pool(tokens: np.ndarray, mask: np.ndarray, normalize: bool) -> np.ndarray:
    """The ``mean_pooling`` block's formula (models/mean_pooling.py), for the check."""
    weights = mask.astype(np.float32)
    pooled = np.einsum("nt,ntd->nd", weights, tokens.astype(np.float32))
    pooled /= np.maximum(weights.sum(axis=1, keepdims=True), np.float32(1e-9))
    if normalize:
        pooled /= np.maximum(np.sqrt(np.einsum("nd,nd->n", pooled, pooled))[:, None], np.float32(1e-12))
    return pooled


def measured_layout(model_path: Path) -> dict[str, Any] | None:
    """The layout recorded in the manifest beside ``model_path`` (``tritonforge build`` / ``tune --write``),
    if it has a usable one."""
    try:
        layout = json.loads((model_path.parent / "manifest.json").read_text()).get("layout")
        if (
            isinstance(layout, dict)
            and int(layout["instances"]) >= 1
            and int(layout["intra_op_threads"]) >= 1
        ):
            return layout
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def batched_layout(
    fused: Path, fused_sha256: str, previous: Path, source_sha256: str
) -> dict[str, Any] | None:
    """The layout of a fused model whose requests batch (run by the tokenizer on each batch it gets),
    measured on ``QUEUED_PER_CPU`` requests per CPU of ``BUCKET_TOKENS`` tokens shared by each candidate's
    instances in ``LAYOUT_ROUNDS`` rounds
    (:func:`~tritonforge.repository.layout.choose_layout` with ``queued``); the one recorded in ``previous``
    (the model's manifest from the last compile) when it was measured for the same source, CPUs and rule.
    None when it can't be measured here (the source's layout is then not reused either: it was measured
    for requests of one)."""
    import onnx

    from tritonforge.repository.layout import choose_layout, layout_key
    from tritonforge.repository.threads import available_cpus

    cpus = available_cpus()
    key = {
        "source_sha256": source_sha256,
        "fused_sha256": fused_sha256,
        **layout_key(cpus),
        "queued": QUEUED_PER_CPU * cpus,
        "tokens": BUCKET_TOKENS,
        "rounds": LAYOUT_ROUNDS,
        "rule": LAYOUT_RULE,
    }
    try:
        old = json.loads(previous.read_text()).get("layout")
        if isinstance(old, dict) and old.get("key") == key:
            return dict(old)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        graph = onnx.load(str(fused), load_external_data=False).graph
        initialized = {i.name for i in graph.initializer}
        feeds = {}
        for value in graph.input:
            if value.name in initialized:
                continue
            dtype = np.int32 if value.type.tensor_type.elem_type == onnx.TensorProto.INT32 else np.int64
            fill = 0 if "type" in value.name.lower() else 1  # every token real, token type 0
            feeds[value.name] = np.full((1, BUCKET_TOKENS), fill, dtype=dtype)
        choice = choose_layout(fused, feeds, cpus=cpus, queued=key["queued"], rounds=LAYOUT_ROUNDS)
    except Exception:
        return None
    return {**choice.as_manifest(), "key": key}
