"""A pipeline spec as frozen objects: the pipeline, its steps or route stages, tensors, blocks and issues.

``spec.py`` reads ``ensembles/*.yaml`` into these (and re-exports them); ``check.py`` checks them against the
repository and ``compile.py`` writes them out. ``Issue`` is how every one of them reports a problem.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tritonforge.config import DataType

__all__ = [
    "COMPARISONS",
    "MISSING_POLICIES",
    "REDUCERS",
    "BlockModelSpec",
    "Condition",
    "Issue",
    "PipelineSpec",
    "RouteStage",
    "StepSpec",
    "TensorDecl",
]

REDUCERS = ("max", "min", "mean")
MISSING_POLICIES = ("reject", "allow", "impute")
"""What a pipeline input may hold of NaN / ±inf: ``reject`` (the default: callers must send finite
values; tritonforge's client refuses others), ``allow`` (the models take them as they are), ``impute``
(every step reading the input is an ``impute`` building block, so the models never see them)."""
COMPARISONS = ("below", "above", "equals", "not_equals")


@dataclasses.dataclass(frozen=True)
class Issue:
    """One thing wrong with a pipeline: where (pipeline, step, tensor), what, and how to fix it."""

    pipeline: str
    message: str
    fix: str = ""
    step: str | None = None
    tensor: str | None = None
    source: str | None = None

    def __str__(self) -> str:
        where = [f"pipeline '{self.pipeline}'"]
        if self.step:
            where.append(f"step '{self.step}'")
        if self.tensor:
            where.append(f"tensor '{self.tensor}'")
        text = ", ".join(where) + f": {self.message}"
        if self.fix:
            text += f" Fix: {self.fix}"
        if self.source:
            text = f"{self.source}: {text}"
        return text


@dataclasses.dataclass(frozen=True)
class TensorDecl:
    """A pipeline input or output; ``dtype`` / ``dims`` None means "take them from the step"."""

    name: str
    dtype: DataType | None = None
    dims: tuple[int, ...] | None = None
    optional: bool = False
    missing: str = "reject"


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One model in a DAG pipeline and how its tensors map to the pipeline's."""

    name: str
    model: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]
    version: int = -1


@dataclasses.dataclass(frozen=True)
class BlockModelSpec:
    """A building-block model (tokenizer, pooling, combiner, impute) the pipeline adds to the repository."""

    name: str
    block: str
    options: Mapping[str, Any]
    max_batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class Condition:
    """``reduce(tensor) <comparison> value``, evaluated per batch row (over the non-batch dims)."""

    tensor: str
    comparison: str
    value: float
    reduce: str = "max"

    def describe(self) -> str:
        return f"{self.reduce}({self.tensor}) {self.comparison} {self.value:g}"


@dataclasses.dataclass(frozen=True)
class RouteStage:
    """One stage of a routed pipeline: a model, its fallbacks, its timeout, and when it runs."""

    model: str
    fallback: tuple[str, ...] = ()
    version: int = -1
    timeout_ms: float | None = None
    when: Condition | None = None
    inputs: Mapping[str, str] | None = None
    outputs: Mapping[str, str] | None = None

    @property
    def name(self) -> str:
        return self.model


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """A parsed pipeline spec (see :mod:`tritonforge.ensemble.spec` for the YAML)."""

    name: str
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    steps: tuple[StepSpec, ...] = ()
    route: tuple[RouteStage, ...] = ()
    models: tuple[BlockModelSpec, ...] = ()
    max_batch_size: int | None = None
    version: int = 1
    dynamic_batching: bool = True
    instances: int = 1
    route_output: str = "ROUTE"
    source: str | None = None

    @property
    def is_routed(self) -> bool:
        return bool(self.route)
