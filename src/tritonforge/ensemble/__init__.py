"""Multi-model pipelines: YAML specs, checked as a whole, compiled to Triton ensembles or routed BLS models.

    from tritonforge.ensemble import check_specs, compile_all

    resolved, issues = check_specs(["ensembles"], "model_repository")   # every issue at once
    for issue in issues:
        print(issue)         # "pipeline 'p', step 'encode', tensor 'ids': dtype mismatch ... Fix: ..."
    compile_all("ensembles", "model_repository")   # PipelineCheckError (an EnsembleError): writes nothing

See :mod:`tritonforge.ensemble.spec` for the YAML, :mod:`tritonforge.ensemble.blocks` for the building blocks
(tokenizer, mean pooling, combiner, impute) and ``models/router.py`` for routing and fallback.
"""

from __future__ import annotations

from tritonforge.ensemble.blocks import BLOCKS, block_model
from tritonforge.ensemble.check import ModelInfo, Resolved, check_pipeline, known_models
from tritonforge.ensemble.compile import (
    PipelineCheckError,
    check_specs,
    compile_all,
    compile_specs,
    ensemble_config,
    router_config,
    spec_files,
)
from tritonforge.ensemble.spec import (
    BlockModelSpec,
    Condition,
    Issue,
    PipelineSpec,
    RouteStage,
    StepSpec,
    TensorDecl,
    load_spec,
    parse_spec,
)

__all__ = [
    "BLOCKS",
    "BlockModelSpec",
    "Condition",
    "Issue",
    "ModelInfo",
    "PipelineCheckError",
    "PipelineSpec",
    "Resolved",
    "RouteStage",
    "StepSpec",
    "TensorDecl",
    "block_model",
    "check_pipeline",
    "check_specs",
    "compile_all",
    "compile_specs",
    "ensemble_config",
    "known_models",
    "load_spec",
    "parse_spec",
    "router_config",
    "spec_files",
]
