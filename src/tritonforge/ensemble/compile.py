"""Compile checked pipelines into the repository: ensembles, building blocks, routed (BLS) models.

Nothing is written unless every spec of the build passes every check, and a build is staged whole (outside
the repository) before any model of it moves in: a failure part-way writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tritonforge.config import (
    DataType,
    DynamicBatching,
    EnsembleStep,
    InstanceGroup,
    ModelConfig,
    TensorSpec,
)
from tritonforge.ensemble.blocks import GENERATED_MARK, BlockModel, block_model, model_file, passthrough_model
from tritonforge.ensemble.check import Resolved, check_pipeline, known_models
from tritonforge.ensemble.fuse import fuse_pipeline
from tritonforge.ensemble.spec import Issue, PipelineSpec, load_spec
from tritonforge.errors import PipelineCheckError
from tritonforge.repository import RepositoryWrite, record_event

__all__ = [
    "MISSING_PARAMETER",
    "PipelineCheckError",
    "check_specs",
    "compile_all",
    "compile_specs",
    "ensemble_config",
    "ensemble_plan",
    "router_config",
    "spec_files",
]


MISSING_PARAMETER = "tritonforge_missing"
"""Parameter of a compiled pipeline: its inputs' declared NaN/±inf policy, JSON ``{input: policy}``."""


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
    """The Triton ensemble config of a checked DAG pipeline (see :func:`ensemble_plan`)."""
    return ensemble_plan(resolved)[0]


def _echoed(
    steps: list[EnsembleStep], shared: list[tuple[TensorSpec, str]], spec: PipelineSpec
) -> list[tuple[TensorSpec, str]]:
    """Route shared outputs through a combiner's ``ECHO_<k>`` where that is their only reader.

    An output read by one step only, a ``combiner`` block of this pipeline taking it as ``PROBS_<k>``, is
    handed out by that step as ``ECHO_<k>`` (``steps`` is changed in place): the combiner is the step
    Triton keeps whenever the output is wanted, so nothing is pruned that another step needs, and no
    passthrough hop is paid. Returns the shared outputs still needing the passthrough step.
    """
    combiners = {m.name for m in spec.models if m.block == "combiner"}
    left: list[tuple[TensorSpec, str]] = []
    for output, hidden in shared:
        readers = [i for i, s in enumerate(steps) if hidden in s.input_map.values()]
        step = steps[readers[0]] if len(readers) == 1 else None
        slots = [k for k, v in step.input_map.items() if v == hidden] if step is not None else []
        echo = f"ECHO_{slots[0][len('PROBS_') :]}" if slots and slots[0].startswith("PROBS_") else None
        if (
            step is None
            or step.model_name not in combiners
            or output.dtype != DataType.FP32
            or echo is None
            or echo in step.output_map
        ):
            left.append((output, hidden))
            continue
        steps[readers[0]] = dataclasses.replace(step, output_map={**step.output_map, echo: output.name})
    return left


def ensemble_plan(resolved: Resolved) -> tuple[ModelConfig, list[BlockModel]]:
    """The ensemble config of a checked DAG pipeline and the passthrough models it needs.

    Triton prunes an ensemble per request when a client names only some outputs: walking back from each
    output *not* requested, it drops the step producing it once none of that step's outputs is wanted —
    without asking whether the tensor also feeds another step — and an ensemble input whose consumers
    were all dropped is taken for the output of step 0 (``EnsembleContext`` in Triton's
    ``ensemble_scheduler.cc``). So ``LABEL`` alone from ``digits_vote`` dropped the member models the
    vote needs: "unexpected deadlock, at least one output is not set". The compiled graph avoids both
    traps: an output that a step also consumes is produced under an internal name and copied out by a
    passthrough step, one for all such outputs (dropping the copy drops nothing else; one Python hop
    instead of one per output) — or, where a combiner block is its only reader, handed out by that
    combiner as ``ECHO_<k>`` (no hop at all: ``digits_vote``'s members' probabilities), and when some
    output does not depend on
    every input, step 0 is a passthrough of the inputs (dropped only when nothing needs any input).
    """
    spec = resolved.spec
    steps = [
        EnsembleStep(
            model_name=s.model, model_version=s.version, input_map=dict(s.inputs), output_map=dict(s.outputs)
        )
        for s in spec.steps
    ]
    mbs = resolved.max_batch_size
    taken = {t for s in steps for t in (*s.input_map.values(), *s.output_map.values())}
    taken |= {t.name for t in (*resolved.inputs, *resolved.outputs)}

    def internal(tensor: str, role: str) -> str:
        name = f"_{tensor}_{role}"
        while name in taken:
            name = "_" + name
        taken.add(name)
        return name

    models: list[BlockModel] = []
    consumed = {t for s in steps for t in s.input_map.values()}
    shared: list[tuple[TensorSpec, str]] = []  # outputs also read by a step, and their internal names
    for output in resolved.outputs:
        if output.name not in consumed:
            continue
        hidden = internal(output.name, "shared")
        steps = [
            dataclasses.replace(
                s,
                input_map={k: hidden if v == output.name else v for k, v in s.input_map.items()},
                output_map={k: hidden if v == output.name else v for k, v in s.output_map.items()},
            )
            for s in steps
        ]
        shared.append((output, hidden))
    shared = _echoed(steps, shared, spec)
    if shared:
        # one copy step for all of them: every Python-model hop costs a round trip through its stub, and
        # one step is dropped as safely as several (it feeds no other step)
        model = passthrough_model([output for output, _ in shared], mbs)
        models.append(model)
        steps.append(
            EnsembleStep(
                model_name=model.config.name,
                input_map={f"IN_{k}": hidden for k, (_, hidden) in enumerate(shared)},
                output_map={f"OUT_{k}": output.name for k, (output, _) in enumerate(shared)},
            )
        )
    if not _every_output_needs_every_input(steps, resolved):
        model = passthrough_model(resolved.inputs, mbs)
        models.append(model)
        renamed = {t.name: internal(t.name, "input") for t in resolved.inputs}
        steps = [
            EnsembleStep(
                model_name=model.config.name,
                input_map={f"IN_{k}": t.name for k, t in enumerate(resolved.inputs)},
                output_map={f"OUT_{k}": renamed[t.name] for k, t in enumerate(resolved.inputs)},
            ),
            *(
                dataclasses.replace(s, input_map={k: renamed.get(v, v) for k, v in s.input_map.items()})
                for s in steps
            ),
        ]
    config = ModelConfig(
        name=spec.name,
        platform="ensemble",
        max_batch_size=mbs,
        inputs=resolved.inputs,
        outputs=resolved.outputs,
        ensemble_steps=steps,
        parameters=_missing_parameter(spec),
    )
    return config, models


