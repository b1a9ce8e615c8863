"""Checks of pipeline specs against the repository, before Triton sees them: all issues, not the first.

Checked: every model exists (in the repository or declared as a building block in the same build) and a
pinned version exists; each step's tensor names exist on its model; every required model input is fed; each
tensor has exactly one producer; every tensor read has a producer; no cycles; every pipeline input is read and
every step output used; dtypes match along every edge; shapes are compatible (-1 matches anything); the
pipeline's ``max_batch_size`` is consistent with its steps' (never more than a step's; 0 when a step does not
batch). Routed pipelines: every stage and fallback model takes the pipeline's inputs and gives its outputs,
and conditions name a pipeline input or output. The models checked against come from ``known.py``
(``ModelInfo`` and ``known_models`` are re-exported here).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence

from tritonforge.config import DataType, TensorSpec
from tritonforge.ensemble._limits import names, show
from tritonforge.ensemble.known import ModelInfo, known_models
from tritonforge.ensemble.spec import Issue, PipelineSpec, StepSpec, _Collector

__all__ = ["ModelInfo", "Resolved", "check_pipeline", "known_models"]


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A checked pipeline: its batch size and fully typed inputs and outputs, ready to compile."""

    spec: PipelineSpec
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def check_pipeline(
    spec: PipelineSpec, models: Mapping[str, ModelInfo]
) -> tuple[Resolved | None, list[Issue]]:
    """Check one parsed spec against the known models; a ``Resolved`` only when there is no issue."""
    checker = _Checker(spec, models)
    existing = models.get(spec.name)
    if existing is not None and not existing.replaceable:
        checker.add(
            f"the repository already has a model '{spec.name}' that is not a pipeline; compiling would "
            "overwrite it.",
            "rename the pipeline.",
        )
    if spec.name in {b.name for b in spec.models}:
        checker.add(f"a building block has the pipeline's own name '{spec.name}'.", "rename one of them.")
    resolved = checker.check_route() if spec.is_routed else checker.check_dag()
    return (resolved if not checker.issues else None), checker.result()


def _full(dims: Sequence[int], batched: bool) -> tuple[int, ...]:
    return ((-1,) if batched else ()) + tuple(dims)


def _compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def _dtype(value: DataType) -> str:
    return value.triton_name


_Producer = tuple[str | None, DataType | None, tuple[int, ...] | None]
"""Who writes a tensor (None: the caller, as a pipeline input), its dtype and full shape (None: unknown)."""


