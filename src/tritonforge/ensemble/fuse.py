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
row's mask keeps (:func:`trim_padding`), and when the pipeline's tokenizer feeds nothing but the fused step,
the two steps become one model (``<pipeline>__tokenize_encode``): the tokenizer block with the fused graph
beside it, which it runs on every batch it tokenises (:func:`_with_encoder`). Its input is the text, so
requests of any length batch together; each batch is padded to its longest text and the graph's
token-wise layers run on the real tokens only (:func:`pack_tokens`); and a text costs one Python-backend
hop instead of two. Where the stub's Python has no onnxruntime (NVIDIA's container) it calls the fused
model, which stays in the repository, through BLS. All of it only when a check batch padded past its
longest row answers as each row alone (a model that reads masked tokens keeps the plain fusion); the
spec's own tokenizer is unchanged for clients that call it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.config import DataType, InstanceGroup, InstanceKind, ModelConfig, TensorSpec, read_config
from tritonforge.ensemble._fanin import COMBINED, LABEL, Member, check_fan_in, write_fan_in
from tritonforge.ensemble.blocks import GENERATED_MARK, block_model
from tritonforge.ensemble.check import Resolved
from tritonforge.ensemble.spec import BlockModelSpec, StepSpec
from tritonforge.repository import file_sha256, onnxruntime_thread_parameters, with_layout

__all__ = ["FusedModel", "fuse_pipeline", "mean_pooling_graph"]

#: largest |fused - unfused| accepted on the check batch (float32 sums in another order)
FUSE_TOLERANCE = 1e-4
#: a batching fused model's layout is measured with this many requests per CPU waiting at once ...
QUEUED_PER_CPU = 4
#: ... each this many tokens (a short sentence), every token real
BUCKET_TOKENS = 16
#: alternating rounds of that measurement (two candidates can be a few per cent apart)
LAYOUT_ROUNDS = 5
#: bumped when the fused graph or the measurement changes, so that a recorded layout is measured anew
LAYOUT_RULE = 3
_ONNX_PLATFORMS = ("onnxruntime_onnx",)
_ONNX_BACKENDS = ("onnxruntime",)


@dataclasses.dataclass(frozen=True)
class FusedModel:
    """A generated model to write: its config, its file (a fused ONNX graph in a scratch folder, or a block's
    ``model.py``), its manifest record and any files beside it (a tokenizer's ``tokenizer.json``)."""

    config: ModelConfig
    source: Path
    manifest: Mapping[str, Any]
    extra_files: tuple[Path, ...] = ()


