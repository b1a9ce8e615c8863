"""Compile checked pipelines into the repository: ensembles, building blocks, routed (BLS) models.

Nothing is written unless every spec of the build passes every check.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

from tritonforge.config import DynamicBatching, EnsembleStep, InstanceGroup, ModelConfig, write_config
from tritonforge.ensemble.blocks import GENERATED_MARK, block_model, model_file
from tritonforge.ensemble.check import Resolved, check_pipeline, known_models
from tritonforge.ensemble.spec import Issue, PipelineSpec, load_spec
from tritonforge.errors import EnsembleError
from tritonforge.repository import add_model
from tritonforge.repository.writer import STAGING_PREFIX

__all__ = [
    "PipelineCheckError",
    "check_specs",
    "compile_all",
    "compile_specs",
    "ensemble_config",
    "router_config",
    "spec_files",
]


class PipelineCheckError(EnsembleError):
    """One or more pipeline specs failed their checks; ``issues`` lists every one of them."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        lines = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(
            f"{len(issues)} problem(s) in the pipeline specs; nothing was written:\n{lines}",
            model=issues[0].pipeline if issues else None,
        )
        self.issues = list(issues)


def spec_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """YAML files named, or found in the folders named (``*.yaml`` / ``*.yml``), sorted."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted([*path.glob("*.yaml"), *path.glob("*.yml")]))
        else:
            files.append(path)
    return files


def check_specs(
    paths: Iterable[str | os.PathLike[str]], repo: str | os.PathLike[str] | None
) -> tuple[list[Resolved], list[Issue]]:
    """Parse and check every spec together (one's blocks may serve another): resolved ones, all issues."""
    parsed: list[PipelineSpec] = []
    issues: list[Issue] = []
    for file in spec_files(paths):
        spec, found = load_spec(file)
        issues.extend(found)
        if spec is not None:
            parsed.append(spec)
    names: dict[str, str] = {}
    for spec in parsed:
        if spec.name in names:
            issues.append(
                Issue(
                    spec.name,
                    f"two specs define pipeline '{spec.name}' ({names[spec.name]} and {spec.source}).",
                    "rename one of them.",
                    source=spec.source,
                )
            )
        names[spec.name] = str(spec.source)
    models, found = known_models(None if repo is None else Path(repo), parsed)
    issues.extend(found)
    resolved: list[Resolved] = []
    for spec in parsed:
        result, found = check_pipeline(spec, models)
        issues.extend(found)
        if result is not None:
            resolved.append(result)
    return resolved, issues


def ensemble_config(resolved: Resolved) -> ModelConfig:
    """The Triton ensemble config of a checked DAG pipeline."""
    spec = resolved.spec
    steps = [
        EnsembleStep(
            model_name=s.model, model_version=s.version, input_map=dict(s.inputs), output_map=dict(s.outputs)
        )
        for s in spec.steps
    ]
    return ModelConfig(
        name=spec.name,
        platform="ensemble",
        max_batch_size=resolved.max_batch_size,
        inputs=resolved.inputs,
        outputs=resolved.outputs,
        ensemble_steps=steps,
    )


def router_config(resolved: Resolved) -> ModelConfig:
    """The Python-backend (BLS) config of a checked routed pipeline; its plan travels as a JSON parameter."""
    from tritonforge.config import DataType, TensorSpec

    spec = resolved.spec
    input_names = [d.name for d in spec.inputs]
    output_names = [d.name for d in spec.outputs]
    stages = []
    for stage in spec.route:
        stages.append(
            {
                "model": stage.model,
                "version": stage.version,
                "fallback": list(stage.fallback),
                "timeout_ms": stage.timeout_ms,
                "when": None
                if stage.when is None
                else {
                    "tensor": stage.when.tensor,
                    "reduce": stage.when.reduce,
                    "comparison": stage.when.comparison,
                    "value": stage.when.value,
                },
                "inputs": dict(stage.inputs) if stage.inputs is not None else {n: n for n in input_names},
                "outputs": dict(stage.outputs) if stage.outputs is not None else {n: n for n in output_names},
            }
        )
    plan = {
        "name": spec.name,
        "inputs": input_names,
        "outputs": output_names,
        "route_output": spec.route_output,
        "stages": stages,
    }
    batched = resolved.max_batch_size > 0
    route = TensorSpec(name=spec.route_output, dtype=DataType.STRING, dims=[1])
    return ModelConfig(
        name=spec.name,
        backend="python",
        max_batch_size=resolved.max_batch_size,
        inputs=resolved.inputs,
        outputs=(*resolved.outputs, route),
        dynamic_batching=DynamicBatching() if batched and spec.dynamic_batching else None,
        instance_groups=(InstanceGroup(count=spec.instances),),
        parameters={"plan": json.dumps(plan, sort_keys=True), GENERATED_MARK: "router"},
    )


def compile_specs(paths: Iterable[str | os.PathLike[str]], repo: str | os.PathLike[str]) -> list[Path]:
    """Check every spec, then (only if all pass) write blocks, ensembles and routers into ``repo``.

    Returns:
        The model folders written (blocks first, then pipelines).

    Raises:
        PipelineCheckError: with every issue found; the repository is left untouched.
    """
    repo_path = Path(repo)
    resolved, issues = check_specs(paths, repo_path)
    if issues:
        raise PipelineCheckError(issues)
    written: list[Path] = []
    seen: set[str] = set()
    for item in resolved:
        spec = item.spec
        for block in spec.models:
            if block.name in seen:
                continue
            seen.add(block.name)
            built = block_model(
                block.name,
                block.block,
                block.options,
                block.max_batch_size,
                base_dir=Path(spec.source).parent if spec.source else None,
            )
            add_model(
                repo_path,
                block.name,
                built.source,
                built.config,
                version=1,
                overwrite=True,
                extra_files=built.extra_files,
                manifest={"block": block.block, "pipeline": spec.name},
            )
            written.append(repo_path / block.name)
    for item in resolved:
        spec = item.spec
        if spec.is_routed:
            add_model(
                repo_path,
                spec.name,
                model_file("router"),
                router_config(item),
                version=spec.version,
                overwrite=True,
                manifest={"pipeline": spec.name, "spec": str(spec.source)},
            )
        else:
            _write_ensemble(repo_path, ensemble_config(item), spec.version)
        written.append(repo_path / spec.name)
    return written


def compile_all(spec_dir: str | os.PathLike[str], repo: str | os.PathLike[str]) -> list[Path]:
    """Compile every ``*.yaml`` in ``spec_dir`` into ``repo`` (what ``tritonforge build`` calls).

    Example:
        >>> compile_all("ensembles", "model_repository")      # doctest: +SKIP
        [PosixPath('model_repository/minilm_tokenizer'), ..., PosixPath('model_repository/text_embedding')]

    Raises:
        PipelineCheckError: every issue of every spec; nothing is written.
    """
    return compile_specs([spec_dir], repo)


def _write_ensemble(repo: Path, config: ModelConfig, version: int) -> None:
    # add_model writes model files; an ensemble has none, only its config and an empty version folder.
    # Same discipline: stage inside the repository, then rename into place.
    repo.mkdir(parents=True, exist_ok=True)
    target = repo / config.name
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=repo))
    try:
        staged = staging / "model"
        (staged / str(version)).mkdir(parents=True)
        write_config(config, staged / "config.pbtxt")
        if target.exists():
            target.rename(staging / "replaced")
        staged.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
