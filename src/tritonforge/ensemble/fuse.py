"""Compile-time fusion: an ONNX step and the mean pooling step after it become one plain ONNX model.

In an ensemble every step is its own model instance, and each Python-backend step is its own stub process:
a hop costs a round trip through the stub and copies of its tensors — for the text pipeline, the 384-d
token embeddings of every token. Mean pooling is a handful of ONNX operators, so when a pipeline runs an
ONNX model whose token embeddings feed only a ``mean_pooling`` block, the compiler appends the pooling to
that model's graph and the ensemble calls the fused model instead of the two (a client chaining the
models cannot do this). The fused model is a plain ONNX model (``platform: "onnxruntime_onnx"``, no custom
operators), so the repository still runs unchanged on NVIDIA's container; it takes the source model's
config (batching, instances, threads), and its manifest records what was fused from which file and the
largest difference from the unfused pair on a check batch. The source models stay in the repository for
anyone who calls them one by one.

Fused only when the result is the same: the embeddings feed nothing else and are not a pipeline output,
the pooling's mask is one of the ONNX model's own inputs, the source version is known and its file is
an FP32-output ONNX graph; otherwise the steps compile as written.

Batching texts of different lengths: Triton's dynamic batcher groups only requests whose shapes match, so
with one text per request the encoder ran batches of one whenever lengths differed — and a transformer's
call costs a fixed part (its weights read once per call: ~2.7 ms of MiniLM FP32's ~5 ms per sentence here)
that only a batch shares. The fused graph therefore starts by cutting its inputs to the last column any
row's mask keeps (``trim_padding``), and when the pipeline's tokenizer feeds nothing but the fused step,
the two steps become one model (``<pipeline>__tokenize_encode``): the tokenizer block with the fused graph
beside it, which it runs on every batch it tokenises (``with_encoder``). Its input is the text, so
requests of any length batch together; each batch is padded to its longest text and the graph's
token-wise layers run on the real tokens only (``pack_tokens``); and a text costs one Python-backend
hop instead of two. Where the stub's Python has no onnxruntime (NVIDIA's container) it calls the fused
model, which stays in the repository, through BLS. All of it only when a check batch padded past its
longest row answers as each row alone (a model that reads masked tokens keeps the plain fusion); the
spec's own tokenizer is unchanged for clients that call it.

A ``combiner`` block fed by ONNX members becomes one ONNX model too (:mod:`tritonforge.ensemble._fanin`).
This module is the pass that decides; the parts live beside it: :mod:`~tritonforge.ensemble._onnx_surgery`
(the graphs), :mod:`~tritonforge.ensemble._fuse_check` (the numeric check and the layout measurement),
:mod:`~tritonforge.ensemble._tokenize_encode` (tokenizer + encoder) and :mod:`~tritonforge.ensemble._fusing`
(what they share).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from tritonforge.config import DataType, ModelConfig, TensorSpec
from tritonforge.ensemble._fanin import fan_in
from tritonforge.ensemble._fuse_check import batched_layout, check_pooled, measured_layout
from tritonforge.ensemble._fusing import FUSE_TOLERANCE, FusedModel, merged_step, name_free, onnx_source
from tritonforge.ensemble._onnx_surgery import mean_pooling_graph, write_fused
from tritonforge.ensemble._tokenize_encode import feeding_tokenizer, with_encoder
from tritonforge.ensemble.blocks import GENERATED_MARK
from tritonforge.ensemble.check import Resolved
from tritonforge.ensemble.spec import StepSpec
from tritonforge.repository import file_sha256, with_layout

__all__ = ["FusedModel", "fuse_pipeline", "mean_pooling_graph"]


def fuse_pipeline(resolved: Resolved, repo: Path, scratch: Path) -> tuple[Resolved, list[FusedModel]]:
    """``resolved`` with every fusable (ONNX model -> mean pooling) pair of steps replaced by one step (and
    that step with the tokenizer feeding it, where it may), and every ``combiner`` fed by ONNX members too.

    The fused ONNX files are written under ``scratch``; the caller writes them into the repository.
    Pairs that cannot be fused exactly are left as they are.

    Raises:
        OSError: the scratch folder can't be written. An unfusable pair raises nothing: it is compiled
            as written (so is one whose graph onnx or onnxruntime can't load or run here).
    """
    spec = resolved.spec
    blocks = {m.name: m for m in spec.models}
    steps = list(spec.steps)
    fused_models: list[FusedModel] = []
    for pool in list(steps):
        block = blocks.get(pool.model)
        if block is None or block.block != "mean_pooling":
            continue
        plan = _pair(steps, pool, resolved, repo)
        if plan is None:
            continue
        encoder, config, version, model_path, mask_input = plan
        name = _fused_name(encoder.model, version, pool.model)
        if not name_free(repo, name):
            continue
        normalize = block.options.get("normalize", True) is not False
        out_name = next(iter(pool.outputs))  # the pooling block's one output, EMBEDDING
        token_output = next(iter(encoder.outputs))
        folder = scratch / name
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "model.onnx"
        args = (model_path, target, token_output, mask_input, out_name, normalize)
        # the richest graph first: padding cut and token-wise layers on real tokens only, then the cut
        # alone, then the plain fusion; each must answer as the unfused pair (rows alone, when cut)
        written, difference = None, float("inf")
        for trim, pack in ((True, True), (True, False), (False, False)):
            try:
                written = write_fused(*args, trim=trim, pack=pack)
                if written is None:
                    break
                difference = check_pooled(*args[:3], out_name, normalize, rows_alone=written[1])
            except Exception:  # a graph onnx or onnxruntime can't take apart or run here
                written, difference = None, float("inf")
            if written is not None and (difference <= FUSE_TOLERANCE or not written[1]):
                break
        if written is None or not difference <= FUSE_TOLERANCE:
            continue  # compiled unfused
        dim, trimmed, packed = written
        fused_config = config.replace(
            name=name,
            outputs=[TensorSpec(name=out_name, dtype=DataType.FP32, dims=[dim])],
            version_policy=None,
            default_model_filename=None,
            parameters={**config.parameters, GENERATED_MARK: f"fused:{encoder.model}:{version}+{pool.model}"},
        )
        source_sha256 = file_sha256(model_path)
        record = {
            "block": "fused",
            "variant": "fused",
            # the model it was made from (not the scratch copy the writer was handed)
            "source": {"path": str(model_path.resolve()), "sha256": source_sha256},
            "artifact": {"bytes": target.stat().st_size},
            "pipeline": spec.name,
            "fused": {
                "steps": [encoder.name, pool.name],
                "from": [
                    {"model": encoder.model, "version": version, "sha256": source_sha256},
                    {"model": pool.model, "block": "mean_pooling", "options": dict(block.options)},
                ],
                "appended": "mean pooling over the attention mask" + (", L2 norm" if normalize else ""),
                "max_abs_diff_vs_unfused": difference,
                "why": "one model instead of two: no Python-backend hop, no copy of the token embeddings",
                # padding columns no row attends to are cut first: a padded batch costs its longest row
                "trims_padding": trimmed,
                # the layers between attentions run on the real tokens of the batch only
                "packs_tokens": packed,
            },
        }
        index = steps.index(encoder)
        fused_step = merged_step(encoder, pool, name)
        steps[index] = fused_step
        steps.remove(pool)
        tokenizer = feeding_tokenizer(steps, fused_step, resolved) if trimmed else None
        text_name = f"{spec.name}__tokenize_encode"
        if tokenizer is not None and (len(text_name) > 100 or not name_free(repo, text_name)):
            tokenizer = None
        layout = measured_layout(model_path)
        # the fused graph's hash: the batched layout's key and the tokenizer's record (90 MB read once)
        fused_sha256 = file_sha256(target) if tokenizer is not None else ""
        if layout is not None and tokenizer is not None:
            # its requests batch now: measured anew, the candidates sharing a queue of requests
            layout = batched_layout(target, fused_sha256, repo / name / "1" / "manifest.json", source_sha256)
        elif layout is not None:  # the encoder version's own measurement: the pooling appended costs little
            layout = {**layout, "reused_from": f"{encoder.model} version {version}"}
        if layout is not None:
            fused_config = with_layout(fused_config, layout["instances"], layout["intra_op_threads"])
            record["layout"] = layout
        fused_models.append(FusedModel(config=fused_config, source=target, manifest=record))
        if tokenizer is not None:
            text_model, text_step = with_encoder(
                text_name, *tokenizer, fused_step, fused_config, (target, fused_sha256), record, resolved
            )
            fused_models.append(text_model)
            steps = [text_step if s is tokenizer[0] else s for s in steps if s is not fused_step]
    for combine in list(steps):
        block = blocks.get(combine.model)
        if block is None or block.block != "combiner":
            continue
        found = fan_in(steps, combine, block, resolved, repo, scratch)
        if found is None:
            continue
        model, step, replaced = found
        fused_models.append(model)
        first = next(s for s in steps if s in replaced)
        steps = [step if s is first else s for s in steps if s is first or s not in replaced]
    if not fused_models:
        return resolved, []
    return dataclasses.replace(resolved, spec=dataclasses.replace(spec, steps=tuple(steps))), fused_models


def _pair(
    steps: list[StepSpec], pool: StepSpec, resolved: Resolved, repo: Path
) -> tuple[StepSpec, ModelConfig, int, Path, str] | None:
    """The ONNX step feeding ``pool`` and what fusing needs, or None when the pair is not fusable."""
    tokens = pool.inputs.get("TOKEN_EMBEDDINGS")
    mask = pool.inputs.get("ATTENTION_MASK")
    if tokens is None or mask is None or len(pool.outputs) != 1:
        return None
    producers = [s for s in steps if tokens in s.outputs.values()]
    if len(producers) != 1 or len(producers[0].outputs) != 1:
        return None
    encoder = producers[0]
    if any(tokens in s.inputs.values() for s in steps if s is not pool):
        return None
    if tokens in {t.name for t in resolved.outputs}:
        return None
    mask_inputs = [k for k, v in encoder.inputs.items() if v == mask]
    if not mask_inputs:
        return None
    source = onnx_source(encoder, repo)
    if source is None:
        return None
    return encoder, *source, mask_inputs[0]


def _fused_name(model: str, version: int, pool: str) -> str:
    name = f"{model}_v{version}__{pool}"
    if len(name) > 100:
        name = f"{model[:40]}_fused_{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name