def fuse_pipeline(resolved: Resolved, repo: Path, scratch: Path) -> tuple[Resolved, list[FusedModel]]:
    """``resolved`` with every fusable (ONNX model -> mean pooling) pair of steps replaced by one step.

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
        if not _name_free(repo, name):
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
                written = _write_fused(*args, trim=trim, pack=pack)
                if written is None:
                    break
                difference = _check(*args[:3], out_name, normalize, rows_alone=written[1])
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
        fused_step = _merged_step(encoder, pool, name)
        steps[index] = fused_step
        steps.remove(pool)
        tokenizer = _feeding_tokenizer(steps, fused_step, resolved) if trimmed else None
        text_name = f"{spec.name}__tokenize_encode"
        if tokenizer is not None and (len(text_name) > 100 or not _name_free(repo, text_name)):
            tokenizer = None
        layout = _measured_layout(model_path)
        # the fused graph's hash: the batched layout's key and the tokenizer's record (90 MB read once)
        fused_sha256 = file_sha256(target) if tokenizer is not None else ""
        if layout is not None and tokenizer is not None:
            # its requests batch now: measured anew, the candidates sharing a queue of requests
            layout = _batched_layout(target, fused_sha256, repo / name / "1" / "manifest.json", source_sha256)
        elif layout is not None:  # the encoder version's own measurement: the pooling appended costs little
            layout = {**layout, "reused_from": f"{encoder.model} version {version}"}
        if layout is not None:
            fused_config = with_layout(fused_config, layout["instances"], layout["intra_op_threads"])
            record["layout"] = layout
        fused_models.append(FusedModel(config=fused_config, source=target, manifest=record))
        if tokenizer is not None:
            text_model, text_step = _with_encoder(
                text_name, *tokenizer, fused_step, fused_config, (target, fused_sha256), record, resolved
            )
            fused_models.append(text_model)
            steps = [text_step if s is tokenizer[0] else s for s in steps if s is not fused_step]
    for combine in list(steps):
        block = blocks.get(combine.model)
        if block is None or block.block != "combiner":
            continue
        found = _fan_in(steps, combine, block, resolved, repo, scratch)
        if found is None:
            continue
        model, step, replaced = found
        fused_models.append(model)
        first = next(s for s in steps if s in replaced)
        steps = [step if s is first else s for s in steps if s is first or s not in replaced]
    if not fused_models:
        return resolved, []
    return dataclasses.replace(resolved, spec=dataclasses.replace(spec, steps=tuple(steps))), fused_models


def _batched_layout(
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


def _feeding_tokenizer(
    steps: list[StepSpec], fused: StepSpec, resolved: Resolved
) -> tuple[StepSpec, BlockModelSpec] | None:
    """The ``tokenizer`` block step whose arrays feed ``fused`` (a model whose answer ignores padding) and
    nothing else, with its block; None when there is no such step or its arrays go anywhere else."""
    producers = [s for s in steps if set(fused.inputs.values()) & set(s.outputs.values())]
    blocks = {m.name: m for m in resolved.spec.models}
    if len(producers) != 1 or not set(fused.inputs.values()) <= set(producers[0].outputs.values()):
        return None
    step = producers[0]
    block = blocks.get(step.model)
    if block is None or block.block != "tokenizer":
        return None
    produced = set(step.outputs.values())
    read_elsewhere = {t for s in steps if s is not fused for t in s.inputs.values()}
    if produced & (read_elsewhere | {t.name for t in resolved.outputs}):
        return None
    return step, block


def _with_encoder(
    name: str,
    step: StepSpec,
    block: BlockModelSpec,
    fused: StepSpec,
    fused_config: ModelConfig,
    graph: tuple[Path, str],
    fused_record: Mapping[str, Any],
    resolved: Resolved,
) -> tuple[FusedModel, StepSpec]:
    """The tokenizer ``step`` and the ``fused`` step after it as one model: the tokenizer block with its
    encoder (``models/tokenizer.py``), which runs the fused ``graph`` (its file and sha256) on each batch it
    tokenises.

    One Python-backend hop per text instead of two, and since its input is the text itself, Triton batches
    requests of any length together (the graph cuts each batch back to its longest row). In this process
    with onnxruntime where the stub's Python has it (the embedded server); else through BLS to the fused
    model, which stays in the repository for that (NVIDIA's container: its C++ onnxruntime backend).
    """
    spec = resolved.spec
    base_dir = Path(spec.source).parent if spec.source else None
    built = block_model(name, "tokenizer", block.options, block.max_batch_size, base_dir=base_dir)
    arrays = {source: out for out, source in step.outputs.items()}  # pipeline tensor -> tokenizer output
    output = next(iter(fused.outputs))
    layout = fused_record.get("layout")
    gpu = any(group.kind == InstanceKind.GPU for group in fused_config.instance_groups)
    instances = int(layout["instances"]) if layout else 1
    threads = int(layout["intra_op_threads"]) if layout else 1
    params = {
        **built.config.parameters,
        **onnxruntime_thread_parameters(threads),
        GENERATED_MARK: f"tokenize_encode:{step.model}+{fused.model}",
        "encoder_file": "model.onnx",
        "encoder_inputs": json.dumps({graph_input: arrays[t] for graph_input, t in fused.inputs.items()}),
        "encoder_output": output,
        "encoder_model": fused.model,
        "encoder_model_version": "1",
        # a fused model laid out on GPUs is called there; the tokenizer's own onnxruntime would run on CPU
        "encoder_in_process": "no" if gpu else "auto",
    }
    config = built.config.replace(
        outputs=[s for s in fused_config.outputs if s.name == output],
        max_batch_size=min(built.config.max_batch_size, fused_config.max_batch_size),
        instance_groups=(InstanceGroup(count=instances, kind=InstanceKind.CPU),),
        parameters=params,
    )
    record = {
        "block": "tokenizer",
        "variant": "tokenize_encode",
        "pipeline": spec.name,
        "from": {"tokenizer": step.model, "encoder": fused.model},
        "steps": [step.name, fused.name],
        "encoder": {
            "file": "model.onnx",
            "sha256": graph[1],
            "runs": f"through BLS to '{fused.model}' (its instances are GPU ones)"
            if gpu
            else f"in the stub with onnxruntime when its Python has it, else through BLS to '{fused.model}'",
        },
        "why": "one Python-backend hop per text instead of two, and texts of any length batch together",
        **({"layout": layout} if layout else {}),
    }
    model = FusedModel(
        config=config, source=built.source, manifest=record, extra_files=(*built.extra_files, graph[0])
    )
    return model, _merged_step(step, fused, name)


def _merged_step(first: StepSpec, second: StepSpec, model: str) -> StepSpec:
    """One step calling ``model`` (version 1, generated) in place of ``first`` and the ``second`` that
    reads it: ``first``'s inputs, ``second``'s outputs."""
    return StepSpec(
        name=f"{first.name}+{second.name}",
        model=model,
        inputs=dict(first.inputs),
        outputs=dict(second.outputs),
        version=1,
    )


def _name_free(repo: Path, name: str) -> bool:
    """No model of that name, or one we generated: someone's own model is never overwritten."""
    existing = repo / name / "config.pbtxt"
    if not existing.is_file():
        return True
    try:
        return GENERATED_MARK in read_config(existing).parameters
    except Exception:
        return False


def _fan_in(
    steps: list[StepSpec],
    combine: StepSpec,
    block: BlockModelSpec,
    resolved: Resolved,
    repo: Path,
    scratch: Path,
) -> tuple[FusedModel, StepSpec, list[StepSpec]] | None:
    """The fused model replacing ``combine`` and the ONNX members feeding it, with its step and the steps
    it replaces; None when they can't be fused exactly (they then compile as written)."""
    options = block.options
    count, classes = int(options.get("inputs", 0)), int(options.get("classes", 0))
    slots = [combine.inputs.get(f"PROBS_{k}") for k in range(count)]
    if count < 2 or len(combine.inputs) != count or not set(combine.outputs) <= {COMBINED, LABEL}:
        return None
    pipeline_outputs = {t.name for t in resolved.outputs}
    parts: list[StepSpec] = []
    members: list[Member] = []
    configs: list[tuple[ModelConfig, int, Path]] = []
    inputs: dict[str, TensorSpec] = {}
    for k, tensor in enumerate(slots):
        producers = [s for s in steps if tensor is not None and tensor in s.outputs.values()]
        if len(producers) != 1 or len(producers[0].outputs) != 1 or producers[0] in parts:
            return None
        step = producers[0]
        source = _onnx_source(step, repo)
        if source is None:
            return None
        config = source[0]
        output = next(iter(step.outputs))
        specs = {t.name: t for t in config.inputs}
        out_spec = next((t for t in config.outputs if t.name == output), None)
        if out_spec is None or out_spec.dtype != DataType.FP32 or set(step.inputs) != set(specs):
            return None
        for name, fed in step.inputs.items():
            spec = specs[name]
            if spec.dtype != DataType.FP32 or any(d < 1 for d in spec.dims) or fed in (COMBINED, LABEL):
                return None  # the check batch is random FP32 of known shape
            renamed = dataclasses.replace(spec, name=fed)
            if inputs.setdefault(fed, renamed) != renamed:
                return None
        others = [s for s in steps if tensor in s.inputs.values() and s is not combine]
        exposed = f"PROBS_{k}" if others or tensor in pipeline_outputs else None
        parts.append(step)
        configs.append(source)
        members.append(Member(path=source[2], inputs=dict(step.inputs), output=output, exposed=exposed))
    produced = {t for s in (*parts, combine) for t in s.outputs.values()}
    if produced & set(inputs) or set(inputs) & {m.exposed for m in members}:
        return None  # a member reads another's output: not side by side
    name = f"{resolved.spec.name}__{combine.name}_fused"
    if len(name) > 100:
        name = f"{resolved.spec.name[:40]}_fused_{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    if not _name_free(repo, name):
        return None
    method = str(options.get("method", "average"))
    raw = np.asarray(options.get("weights") or [1.0] * count, dtype=np.float64)
    weights = (raw / raw.sum()).astype(np.float32)  # as the block normalises them
    want = set(combine.outputs)
    folder = scratch / name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    rng = np.random.default_rng(0)
    feeds = {fed: rng.normal(size=(16, *spec.dims)).astype(np.float32) for fed, spec in inputs.items()}
    try:
        if not write_fan_in(members, method, weights, classes, want, target):
            return None
        difference = check_fan_in(members, method, weights, target, feeds, want)
    except Exception:  # a graph onnx or onnxruntime can't take apart or run here: compiled unfused
        return None
    if not difference <= FUSE_TOLERANCE:
        return None
    outputs = [TensorSpec(name=COMBINED, dtype=DataType.FP32, dims=[classes])] if COMBINED in want else []
    if LABEL in want:
        outputs.append(TensorSpec(name=LABEL, dtype=DataType.INT64, dims=[1]))
    outputs += [TensorSpec(name=m.exposed, dtype=DataType.FP32, dims=[classes]) for m in members if m.exposed]
    first = configs[0][0]
    sources: list[dict[str, Any]] = [
        {"model": s.model, "version": version, "sha256": file_sha256(path)}
        for s, (_, version, path) in zip(parts, configs, strict=True)
    ]
    fused_config = first.replace(
        name=name,
        max_batch_size=min(config.max_batch_size for config, _, _ in configs),
        inputs=list(inputs.values()),
        outputs=outputs,
        version_policy=None,
        default_model_filename=None,
        parameters={
            **first.parameters,
            GENERATED_MARK: "fused:"
            + "+".join(f"{s['model']}:{s['version']}" for s in sources)
            + f"+{combine.model}",
        },
    )
    record: dict[str, Any] = {
        "block": "fused",
        "variant": "fused",
        "source": {"path": str(configs[0][2].resolve()), "sha256": sources[0]["sha256"]},
        "artifact": {"bytes": target.stat().st_size},
        "pipeline": resolved.spec.name,
        "fused": {
            "steps": [s.name for s in (*parts, combine)],
            "from": [*sources, {"model": combine.model, "block": "combiner", "options": dict(options)}],
            "appended": f"the combiner's {method} over the members' outputs, side by side in one graph",
            "max_abs_diff_vs_unfused": difference,
            "why": f"one model instead of {len(parts) + 1}: no Python-backend hop, one request per row "
            "for all members",
        },
    }
    layouts = [layout for _, _, path in configs if (layout := _measured_layout(path)) is not None]
    if len(layouts) == len(configs):  # the members' own measurements: the widest of them
        instances = max(int(layout["instances"]) for layout in layouts)
        threads = max(int(layout["intra_op_threads"]) for layout in layouts)
        fused_config = with_layout(fused_config, instances, threads)
        record["layout"] = {
            "instances": instances,
            "intra_op_threads": threads,
            "reused_from": ", ".join(f"{s['model']} version {s['version']}" for s in sources),
        }
    step = StepSpec(
        name="+".join(s.name for s in (*parts, combine)),
        model=name,
        inputs={fed: fed for fed in inputs},
        outputs={
            **combine.outputs,
            **{m.exposed: tensor for m, tensor in zip(members, slots, strict=True) if m.exposed and tensor},
        },
        version=1,
    )
    return FusedModel(config=fused_config, source=target, manifest=record), step, [*parts, combine]


def _measured_layout(model_path: Path) -> dict[str, Any] | None:
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
    source = _onnx_source(encoder, repo)
    if source is None:
        return None
    return encoder, *source, mask_inputs[0]


def _onnx_source(step: StepSpec, repo: Path) -> tuple[ModelConfig, int, Path] | None:
    """The batching ONNX model a step calls: its config, the version the step runs and its file (None when
    the step calls anything else, or the version or file can't be told)."""
    config_path = repo / step.model / "config.pbtxt"
    if not config_path.is_file():
        return None
    try:
        config = read_config(config_path)
    except Exception:
        return None
    if config.platform not in _ONNX_PLATFORMS and config.backend not in _ONNX_BACKENDS:
        return None
    if config.max_batch_size <= 0 or config.ensemble_steps is not None:
        return None
    version = step.version
    if version == -1:
        if config.version_policy is not None and config.version_policy.kind == "specific":
            return None
        versions = [int(p.name) for p in (repo / step.model).iterdir() if p.name.isdigit()]
        if not versions:
            return None
        version = max(versions)
    model_path = repo / step.model / str(version) / (config.default_model_filename or "model.onnx")
    if not model_path.is_file():
        return None
    return config, version, model_path


def _fused_name(model: str, version: int, pool: str) -> str:
    name = f"{model}_v{version}__{pool}"
    if len(name) > 100:
        name = f"{model[:40]}_fused_{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def mean_pooling_graph(
    tokens: str, mask: str, output: str, *, normalize: bool, prefix: str = "tritonforge_pool"
) -> tuple[list[Any], list[Any]]:
    """ONNX nodes (opset >= 13) and initializers computing the ``mean_pooling`` block's answer.

    ``output[n] = sum_t mask[n,t] * tokens[n,t,:] / max(sum_t mask[n,t], 1e-9)``, then divided by
    ``max(L2 norm, 1e-12)`` when ``normalize`` — the block's formula, as a batched MatMul.
    """
    from onnx import TensorProto, helper, numpy_helper

    def t(name: str) -> str:
        return f"{prefix}/{name}"

    inits = [
        numpy_helper.from_array(np.array([1], dtype=np.int64), t("axis1")),
        numpy_helper.from_array(np.array(1e-9, dtype=np.float32), t("eps_count")),
        numpy_helper.from_array(np.array(1e-12, dtype=np.float32), t("eps_norm")),
    ]
    nodes = [
        helper.make_node("Cast", [mask], [t("mask_f")], to=TensorProto.FLOAT, name=t("cast")),
        helper.make_node("Unsqueeze", [t("mask_f"), t("axis1")], [t("mask_row")], name=t("unsqueeze")),
        helper.make_node("MatMul", [t("mask_row"), tokens], [t("summed3")], name=t("matmul")),
        helper.make_node("Squeeze", [t("summed3"), t("axis1")], [t("summed")], name=t("squeeze")),
        helper.make_node(
            "ReduceSum", [t("mask_f"), t("axis1")], [t("count")], keepdims=1, name=t("count_sum")
        ),
        helper.make_node("Max", [t("count"), t("eps_count")], [t("count_c")], name=t("count_max")),
    ]
    mean = output if not normalize else t("mean")
    nodes.append(helper.make_node("Div", [t("summed"), t("count_c")], [mean], name=t("mean_div")))
    if normalize:
        nodes += [
            helper.make_node("Mul", [mean, mean], [t("sq")], name=t("sq")),
            helper.make_node("ReduceSum", [t("sq"), t("axis1")], [t("ss")], keepdims=1, name=t("ss")),
            helper.make_node("Sqrt", [t("ss")], [t("norm")], name=t("sqrt")),
            helper.make_node("Max", [t("norm"), t("eps_norm")], [t("norm_c")], name=t("norm_max")),
            helper.make_node("Div", [mean, t("norm_c")], [output], name=t("norm_div")),
        ]
    return nodes, inits


