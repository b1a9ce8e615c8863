"""The tokenizer and the fused encoder after it as one model (``<pipeline>__tokenize_encode``).

When a pipeline's ``tokenizer`` block feeds nothing but a fused encoder whose graph cuts padding, the two
steps become the tokenizer block with the fused graph beside it, which it runs on every batch it tokenises:
its input is the text, so requests of any length batch together, and a text costs one Python-backend hop
instead of two. Where the stub's Python has no onnxruntime (NVIDIA's container) it calls the fused model,
which stays in the repository, through BLS. :mod:`tritonforge.ensemble.fuse` decides when.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonforge.config import InstanceGroup, InstanceKind, ModelConfig
from tritonforge.ensemble._fusing import FusedModel, merged_step
from tritonforge.ensemble.blocks import GENERATED_MARK, block_model
from tritonforge.ensemble.check import Resolved
from tritonforge.ensemble.spec import BlockModelSpec, StepSpec
from tritonforge.repository import onnxruntime_thread_parameters

__all__ = ["feeding_tokenizer", "with_encoder"]


def feeding_tokenizer(
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


def with_encoder(
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
    return model, merged_step(step, fused, name)
