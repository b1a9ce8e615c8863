"""The tuner's pure part: the knobs of a config, the grid they span, trials and the coordinate search.

No I/O here: :mod:`tritonforge.loadtest.tune` measures configs on a server and drives this search;
:mod:`tritonforge.loadtest.tune_output` writes what it found.

The space is a grid of knobs per tunable model: max batch size, preferred batch sizes, max queue delay,
instance count, and for the models our backends thread (onnxruntime, libtorch) intra-op threads per
instance. Instances and threads are one group, and a candidate never asks for more threads in all than
the CPUs the server may use (``instances x threads <= cpus``: the layouts of
:func:`tritonforge.repository.layout.candidate_layouts` and the leaner ones between); only the config as
served, the start, may break that.

The search is a coordinate search from the config as served: measure it, then take one group of knobs at
a time and try its every setting with the other knobs held, moving to the best; rounds repeat until a
whole round changes nothing, or the trial budget (default: a third of the grid) is spent. Max batch size
and queue delay are one group, because they interact (a queue delay pays only when batches can fill up to
the max batch size before it expires); so are instances and intra-op threads (they share the cores);
preferred sizes go alone. So the search finds the grid's best, or a config close to it, in a fraction of
the trials (see ``tests/test_tune.py``).

A config scores by its best throughput among sweep levels whose p99 meets the budget; a config that meets
it nowhere ranks below every one that does, by its lowest p99 (so "the closest" can be shown).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from tritonforge.config import DynamicBatching, InstanceGroup, ModelConfig
from tritonforge.loadtest.sweep import SweepResult
from tritonforge.repository.threads import onnxruntime_thread_parameters, pytorch_thread_parameters

__all__ = [
    "KNOBS",
    "PREFERRED_KINDS",
    "REFINE_TOP",
    "THREAD_PARAMETERS",
    "Point",
    "SearchSpace",
    "Trial",
    "TuneResult",
    "apply_knobs",
    "coordinate_search",
    "knobs_of",
    "refine_leaders",
    "thread_parameter",
]

KNOBS = ("instances", "intra_op_threads", "max_batch_size", "max_queue_delay_us", "preferred")
#: the config parameter that sets intra-op threads, per platform / backend our backends thread
THREAD_PARAMETERS = {
    "onnxruntime_onnx": "intra_op_thread_count",
    "onnxruntime": "intra_op_thread_count",
    "pytorch_libtorch": "INTRA_OP_THREAD_COUNT",
    "pytorch": "INTRA_OP_THREAD_COUNT",
}
Point = tuple[int, ...]
#: the kinds of preferred batch sizes a search tries (see :class:`SearchSpace`)
PREFERRED_KINDS = ("none", "max", "half")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """The values each knob may take (per tunable model). ``preferred``: "none" (no preferred sizes, the
    batcher forms the largest batch it can), "max" ([max batch size]) or "half" ([max/2, max])."""

    max_batch_size: Sequence[int] = (8, 16, 32, 64)
    max_queue_delay_us: Sequence[int] = (0, 200, 1000, 5000)
    instances: Sequence[int] = (1, 2)
    preferred: Sequence[str] = ("none", "max")
    #: intra-op threads per instance (threaded models only); None: those of the candidate layouts of the
    #: server's CPUs (one, all, and half of them from 4 CPUs)
    intra_op_threads: Sequence[int] | None = None

    def __post_init__(self) -> None:
        threads = self.intra_op_threads
        bad = [t for t in threads or () if isinstance(t, bool) or not isinstance(t, int) or t < 1]
        if bad:
            raise ValueError(f"intra-op threads must be positive integers, got {list(threads or ())}")

    def values(self, knob: str) -> tuple[Any, ...]:
        return tuple(getattr(self, knob))


def thread_parameter(config: ModelConfig) -> str | None:
    """The parameter naming ``config``'s intra-op threads, or None when our backends don't thread it."""
    return THREAD_PARAMETERS.get(config.platform or config.backend or "")


def knobs_of(config: ModelConfig) -> dict[str, Any]:
    """The knob values of ``config`` as served (``preferred`` named when it is one of the kinds;
    ``intra_op_threads`` only for a threaded model, 0 when the config leaves it to the backend)."""
    batching = config.dynamic_batching
    preferred = tuple(batching.preferred_batch_sizes) if batching else ()
    mbs = config.max_batch_size
    kind = "none"
    if preferred == (mbs,):
        kind = "max"
    elif preferred == (mbs // 2, mbs):
        kind = "half"
    elif preferred:
        kind = ",".join(map(str, preferred))
    knobs: dict[str, Any] = {
        "instances": sum(g.count for g in config.instance_groups) or 1,
        "max_batch_size": mbs,
        "max_queue_delay_us": batching.max_queue_delay_us if batching else 0,
        "preferred": kind,
    }
    key = thread_parameter(config)
    if key is not None:
        value = str(config.parameters.get(key, "0"))
        knobs["intra_op_threads"] = int(value) if value.isdigit() else 0
    return knobs


def apply_knobs(config: ModelConfig, knobs: Mapping[str, Any]) -> ModelConfig:
    """``config`` with the knobs set (the inverse of :func:`knobs_of`)."""
    mbs = int(knobs["max_batch_size"])
    kind = knobs["preferred"]
    preferred: tuple[int, ...]
    if kind == "none":
        preferred = ()
    elif kind == "max":
        preferred = (mbs,)
    elif kind == "half":
        preferred = tuple(sorted({max(1, mbs // 2), mbs}))
    else:
        preferred = tuple(int(v) for v in str(kind).split(",") if int(v) <= mbs)
    batching = config.dynamic_batching or DynamicBatching()
    batching = dataclasses.replace(
        batching, preferred_batch_sizes=preferred, max_queue_delay_us=int(knobs["max_queue_delay_us"])
    )
    group = config.instance_groups[0] if config.instance_groups else InstanceGroup()
    groups = (dataclasses.replace(group, count=int(knobs["instances"])),)
    parameters = dict(config.parameters)
    key = thread_parameter(config)
    threads = int(knobs.get("intra_op_threads") or 0)
    if key is not None and threads > 0:
        if key not in parameters:  # name every pool (and spinning off), not only this one
            parameters.update(
                onnxruntime_thread_parameters(threads)
                if key == THREAD_PARAMETERS["onnxruntime_onnx"]
                else pytorch_thread_parameters(threads)
            )
        parameters[key] = str(threads)
    return config.replace(
        max_batch_size=mbs, dynamic_batching=batching, instance_groups=groups, parameters=parameters
    )


@dataclasses.dataclass
class Trial:
    """One config tried: its knobs per model, its sweep, and how it scored against the budget."""

    index: int
    label: str
    knobs: dict[str, dict[str, Any]]
    sweep: SweepResult | None
    budget_ms: float
    error: str | None = None
    #: throughputs of later re-measurements of the same config (0.0 when one missed the budget)
    repeats: list[float] = dataclasses.field(default_factory=list)

    @property
    def feasible_levels(self) -> list[Any]:
        if self.sweep is None:
            return []
        return [lv for lv in self.sweep.levels if lv.errors == 0 and lv.p99_ms <= self.budget_ms]

    @property
    def single_rps(self) -> float | None:
        """Best throughput among the first sweep's levels within the budget (None: no level met it)."""
        levels = self.feasible_levels
        return max(lv.throughput_rps for lv in levels) if levels else None

    @property
    def throughput_rps(self) -> float | None:
        """The first sweep's figure, or with re-measurements the median of them all (None: over budget)."""
        single = self.single_rps
        if single is None or not self.repeats:
            return single
        return statistics.median([single, *self.repeats])

    @property
    def best_level(self) -> Any:
        levels = self.feasible_levels
        return max(levels, key=lambda lv: lv.throughput_rps) if levels else None

    @property
    def min_p99_ms(self) -> float:
        if self.sweep is None or not self.sweep.levels:
            return math.inf
        return min(lv.p99_ms for lv in self.sweep.levels)

    def score(self) -> tuple[int, float]:
        if self.throughput_rps is not None:
            return (1, self.throughput_rps)
        return (0, -self.min_p99_ms)

    def summary(self) -> dict[str, Any]:
        best = self.best_level
        return {
            "index": self.index,
            "config": self.label,
            "knobs": self.knobs,
            "throughput_rps": self.throughput_rps,
            "first_sweep_rps": self.single_rps,
            "remeasured_rps": list(self.repeats),
            "at_level": None if best is None else best.level,
            "p99_ms_at_best": None if best is None else best.p99_ms,
            "min_p99_ms": None if not math.isfinite(self.min_p99_ms) else self.min_p99_ms,
            "meets_budget": self.throughput_rps is not None,
            "error": self.error,
        }