def _write_fused(
    source: Path,
    target: Path,
    tokens: str,
    mask: str,
    output: str,
    normalize: bool,
    *,
    trim: bool = False,
    pack: bool = False,
) -> tuple[int, bool, bool] | None:
    """Write ``source`` with pooling appended to ``target``: the embedding dim (-1 if unknown), whether the
    graph trims trailing padding first (asked for with ``trim`` and possible) and whether its token-wise
    layers run on real tokens only (``pack``, on a trimmed graph); None when not fusable."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(source))
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    outs = {o.name: o for o in graph.output}
    ins = {i.name for i in graph.input}
    if opset < 13 or tokens not in outs or mask not in ins:
        return None
    token_type = outs[tokens].type.tensor_type
    if token_type.elem_type != TensorProto.FLOAT or len(token_type.shape.dim) != 3:
        return None
    last = token_type.shape.dim[2]
    dim = last.dim_value if last.HasField("dim_value") and last.dim_value > 0 else -1
    if model.ByteSize() > 1_900_000_000:
        return None  # a single-file ONNX model stops at 2 GB
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | ins
    if output in taken:
        return None
    nodes, inits = mean_pooling_graph(tokens, mask, output, normalize=normalize)
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    cut_mask = trim_padding(graph, mask, opset) if trim else None
    trimmed = cut_mask is not None
    batch = token_type.shape.dim[0]
    out = helper.make_tensor_value_info(
        output, TensorProto.FLOAT, [batch.dim_param or (batch.dim_value or None), dim if dim > 0 else None]
    )
    del graph.output[:]
    graph.output.append(out)
    packed = cut_mask is not None and pack and pack_tokens(graph, cut_mask)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))
    return dim, trimmed, packed


def trim_padding(graph: Any, mask: str, opset: int, prefix: str = "tritonforge_trim") -> str | None:
    """Put in front of ``graph`` a cut of its [batch, sequence] inputs to the last column any row's ``mask``
    keeps (at least one); the cut mask's name if done, else None.

    Columns past every row's last token carry nothing a mask-respecting model reads, so a batch padded
    wider than its longest row (texts of different lengths batched together) costs
    only its longest row. Whether the model respects the mask is for the caller to check: done only when
    every graph input is 2-D with the mask's sequence dimension and no node holds a subgraph (whose
    references to the inputs would not be renamed).
    """
    from onnx import AttributeProto, TensorProto, helper, numpy_helper

    def t(name: str) -> str:
        return f"{prefix}/{name}"

    def seq_dim(value: Any) -> Any:
        dims = value.type.tensor_type.shape.dim
        return (dims[1].dim_param or dims[1].dim_value) if len(dims) == 2 else None

    inputs = {i.name: i for i in graph.input}
    initialized = {i.name for i in graph.initializer}
    names = [n for n in inputs if n not in initialized]
    if mask not in names or not seq_dim(inputs[mask]):
        return None
    if any(seq_dim(inputs[n]) != seq_dim(inputs[mask]) for n in names):
        return None
    if any(
        a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for node in graph.node for a in node.attribute
    ):
        return None
    reduce_rows = (
        helper.make_node("ReduceMax", [t("mask64"), t("axis0")], [t("any")], keepdims=0, name=t("rows"))
        if opset >= 18
        else helper.make_node("ReduceMax", [t("mask64")], [t("any")], axes=[0], keepdims=0, name=t("rows"))
    )
    nodes = [
        helper.make_node("Cast", [mask], [t("mask64")], to=TensorProto.INT64, name=t("cast")),
        reduce_rows,  # [sequence]: 1 where some row keeps the column
        helper.make_node("Shape", [mask], [t("shape")], name=t("shape")),
        helper.make_node("Gather", [t("shape"), t("one")], [t("width")], axis=0, name=t("width")),
        helper.make_node("Add", [t("width"), t("one")], [t("limit")], name=t("limit")),
        helper.make_node("Range", [t("one"), t("limit"), t("one")], [t("position")], name=t("range")),
        helper.make_node("Mul", [t("any"), t("position")], [t("kept")], name=t("kept")),
        helper.make_node("ReduceMax", [t("kept")], [t("last")], keepdims=1, name=t("last")),
        helper.make_node("Max", [t("last"), t("ones")], [t("end")], name=t("end")),
    ]
    inits = [
        *([numpy_helper.from_array(np.array([0], dtype=np.int64), t("axis0"))] if opset >= 18 else []),
        numpy_helper.from_array(np.array(1, dtype=np.int64), t("one")),
        numpy_helper.from_array(np.array([1], dtype=np.int64), t("ones")),
        numpy_helper.from_array(np.array([0], dtype=np.int64), t("zeros")),
    ]
    renamed = {name: t(f"cut/{name}") for name in names}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for name in names:
        nodes.append(
            helper.make_node(
                "Slice", [name, t("zeros"), t("end"), t("ones")], [renamed[name]], name=t(f"cut/{name}")
            )
        )
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    graph.initializer.extend(inits)
    return renamed[mask]


def pack_tokens(graph: Any, mask: str, prefix: str = "tritonforge_pack") -> bool:
    """Run ``graph``'s token-wise layers on the real tokens of the batch only; True if any was moved.

    In a transformer only attention mixes tokens: the projections, the feed-forward layers, their
    activations and the residual layer norms are the same computation on every token, padding included.
    After each ``com.microsoft`` ``Attention`` node (onnxruntime's fused attention, as its BERT optimizer
    writes it) its output is packed to the rows ``mask`` keeps ([real tokens, 1, hidden]: one Gather of the
    flattened batch, a shape every token-wise node takes as batch x sequence 1), the token-wise nodes that
    follow run packed (``MatMul`` by a 2-D weight, ``BiasGelu`` / ``Gelu`` / ``FastGelu`` / ``Relu``,
    ``SkipLayerNormalization``), and a tensor that leaves them (the next attention's input, the pooling's
    token embeddings) is scattered back into a zero-padded batch. A batch padded to its longest row then
    costs the rows' own lengths in those layers (~3/4 of MiniLM's per-token work; in-process ~1.2x per
    sentence on batches of 4 to 8 of 5 to 14 tokens).
    Standard operators only (NonZero, Gather, ScatterND), so the C++ onnxruntime backend runs it too. The
    caller checks the answer; nodes of any other kind are left as they are.
    """
    from onnx import helper, numpy_helper

    def t(name: str) -> str:
        return f"{prefix}/{name}"

    constants = {i.name: i for i in graph.initializer}
    attentions = [n for n in graph.node if n.op_type == "Attention" and n.domain == "com.microsoft"]
    if not attentions:
        return False
    hidden = {n.input[0] for n in attentions} | {n.output[0] for n in attentions}
    reference = attentions[0].input[0]  # the first hidden state, [batch, sequence, hidden]
    packed: dict[str, str] = {}  # a hidden state -> its packed copy
    packed_only: set[str] = set()  # tensors that exist packed only
    unpacked: dict[str, str] = {}  # a packed-only tensor -> its scattered-back copy
    nodes: list[Any] = []

    # few nodes per hand-off (each costs a dispatch even when nothing is padded): [rows, 1, hidden] is what
    # a Gather by [kept, 1] indices gives and what a ScatterND into [rows, 1, hidden] zeros takes
    def pack(name: str) -> str:
        if name not in packed:
            out = t(f"packed/{name}")
            nodes.extend(
                [
                    helper.make_node("Reshape", [name, t("rows_shape")], [f"{out}/rows"]),
                    helper.make_node("Gather", [f"{out}/rows", t("kept")], [out], axis=0),
                ]
            )
            packed[name] = out
        return packed[name]

    def unpack(name: str) -> str:
        if name not in unpacked:
            out = t(f"unpacked/{name}")
            nodes.extend(
                [
                    helper.make_node("ScatterND", [t("zeros"), t("kept"), name], [f"{out}/rows"]),
                    helper.make_node("Reshape", [f"{out}/rows", t("batch_shape")], [out]),
                ]
            )
            unpacked[name] = out
        return unpacked[name]

    def tokenwise(node: Any) -> bool:
        moving = [name for name in node.input if name and name not in constants]
        if not moving or not all(name in packed_only or name in hidden for name in moving):
            return False
        params = [name for name in node.input[1:] if name]
        if node.op_type == "MatMul":
            return (
                len(node.input) == 2
                and node.input[1] in constants
                and len(constants[node.input[1]].dims) == 2
            )
        if node.op_type in ("BiasGelu", "Gelu", "FastGelu", "Relu"):
            return all(name in constants for name in params)
        if node.op_type == "SkipLayerNormalization":
            return all(name in constants for name in node.input[2:] if name)
        return False

    outputs = {value.name for value in graph.output}
    renamed: dict[str, str] = {}  # a graph output computed packed -> its packed name
    ready = False
    for original in graph.node:
        node = copy.deepcopy(original)  # the graph is changed only when the whole pass succeeds
        if not ready and reference in node.input:
            nodes.extend(  # where the kept tokens are, once the mask and the first hidden state exist
                [
                    helper.make_node("Reshape", [mask, t("minus1")], [t("mask_rows")]),
                    helper.make_node("NonZero", [t("mask_rows")], [t("nonzero")]),
                    helper.make_node("Transpose", [t("nonzero")], [t("kept")], perm=[1, 0]),  # [kept, 1]
                    helper.make_node("Shape", [reference], [t("batch_shape")]),
                    helper.make_node(
                        "Slice", [t("batch_shape"), t("axis0"), t("two"), t("axis0")], [t("b_l")]
                    ),
                    helper.make_node("ReduceProd", [t("b_l")], [t("all_rows")], keepdims=1),
                    helper.make_node(
                        "Slice", [t("batch_shape"), t("two"), t("three"), t("axis0")], [t("width")]
                    ),
                    helper.make_node(
                        "Concat", [t("all_rows"), t("one"), t("width")], [t("zeros_shape")], axis=0
                    ),
                    helper.make_node("ConstantOfShape", [t("zeros_shape")], [t("zeros")]),
                    helper.make_node("Concat", [t("minus1"), t("width")], [t("rows_shape")], axis=0),
                ]
            )
            ready = True
        if ready and node.op_type != "Attention" and tokenwise(node):
            for i, name in enumerate(node.input):
                if name and name not in constants and name not in packed_only:
                    node.input[i] = pack(name)
            for i, name in enumerate(node.output):
                if name in outputs:  # scattered back under its own name below
                    node.output[i] = renamed[name] = t(f"packed/{name}")
            nodes.append(node)
            packed_only.update(name for name in node.output if name)
            continue
        for i, name in enumerate(node.input):
            if name in packed_only:
                node.input[i] = unpack(name)
        nodes.append(node)
    if not packed_only:
        return False
    for name, packed_name in renamed.items():
        nodes.append(helper.make_node("Identity", [unpack(packed_name)], [name]))
    graph.initializer.extend(
        numpy_helper.from_array(np.array([value], dtype=np.int64), t(name))
        for name, value in (("minus1", -1), ("axis0", 0), ("one", 1), ("two", 2), ("three", 3))
    )
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def _check(
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