def _missing_parameter(spec: PipelineSpec) -> dict[str, str]:
    """The inputs' declared NaN/±inf policy, as the compiled config's ``tritonforge_missing`` parameter
    (JSON ``{input: reject | allow | impute}``), for clients and people reading the repository."""
    return {MISSING_PARAMETER: json.dumps({d.name: d.missing for d in spec.inputs}, sort_keys=True)}


def _every_output_needs_every_input(steps: Sequence[EnsembleStep], resolved: Resolved) -> bool:
    needs: dict[str, set[str]] = {t.name: {t.name} for t in resolved.inputs}
    pending = list(steps)
    while pending:  # the spec is checked acyclic, so each pass settles at least one step
        ready = [s for s in pending if all(v in needs for v in s.input_map.values())]
        if not ready:
            return True  # not ours to judge here; the checks reported it
        for step in ready:
            upstream = set().union(*(needs[v] for v in step.input_map.values()))
            for tensor in step.output_map.values():
                needs[tensor] = upstream
            pending.remove(step)
    everything = {t.name for t in resolved.inputs}
    return all(needs.get(t.name, everything) == everything for t in resolved.outputs)


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
        parameters={
            "plan": json.dumps(plan, sort_keys=True),
            GENERATED_MARK: "router",
            **_missing_parameter(spec),
        },
    )


def compile_specs(
    paths: Iterable[str | os.PathLike[str]], repo: str | os.PathLike[str], *, fuse: bool = True
) -> list[Path]:
    """Check every spec, then (only if all pass) write blocks, ensembles and routers into ``repo``.

    With ``fuse`` (the default), an ONNX step whose token embeddings feed only a ``mean_pooling`` block
    is compiled, with the pooling, into one fused ONNX model that the ensemble calls instead of the two
    (:mod:`tritonforge.ensemble.fuse`; same answer within float tolerance, checked at compile time). The
    source models stay in the repository; the fused one's manifest records what was fused.

    Every model goes through the one writer (:class:`~tritonforge.repository.RepositoryWrite`), ensembles
    included (their version folder holds their manifest); the whole build is staged first, so an error
    part-way leaves the repository as it was. The build is recorded in the repository's audit log
    (``compile``: the specs and the models written).

    Returns:
        The model folders written (blocks first, then pipelines).

    Raises:
        PipelineCheckError: with every issue found; the repository is left untouched.
        RepositoryError: the build could not be staged or moved in (nothing, or only whole models, moved).
    """
    repo_path = Path(repo)
    paths = list(paths)  # read twice: checked, then recorded
    resolved, issues = check_specs(paths, repo_path)
    if issues:
        raise PipelineCheckError(issues)
    written: list[Path] = []
    seen: set[str] = set()
    scratch_dir = tempfile.TemporaryDirectory(prefix="tritonforge-fuse-")
    with scratch_dir as scratch, RepositoryWrite(repo_path) as write:

        def add_once(config: ModelConfig, source: Path, manifest: Mapping[str, Any], extra: Any = ()) -> None:
            """A generated model (block, helper, fused model) as version 1, once per compile."""
            if config.name in seen:
                return
            seen.add(config.name)
            write.add_model(
                config.name, source, config, version=1, overwrite=True, extra_files=extra, manifest=manifest
            )
            written.append(repo_path / config.name)

        def add_block(model: BlockModel, block: str, pipeline: str) -> None:
            add_once(model.config, model.source, {"block": block, "pipeline": pipeline}, model.extra_files)

        for item in resolved:
            spec = item.spec
            for block in spec.models:
                base_dir = Path(spec.source).parent if spec.source else None
                built = block_model(
                    block.name, block.block, block.options, block.max_batch_size, base_dir=base_dir
                )
                add_block(built, block.block, spec.name)
        for item in resolved:
            spec = item.spec
            record: dict[str, Any] = {"pipeline": spec.name, "spec": str(spec.source)}
            if spec.is_routed:
                write.add_model(
                    spec.name,
                    model_file("router"),
                    router_config(item),
                    version=spec.version,
                    overwrite=True,
                    manifest=record,
                )
            else:
                if fuse:
                    item, fused = fuse_pipeline(item, repo_path, Path(scratch) / spec.name)
                    if fused:
                        record["fused_models"] = [m.config.name for m in fused]
                    for model in fused:
                        add_once(model.config, model.source, model.manifest, model.extra_files)
                config, helpers = ensemble_plan(item)
                for helper in helpers:
                    add_block(helper, "passthrough", spec.name)
                write.add_model(
                    spec.name, None, config, version=spec.version, overwrite=True, manifest=record
                )
            written.append(repo_path / spec.name)
    record_event(
        repo_path,
        "compile",
        details={"specs": [str(p) for p in paths], "written": [str(p) for p in written]},
    )
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