@dataclasses.dataclass
class TuneResult:
    model: str
    tuned_models: tuple[str, ...]
    budget_ms: float
    trials: list[Trial]
    space_size: int
    strategy: str
    default: Trial | None
    winner: Trial | None
    written: list[str] = dataclasses.field(default_factory=list)
    winner_configs: dict[str, ModelConfig] = dataclasses.field(default_factory=dict)
    stopped_at: str | None = None
    #: the CPUs the server could use (instances x intra-op threads stayed within them)
    cpus: int | None = None
    #: what each config was measured on, in words (the model swept, levels, window)
    workload: str = ""

    @property
    def tried(self) -> int:
        return len(self.trials)

    @property
    def fraction_tried(self) -> float:
        return self.tried / self.space_size if self.space_size else 0.0

    @property
    def closest(self) -> Trial | None:
        """With no winner: the trial whose p99 came nearest the budget."""
        usable = [t for t in self.trials if math.isfinite(t.min_p99_ms)]
        return min(usable, key=lambda t: t.min_p99_ms) if usable else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tuned_models": list(self.tuned_models),
            "p99_budget_ms": self.budget_ms,
            "strategy": self.strategy,
            "space_size": self.space_size,
            "tried": self.tried,
            "fraction_tried": round(self.fraction_tried, 4),
            "default": None if self.default is None else self.default.summary(),
            "winner": None if self.winner is None else self.winner.summary(),
            "closest": None if self.winner is not None or self.closest is None else self.closest.summary(),
            "written": self.written,
            "stopped_at": self.stopped_at,
            "cpus": self.cpus,
            "workload": self.workload,
            "trials": [t.summary() for t in self.trials],
        }


