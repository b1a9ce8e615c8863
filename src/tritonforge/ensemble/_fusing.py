"""What every fusion shares: the generated model it hands the compiler, the ONNX model a step calls, whether
a generated name is free in the repository, and the one step that replaces two.

The fusions themselves: :mod:`tritonforge.ensemble.fuse` (the pass, ONNX model + mean pooling),
:mod:`tritonforge.ensemble._tokenize_encode` (tokenizer + fused encoder) and
:mod:`tritonforge.ensemble._fanin` (ONNX members + combiner).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonforge.config import ModelConfig, read_config
from tritonforge.ensemble.blocks import GENERATED_MARK
from tritonforge.ensemble.spec import StepSpec

__all__ = ["FUSE_TOLERANCE", "FusedModel", "merged_step", "name_free", "onnx_source"]

#: largest |fused - unfused| accepted on the check batch (float32 sums in another order)
FUSE_TOLERANCE = 1e-4
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


def merged_step(first: StepSpec, second: StepSpec, model: str) -> StepSpec:
    """One step calling ``model`` (version 1, generated) in place of ``first`` and the ``second`` that
    reads it: ``first``'s inputs, ``second``'s outputs."""
    return StepSpec(
        name=f"{first.name}+{second.name}",
        model=model,
        inputs=dict(first.inputs),
        outputs=dict(second.outputs),
        version=1,
    )


def name_free(repo: Path, name: str) -> bool:
    """No model of that name, or one we generated: someone's own model is never overwritten."""
    existing = repo / name / "config.pbtxt"
    if not existing.is_file():
        return True
    try:
        return GENERATED_MARK in read_config(existing).parameters
    except Exception:
        return False


def onnx_source(step: StepSpec, repo: Path) -> tuple[ModelConfig, int, Path] | None:
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