class _Checker(_Collector):
    def __init__(self, spec: PipelineSpec, models: Mapping[str, ModelInfo]) -> None:
        super().__init__(spec.name, spec.source)
        self.spec = spec
        self.models = models

    def model(self, step: str, name: str, version: int = -1) -> ModelInfo | None:
        info = self.models.get(name)
        if info is None:
            self.add(
                f"model '{name}' is not in the repository nor declared under 'models:' (known: "
                f"{names(self.models) if self.models else 'none'}).",
                "build it into the repository first (tritonforge build / add-model), declare it as a "
                "building block, or correct the name.",
                step=step,
            )
            return None
        if version != -1 and info.versions is not None and version not in info.versions:
            self.add(
                f"model '{name}' has no version {version} (it has {names(map(str, info.versions))}).",
                "pin an existing version, or leave 'version' out for the latest.",
                step=step,
            )
        return info

    def batch_size(self, infos: Iterable[tuple[str, ModelInfo]]) -> int:
        infos = list(infos)
        requested = self.spec.max_batch_size
        smallest = min((i.max_batch_size for _, i in infos), default=0)
        if requested is None:
            return smallest
        if requested > 0:
            for step, info in infos:
                if info.max_batch_size == 0:
                    self.add(
                        f"the pipeline batches (max_batch_size {requested}) but model '{info.name}' does "
                        "not (max_batch_size 0).",
                        "set the pipeline's max_batch_size to 0, or serve the model with batching.",
                        step=step,
                    )
                elif requested > info.max_batch_size:
                    self.add(
                        f"the pipeline's max_batch_size {requested} exceeds model '{info.name}''s "
                        f"{info.max_batch_size}; Triton would refuse to load it.",
                        f"lower the pipeline's max_batch_size to {smallest} or less, or raise the model's.",
                        step=step,
                    )
        return requested

    # -- ensembles ---------------------------------------------------------------------------------------

    def check_dag(self) -> Resolved | None:
        spec = self.spec
        infos: dict[str, ModelInfo] = {}
        for step in spec.steps:
            info = self.model(step.name, step.model, step.version)
            if info is not None:
                infos[step.name] = info
        mbs = self.batch_size(infos.items())
        batched = mbs > 0
        producers = self._producers(infos, batched)
        consumed: set[str] = set()
        graph: dict[str, set[str]] = {s.name: set() for s in spec.steps}
        for step in spec.steps:
            info = infos.get(step.name)
            if info is not None:
                self._unfed_inputs(step.name, info, step.inputs, routed=False)
            for model_input, tensor in step.inputs.items():
                consumed.add(tensor)
                self._edge(step, info, model_input, tensor, producers, graph)
        self._cycles(graph)
        self._missing_policies(infos)
        for decl in spec.inputs:
            if decl.name not in consumed:
                self.add(
                    f"pipeline input '{decl.name}' is not read by any step.",
                    "feed it to a step, or remove it from the inputs.",
                    tensor=decl.name,
                )
        outputs = self._dag_outputs(producers, batched)
        output_names = {o.name for o in spec.outputs}
        for step in spec.steps:
            for tensor in step.outputs.values():
                if tensor not in consumed and tensor not in output_names:
                    self.add(
                        f"tensor '{tensor}' is written but never read nor a pipeline output; Triton "
                        "refuses such ensembles.",
                        "drop it from the step's outputs (a model output "
                        "may be left unmapped) or list it under the pipeline's outputs.",
                        step=step.name,
                        tensor=tensor,
                    )
        if self.issues:
            return None
        return Resolved(spec, mbs, _declared_inputs(spec), outputs)

    def _missing_policies(self, infos: Mapping[str, ModelInfo]) -> None:
        """An input declared ``missing: impute`` feeds only impute blocks (so no model sees NaN/inf), is
        FP32/FP64, and an impute block reading a pipeline input has it declared ``impute``."""
        policy = {d.name: d for d in self.spec.inputs}
        for step in self.spec.steps:
            info = infos.get(step.name)
            imputes = info is not None and info.origin == "block:impute"
            for tensor in step.inputs.values():
                decl = policy.get(tensor)
                if decl is None or info is None:
                    continue
                if decl.missing == "impute" and not imputes:
                    self.add(
                        f"pipeline input '{tensor}' is declared missing: impute but model '{info.name}' "
                        "reads it before any imputation, so it would see NaN/inf.",
                        "feed the input to an 'impute' building block and this step the block's OUTPUT, "
                        "or declare missing: allow.",
                        step=step.name,
                        tensor=tensor,
                    )
                elif imputes and decl.missing != "impute":
                    self.add(
                        f"step '{step.name}' imputes pipeline input '{tensor}', which is declared "
                        f"missing: {decl.missing}.",
                        "declare the input with missing: impute.",
                        step=step.name,
                        tensor=tensor,
                    )
        for decl in self.spec.inputs:
            if decl.missing == "impute" and decl.dtype not in (None, DataType.FP32, DataType.FP64):
                self.add(
                    f"only FP32/FP64 values can be missing (NaN/inf); input '{decl.name}' is "
                    f"{_dtype(decl.dtype)}.",
                    "drop 'missing: impute' from it.",
                    tensor=decl.name,
                )

    def _producers(self, infos: Mapping[str, ModelInfo], batched: bool) -> dict[str, _Producer]:
        """Every tensor's one producer (the caller for pipeline inputs); reports unknown and doubled ones."""
        producers: dict[str, _Producer] = {}
        for decl in self.spec.inputs:
            producers[decl.name] = (
                None,
                decl.dtype,
                None if decl.dims is None else _full(decl.dims, batched),
            )
        for step in self.spec.steps:
            info = infos.get(step.name)
            for model_output, tensor in step.outputs.items():
                out = None
                if info is not None:
                    out = info.outputs.get(model_output)
                    if out is None:
                        self.add(
                            f"model '{info.name}' has no output '{model_output}' (it has "
                            f"{names(info.outputs)}).",
                            "map one of the model's outputs.",
                            step=step.name,
                            tensor=model_output,
                        )
                if tensor in producers:
                    self.add(
                        f"tensor '{tensor}' has two producers: {_who(producers[tensor][0])} and step "
                        f"'{step.name}'.",
                        "give each written tensor its own name (rename one side in 'outputs').",
                        step=step.name,
                        tensor=tensor,
                    )
                    continue
                producers[tensor] = (
                    step.name,
                    None if out is None else out.dtype,
                    None if out is None or info is None else _full(out.dims, info.max_batch_size > 0),
                )
        return producers

    def _unfed_inputs(self, step: str, info: ModelInfo, fed: Mapping[str, str], *, routed: bool) -> None:
        for name, tensor_spec in info.inputs.items():
            if name in fed or tensor_spec.optional:
                continue
            if routed:
                self.add(
                    f"required input '{name}' of model '{info.name}' is not fed by any pipeline input.",
                    f"add a pipeline input '{name}', or map it: inputs: {{{name}: <pipeline input>}}.",
                    step=step,
                    tensor=name,
                )
            else:
                self.add(
                    f"required input '{name}' of model '{info.name}' is not fed.",
                    f"map it in the step's inputs: {{{name}: <pipeline tensor>}}.",
                    step=step,
                    tensor=name,
                )

    def _edge(
        self,
        step: StepSpec,
        info: ModelInfo | None,
        model_input: str,
        tensor: str,
        producers: Mapping[str, _Producer],
        graph: dict[str, set[str]],
    ) -> None:
        """One read: the tensor has a producer (an edge of the graph) whose dtype and shape fit the input."""
        target = None if info is None else info.inputs.get(model_input)
        if info is not None and target is None:
            self.add(
                f"model '{info.name}' has no input '{model_input}' (it has {names(info.inputs)}).",
                "map the model's own input names.",
                step=step.name,
                tensor=model_input,
            )
        if tensor not in producers:
            self.add(
                f"tensor '{tensor}' is read but has no producer: no pipeline input or step output "
                f"writes it (written: {names(producers)}).",
                "add it to the pipeline's inputs, or map a step's output to it.",
                step=step.name,
                tensor=tensor,
            )
            return
        who, dtype, shape = producers[tensor]
        if who is not None:
            graph[who].add(step.name)
        if target is None or info is None:
            return
        if dtype is not None and dtype is not target.dtype:
            self.add(
                f"dtype mismatch on tensor '{tensor}': {_who(who)} gives {_dtype(dtype)} but "
                f"model '{info.name}' input '{model_input}' takes {_dtype(target.dtype)}.",
                "make both sides the same type (cast in the producing model, or export the "
                "consumer with the producer's type).",
                step=step.name,
                tensor=tensor,
            )
        want = _full(target.dims, info.max_batch_size > 0)
        if shape is not None and not _compatible(shape, want):
            self.add(
                f"shape mismatch on tensor '{tensor}': {_who(who)} gives {list(shape)} but model "
                f"'{info.name}' input '{model_input}' takes {list(want)} (batch dim shown as -1).",
                "make the dims agree (-1 matches any size).",
                step=step.name,
                tensor=tensor,
            )

    def _dag_outputs(self, producers: Mapping[str, _Producer], batched: bool) -> tuple[TensorSpec, ...]:
        """The pipeline's outputs, typed by their producing steps; reports unwritten or mis-declared ones."""
        outputs: list[TensorSpec] = []
        for decl in self.spec.outputs:
            if decl.name not in producers or producers[decl.name][0] is None:
                self.add(
                    f"pipeline output '{decl.name}' is not written by any step.",
                    "map a step's output to it.",
                    tensor=decl.name,
                )
                continue
            who, dtype, shape = producers[decl.name]
            if decl.dtype is not None and dtype is not None and decl.dtype is not dtype:
                self.add(
                    f"pipeline output '{decl.name}' is declared {_dtype(decl.dtype)} but step '{who}' "
                    f"gives {_dtype(dtype)}.",
                    "correct the declared dtype, or leave it out.",
                    step=who,
                    tensor=decl.name,
                )
            if shape is not None and batched and shape[:1] != (-1,):
                shape = None  # reported by the batch check
            dims = None if shape is None else (shape[1:] if batched else shape)
            if decl.dims is not None and dims is not None and not _compatible(decl.dims, dims):
                self.add(
                    f"pipeline output '{decl.name}' is declared with dims {list(decl.dims)} but step "
                    f"'{who}' gives {list(dims)}.",
                    "correct the declared dims, or leave them out.",
                    step=who,
                    tensor=decl.name,
                )
            if dtype is not None and (dims or decl.dims):
                outputs.append(TensorSpec(name=decl.name, dtype=dtype, dims=decl.dims or dims or ()))
        return tuple(outputs)

    def _cycles(self, graph: Mapping[str, set[str]]) -> None:
        # Iterative depth-first search: a pipeline of a thousand chained steps must not hit the recursion
        # limit. Grey nodes (on the current path) met again close a cycle.
        state: dict[str, int] = {}
        reported: set[frozenset[str]] = set()
        for root in sorted(graph):
            if root in state:
                continue
            path: list[str] = [root]
            stack = [iter(sorted(graph[root]))]
            state[root] = 1
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    state[path.pop()] = 2
                    stack.pop()
                elif state.get(nxt) == 1:
                    cycle = [*path[path.index(nxt) :], nxt]
                    if frozenset(cycle) not in reported:
                        reported.add(frozenset(cycle))
                        self._report_cycle(cycle)
                elif state.get(nxt) is None:
                    state[nxt] = 1
                    path.append(nxt)
                    stack.append(iter(sorted(graph[nxt])))

    def _report_cycle(self, cycle: Sequence[str]) -> None:
        tensors = [self._edge_tensor(a, b) for a, b in itertools.pairwise(cycle)]
        shown = " -> ".join(cycle) if len(cycle) <= 12 else " -> ".join([*cycle[:6], "...", *cycle[-5:]])
        self.add(
            f"steps form a cycle: {shown} (through tensors {names(tensors)}); a pipeline must be a DAG.",
            "break the loop: one of these steps must read a "
            "tensor produced earlier, not one produced downstream.",
            step=cycle[0],
            tensor=tensors[0],
        )

    def _edge_tensor(self, producer: str, consumer: str) -> str:
        written = next(set(s.outputs.values()) for s in self.spec.steps if s.name == producer)
        read = next(s.inputs.values() for s in self.spec.steps if s.name == consumer)
        return next((t for t in read if t in written), "?")

    # -- routed pipelines --------------------------------------------------------------------------------

    def check_route(self) -> Resolved | None:
        spec = self.spec
        output_decls = {d.name: d for d in spec.outputs}
        if spec.route_output in {d.name for d in spec.inputs} or spec.route_output in output_decls:
            self.add(
                f"'route_output' {show(spec.route_output)} clashes with a pipeline tensor.",
                "pick another route_output name.",
                tensor=spec.route_output,
            )
        for decl in spec.inputs:
            if decl.missing == "impute":
                self.add(
                    f"a routed pipeline can't impute input '{decl.name}' (only an ensemble has steps).",
                    "impute in an ensemble pipeline and route to it, or declare missing: allow / reject.",
                    tensor=decl.name,
                )
        used = self._route_models()
        mbs = self.batch_size((stage, info) for stage, info, _, _ in used)
        batched = mbs > 0
        produced: dict[str, TensorSpec] = {}
        for stage, info, input_map, output_map in used:
            self._unfed_inputs(stage, info, input_map, routed=True)
            self._route_inputs(stage, info, input_map, batched)
            self._route_outputs(stage, info, output_map, produced, batched)
        if self.issues:
            return None
        outputs = tuple(
            TensorSpec(
                name=d.name, dtype=d.dtype or produced[d.name].dtype, dims=d.dims or produced[d.name].dims
            )
            for d in spec.outputs
        )
        return Resolved(spec, mbs, _declared_inputs(spec), outputs)

    def _route_models(self) -> list[tuple[str, ModelInfo, dict[str, str], dict[str, str]]]:
        """Each stage's model and fallbacks with their input and output maps; checks the conditions."""
        spec = self.spec
        input_names = {d.name for d in spec.inputs}
        output_names = {d.name for d in spec.outputs}
        used: list[tuple[str, ModelInfo, dict[str, str], dict[str, str]]] = []
        for index, stage in enumerate(spec.route):
            for name in (stage.model, *stage.fallback):
                info = self.model(stage.model, name, stage.version if name == stage.model else -1)
                if info is None:
                    continue
                inputs = (
                    dict(stage.inputs)
                    if stage.inputs is not None
                    else {n: n for n in info.inputs if n in input_names}
                )
                outputs = (
                    dict(stage.outputs)
                    if stage.outputs is not None
                    else {n: n for n in info.outputs if n in output_names}
                )
                used.append((stage.model, info, inputs, outputs))
            if stage.when is None:
                continue
            tensor = stage.when.tensor
            if tensor not in input_names and tensor not in output_names:
                self.add(
                    f"the condition reads '{tensor}', which is neither a pipeline input nor output.",
                    "test a pipeline input, or an output an earlier stage gives.",
                    step=stage.model,
                    tensor=tensor,
                )
            elif tensor in output_names and index == 0:
                self.add(
                    f"the first stage's condition reads output '{tensor}', which no earlier stage "
                    "has produced.",
                    "test a pipeline input, or move the condition to a later stage.",
                    step=stage.model,
                    tensor=tensor,
                )
        return used

    def _route_inputs(self, stage: str, info: ModelInfo, inputs: Mapping[str, str], batched: bool) -> None:
        """A stage model's inputs are pipeline inputs of the same dtype and a compatible shape."""
        for model_input, tensor in inputs.items():
            decl = next((d for d in self.spec.inputs if d.name == tensor), None)
            target = info.inputs.get(model_input)
            if decl is None or target is None:
                self.add(
                    f"input map {show(model_input)}: {show(tensor)} of model '{info.name}' names an unknown "
                    f"{'pipeline input' if decl is None else 'model input'}.",
                    "map model inputs to pipeline inputs.",
                    step=stage,
                    tensor=tensor,
                )
                continue
            if decl.dtype is not None and decl.dtype is not target.dtype:
                self.add(
                    f"dtype mismatch on tensor '{tensor}': the pipeline gives {_dtype(decl.dtype)} but "
                    f"model '{info.name}' input '{model_input}' takes {_dtype(target.dtype)}.",
                    "declare the pipeline input with the model's dtype.",
                    step=stage,
                    tensor=tensor,
                )
            if decl.dims is not None and not _compatible(
                _full(decl.dims, batched), _full(target.dims, info.max_batch_size > 0)
            ):
                self.add(
                    f"shape mismatch on tensor '{tensor}': pipeline input dims {list(decl.dims)} vs "
                    f"model '{info.name}' input '{model_input}' dims {list(target.dims)}.",
                    "make the dims agree (-1 matches any size).",
                    step=stage,
                    tensor=tensor,
                )

    def _route_outputs(
        self,
        stage: str,
        info: ModelInfo,
        outputs: Mapping[str, str],
        produced: dict[str, TensorSpec],
        batched: bool,
    ) -> None:
        """A stage model gives every pipeline output, agreeing in dtype and shape with the other stages."""
        output_decls = {d.name: d for d in self.spec.outputs}
        for name in output_decls:
            if name not in outputs.values():
                self.add(
                    f"model '{info.name}' gives no output mapped to pipeline output '{name}' (it has "
                    f"{names(info.outputs)}); every stage and fallback must give every output.",
                    "map one with outputs: {<model output>: " + name + "}.",
                    step=stage,
                    tensor=name,
                )
        for model_output, tensor in outputs.items():
            out = info.outputs.get(model_output)
            if out is None:
                self.add(
                    f"model '{info.name}' has no output '{model_output}'.",
                    f"map one of {names(info.outputs)}.",
                    step=stage,
                    tensor=model_output,
                )
                continue
            dims = out.dims if (info.max_batch_size > 0) == batched else None
            decl_out = output_decls.get(tensor)
            first = produced.setdefault(tensor, TensorSpec(name=tensor, dtype=out.dtype, dims=dims or [-1]))
            declared = decl_out.dtype if decl_out is not None else None
            if first.dtype is not out.dtype or (declared is not None and declared is not out.dtype):
                self.add(
                    f"dtype mismatch on output '{tensor}': model '{info.name}' gives {_dtype(out.dtype)}, "
                    f"another stage or the declaration says {_dtype(first.dtype)}.",
                    "make every stage's output the same type.",
                    step=stage,
                    tensor=tensor,
                )
            if dims is not None and not _compatible(first.dims, dims):
                self.add(
                    f"shape mismatch on output '{tensor}': model '{info.name}' gives {list(dims)}, "
                    f"another stage {list(first.dims)}.",
                    "make the stages' outputs agree.",
                    step=stage,
                    tensor=tensor,
                )


def _who(step: str | None) -> str:
    return "the pipeline input" if step is None else f"step '{step}'"


def _declared_inputs(spec: PipelineSpec) -> tuple[TensorSpec, ...]:
    """The pipeline's own inputs as tensors (those whose dtype and dims the spec declares)."""
    return tuple(
        TensorSpec(name=d.name, dtype=d.dtype, dims=d.dims, optional=d.optional)
        for d in spec.inputs
        if d.dtype is not None and d.dims is not None
    )