REFINE_TOP = 2  # how many leading configs are re-measured at each look


def refine_leaders(
    trials: Mapping[Point, Trial],
    points: Iterable[Point],
    refine: Callable[[Point], None],
    refined: set[Point],
    top: int = REFINE_TOP,
) -> None:
    """Re-measure the ``top`` best of ``points`` that meet the budget and are not in ``refined`` yet
    (they are added to it)."""
    ranked = sorted(points, key=lambda p: trials[p].score(), reverse=True)
    for point in ranked[:top]:
        if point not in refined and trials[point].throughput_rps is not None:
            refined.add(point)
            refine(point)


def coordinate_search(
    dims: Sequence[int],
    start: Point,
    evaluate: Callable[[Point], Trial],
    *,
    max_trials: int,
    groups: Sequence[Sequence[int]] | None = None,
    refine: Callable[[Point], None] | None = None,
    refine_top: int = REFINE_TOP,
    allowed: Callable[[Point], bool] | None = None,
) -> list[Point]:
    """Coordinate search over a grid of ``dims`` (values per dimension), from ``start``.

    One group of dimensions at a time (``groups``; default: each dimension alone), every combination of
    that group's values is tried with the other dimensions held where they are, and the search moves to the
    best; rounds over all groups repeat until one changes nothing, or ``max_trials`` points have been
    evaluated. Dimensions that interact belong in one group. Nearest values are tried first, so a budget
    that runs out mid-group leaves the far ones.

    With ``refine`` (re-measure a point: its trial's figure becomes the median of its measurements), the
    ``refine_top`` best points of each group are re-measured before the search moves on, and the best
    ``refine_top`` overall at the end: a single noisy measurement then can't send the search the wrong way,
    or crown a config that was only lucky once. Each point is refined at most once; refining never counts
    against ``max_trials`` (it measures configs already tried). With ``allowed``, points it rejects are
    never tried (``start`` always is).

    Returns the points evaluated, in order. ``evaluate`` is called once per point.
    """
    tried: dict[Point, Trial] = {}
    refined: set[Point] = set()
    blocks = [tuple(g) for g in groups] if groups is not None else [(d,) for d in range(len(dims))]

    def visit(point: Point) -> Trial | None:
        if point not in tried:
            if len(tried) >= max_trials:
                return None
            tried[point] = evaluate(point)
        return tried[point]

    def confirm(points: Iterable[Point]) -> None:
        if refine is not None:
            refine_leaders(tried, points, refine, refined, refine_top)

    def leader() -> Point:
        return max(tried, key=lambda p: tried[p].score())

    current = start
    best = visit(current)
    assert best is not None
    changed = True
    while changed:
        changed = False
        for block in blocks:
            base = current  # the plane through `current` along this block's dimensions
            combos = itertools.product(*(range(dims[d]) for d in block))
            for values in sorted(
                combos, key=lambda vs: (sum(abs(v - base[d]) for v, d in zip(vs, block, strict=True)), vs)
            ):
                candidate = list(base)
                for d, v in zip(block, values, strict=True):
                    candidate[d] = v
                if allowed is not None and tuple(candidate) != start and not allowed(tuple(candidate)):
                    continue
                trial = visit(tuple(candidate))
                if trial is None:
                    confirm(tried)
                    return list(tried)
                if trial.score() > best.score():
                    best, current, changed = trial, tuple(candidate), True
            if refine is not None:
                others = [d for d in range(len(dims)) if d not in block]
                confirm(p for p in tried if all(p[d] == base[d] for d in others))
                top = leader()
                if top != current:
                    best, current, changed = tried[top], top, True
    confirm(tried)
    return list(tried)
