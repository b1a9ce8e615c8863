"""A config tuner like Model Analyzer's: try configs by reloading the model, sweep each, keep the fastest
within a p99 budget — and it works on ensembles, by tuning their composing models under the ensemble's
end-to-end load.

The space is a grid of knobs per tunable model: max batch size, preferred batch sizes, max queue delay,
instance count. The search is a coordinate search from the config as served: measure it, then take
one group of knobs at a time and try its every setting with the other knobs held, moving to the best;
rounds repeat until a whole round changes nothing, or the trial budget (default: a third of the grid) is
spent. Max batch size and queue delay are one group, because they interact (a queue delay pays only when
batches can fill up to the max batch size before it expires); instance count and preferred sizes go one
at a time. So the search finds the grid's best, or a config close to it, in a fraction of the trials
(see ``tests/test_tune.py``).

A config scores by its best throughput among sweep levels whose p99 meets the budget; a config that meets
it nowhere ranks below every one that does, by its lowest p99 (so "the closest" can be shown).

Example:
    >>> server = EmbeddedServer(repo, model_control="explicit", load_models=["digits_mlp"])  # doctest: +SKIP
    >>> with server:  # doctest: +SKIP
    ...     result = Tuner(server, repo, "digits_mlp", p99_budget_ms=20).run()
    ...     print(result.winner.label, result.tried, "of", result.space_size)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tritonforge.config import DynamicBatching, InstanceGroup, ModelConfig, read_config, write_config
from tritonforge.errors import ModelNotFoundError, ServerGone, TritonForgeError
from tritonforge.loadtest.sweep import Event, SweepResult, SweepSettings, run_sweep
from tritonforge.loadtest.target import open_target

__all__ = ["KNOBS", "SearchSpace", "Trial", "TuneResult", "Tuner", "coordinate_search"]

KNOBS = ("instances", "max_batch_size", "max_queue_delay_us", "preferred")
Point = tuple[int, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """The values each knob may take (per tunable model). ``preferred``: "none" (no preferred sizes, the
    batcher forms the largest batch it can), "max" ([max batch size]) or "half" ([max/2, max])."""

    max_batch_size: Sequence[int] = (8, 16, 32, 64)
    max_queue_delay_us: Sequence[int] = (0, 200, 1000, 5000)
    instances: Sequence[int] = (1, 2)
    preferred: Sequence[str] = ("none", "max")

    def values(self, knob: str) -> tuple[Any, ...]:
        return tuple(getattr(self, knob))


def _knobs_of(config: ModelConfig) -> dict[str, Any]:
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
    return {
        "instances": sum(g.count for g in config.instance_groups) or 1,
        "max_batch_size": mbs,
        "max_queue_delay_us": batching.max_queue_delay_us if batching else 0,
        "preferred": kind,
    }


def _apply_knobs(config: ModelConfig, knobs: Mapping[str, Any]) -> ModelConfig:
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
    return config.replace(max_batch_size=mbs, dynamic_batching=batching, instance_groups=groups)


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
    against ``max_trials`` (it measures configs already tried).

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


def tunable_models(repository: Path, model: str) -> tuple[list[str], dict[str, ModelConfig]]:
    """The models to tune for ``model`` (itself, or the non-ensemble models its ensemble runs) and the
    config of every model involved, read from the repository.

    Raises:
        ModelNotFoundError: a model is not in the repository.
    """
    configs: dict[str, ModelConfig] = {}
    order: list[str] = []
    pending = [model]
    while pending:
        name = pending.pop(0)
        if name in configs:
            continue
        path = repository / name / "config.pbtxt"
        if not path.is_file():
            there = (
                sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
                if repository.is_dir()
                else []
            )
            raise ModelNotFoundError(
                f"model '{name}' is not in {repository}; it has: {', '.join(there) or 'none'}", model=name
            )
        config = read_config(path)
        configs[name] = config
        if config.is_ensemble:
            pending.extend(step.model_name for step in config.ensemble_steps or ())
        elif config.max_batch_size > 0:
            order.append(name)
    return order, configs


class Tuner:
    """Tune ``model`` on ``server`` (an :class:`~tritonforge.server.EmbeddedServer` with explicit model
    control, the model loaded) whose repository is ``repository``.

    ``refine``: how many times the leading configs are re-measured (each group's best two as the search
    goes, the best two overall at the end, exhaustive runs included); their figure is then the median of
    their sweeps (with 2, one lucky or unlucky sweep out of three can't decide). 0 trusts every first
    sweep.

    Raises (from :meth:`run`):
        ModelNotFoundError: the model is not in the repository.
        TritonForgeError: the model has nothing to tune (no batching model in it).
    """

    def __init__(
        self,
        server: Any,
        repository: str | os.PathLike[str],
        model: str,
        *,
        p99_budget_ms: float,
        space: SearchSpace | None = None,
        settings: SweepSettings | None = None,
        max_trials: int | None = None,
        exhaustive: bool = False,
        refine: int = 2,
        on_event: Event | None = None,
        on_trial: Callable[[Trial], None] | None = None,
    ) -> None:
        self.server = server
        self.repository = Path(repository)
        self.model = model
        self.budget_ms = p99_budget_ms
        self.space = space or SearchSpace()
        self.settings = settings or SweepSettings(concurrency=(1, 4, 16), window_s=1.0)
        self.exhaustive = exhaustive
        if refine < 0:
            raise ValueError(f"refine must be >= 0, not {refine}")
        self.refine = refine
        self.on_event = on_event
        self.on_trial = on_trial
        self.tuned, self.configs = tunable_models(self.repository, model)
        if not self.tuned:
            raise TritonForgeError(
                f"model '{model}' has nothing to tune: no batching model in it", model=model
            )
        self.dims: list[tuple[str, str, tuple[Any, ...]]] = []  # (model, knob, values)
        floor = self.configs[model].max_batch_size if self.configs[model].is_ensemble else 1
        for name in self.tuned:
            current = _knobs_of(self.configs[name])
            for knob in KNOBS:
                values = list(self.space.values(knob))
                if knob == "max_batch_size":
                    values = [v for v in values if v >= floor]
                if current[knob] not in values:
                    values.append(current[knob])
                if knob != "preferred":
                    values.sort()
                self.dims.append((name, knob, tuple(values)))
        self.space_size = math.prod(len(v) for _, _, v in self.dims)
        self.max_trials = max_trials or max(1, math.ceil(self.space_size / 3))
        self.loaded = {name: self.configs[name] for name in self.tuned}
        self.trials: list[Trial] = []
        self._by_point: dict[Point, Trial] = {}
        self.stopped_at: str | None = None

    # -- points <-> configs ------------------------------------------------------------------------------

    @property
    def default_point(self) -> Point:
        point = []
        for name, knob, values in self.dims:
            point.append(values.index(_knobs_of(self.configs[name])[knob]))
        return tuple(point)

    def knobs_at(self, point: Point) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {name: {} for name in self.tuned}
        for (name, knob, values), i in zip(self.dims, point, strict=True):
            out[name][knob] = values[i]
        return out

    def configs_at(self, point: Point) -> dict[str, ModelConfig]:
        return {name: _apply_knobs(self.configs[name], knobs) for name, knobs in self.knobs_at(point).items()}

    def label(self, point: Point) -> str:
        def one(k: Mapping[str, Any]) -> str:
            return (
                f"mbs={k['max_batch_size']} pref={k['preferred']} delay={k['max_queue_delay_us']}us "
                f"inst={k['instances']}"
            )

        knobs = self.knobs_at(point)
        if len(knobs) == 1 and self.tuned == [self.model]:
            return one(knobs[self.model])
        return " | ".join(f"{name}: {one(k)}" for name, k in knobs.items())

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """The dimensions searched together, per tuned model: (max batch size, queue delay), then
        instances, then preferred sizes."""
        out: list[tuple[int, ...]] = []
        for name in self.tuned:
            index = {knob: i for i, (m, knob, _) in enumerate(self.dims) if m == name}
            out += [
                (index["max_batch_size"], index["max_queue_delay_us"]),
                (index["instances"],),
                (index["preferred"],),
            ]
        return out

    def replay_search(self, max_trials: int | None = None) -> list[Point]:
        """The points the search would try, and in what order, over the configs measured so far (run
        after an exhaustive run, it shows the search's choices on the very same measurements)."""
        return self._search(self._by_point.__getitem__, max_trials or self.max_trials)

    def _search(
        self,
        evaluate: Callable[[Point], Trial],
        max_trials: int,
        refine: Callable[[Point], None] | None = None,
    ) -> list[Point]:
        return coordinate_search(
            [len(v) for _, _, v in self.dims],
            self.default_point,
            evaluate,
            max_trials=max_trials,
            groups=self.groups,
            refine=refine,
        )

    @property
    def trials_by_point(self) -> dict[Point, Trial]:
        """Every config tried so far, by its grid point (to replay a search over measured configs)."""
        return dict(self._by_point)

    # -- running -----------------------------------------------------------------------------------------

    def _load(self, configs: Mapping[str, ModelConfig]) -> None:
        for name, config in configs.items():
            if self.loaded.get(name) != config or not self.server.is_model_ready(name):
                self.server.load_model(name, config=config)
                self.loaded[name] = config
        if self.configs[self.model].is_ensemble and not self.server.is_model_ready(self.model):
            self.server.load_model(self.model)

    def evaluate(self, point: Point) -> Trial:
        """Load the configs at ``point`` and sweep them (memoised)."""
        if point in self._by_point:
            return self._by_point[point]
        index = len(self.trials) + 1
        label = self.label(point)
        if self.on_event:
            self.on_event(
                "config",
                {
                    "index": index,
                    "budget": self.max_trials if not self.exhaustive else self.space_size,
                    "label": label,
                },
            )
        trial = self.measure(point, index=index)
        self.trials.append(trial)
        self._by_point[point] = trial
        if self.on_trial:
            self.on_trial(trial)
        if self._server_died(trial):
            why = trial.error or (trial.sweep.stopped_at if trial.sweep else None) or "no reason given"
            self.stopped_at = f"config {index} ({label}): the server stopped ({why})"
            raise ServerGone(self.stopped_at)
        return trial

    def refine_point(self, point: Point) -> None:
        """Re-measure the config at ``point`` ``refine`` times; its trial's figure becomes the median."""
        trial = self._by_point[point]
        for _ in range(self.refine):
            if self.on_event:
                self.on_event("refine", {"index": trial.index, "label": trial.label})
            again = self.measure(point, index=trial.index)
            if self._server_died(again):
                why = again.error or (again.sweep.stopped_at if again.sweep else None) or "no reason given"
                self.stopped_at = (
                    f"re-measuring config {trial.index} ({trial.label}): the server stopped ({why})"
                )
                raise ServerGone(self.stopped_at)
            trial.repeats.append(again.single_rps or 0.0)

    def _server_died(self, trial: Trial) -> bool:
        failed = trial.error is not None or (trial.sweep is not None and trial.sweep.stopped_at is not None)
        # a killed server resets connections a moment before its process is gone: give it that moment
        deadline = time.monotonic() + (3.0 if failed else 0.0)
        while self.server.is_running:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def measure(self, point: Point, *, index: int = 0) -> Trial:
        """Load the configs at ``point`` and sweep them, every time (not recorded as a trial; the server
        keeps these configs until the next load)."""
        label = self.label(point)
        trial = Trial(
            index=index, label=label, knobs=self.knobs_at(point), sweep=None, budget_ms=self.budget_ms
        )
        try:
            self._load(self.configs_at(point))
            trial.sweep = asyncio.run(self._sweep(label))
        except TritonForgeError as exc:
            trial.error = exc.message
        return trial

    async def _sweep(self, label: str) -> SweepResult:
        levels = list(self.settings.levels)
        result: SweepResult | None = None
        async with open_target(self.server.grpc_url, self.model) as target:
            # Levels go up; once a level misses the budget the higher ones only queue more: stop there.
            for i, level in enumerate(levels):
                settings = (
                    dataclasses.replace(self.settings, concurrency=(int(level),))
                    if self.settings.concurrency
                    else dataclasses.replace(self.settings, request_rates=(level,))
                )
                part = await run_sweep(
                    target.send,
                    settings,
                    model=self.model,
                    stats=target.stats,
                    on_event=self.on_event,
                    label=label,
                )
                if result is None:
                    result = part
                    result.settings = dataclasses.asdict(self.settings)
                else:
                    result.levels.extend(part.levels)
                    result.stopped_at = part.stopped_at
                last = part.levels[-1] if part.levels else None
                if part.stopped_at or last is None or last.p99_ms > self.budget_ms or last.errors:
                    if i + 1 < len(levels) and not part.stopped_at:
                        result.settings["skipped_levels"] = levels[i + 1 :]
                    break
        assert result is not None
        return result

    def points(self) -> Iterable[Point]:
        return itertools.product(*(range(len(v)) for _, _, v in self.dims))

    def run(self) -> TuneResult:
        """Search (or, with ``exhaustive``, try every config), then restore the configs as served."""
        try:
            refine = self.refine_point if self.refine else None
            if self.exhaustive:
                self.evaluate(self.default_point)
                for point in self.points():
                    self.evaluate(point)
                if refine is not None:  # the same last look at the leaders as the search gives its own
                    refine_leaders(self._by_point, list(self._by_point), refine, set())
                strategy = "exhaustive"
            else:
                self._search(self.evaluate, self.max_trials, refine)
                strategy = f"coordinate search (budget {self.max_trials} of {self.space_size})"
        except ServerGone:
            strategy = "stopped early: the server stopped"
        finally:
            self._restore()
        return self.result(strategy)

    def result(self, strategy: str) -> TuneResult:
        default = self._by_point.get(self.default_point)
        feasible = [t for t in self.trials if t.throughput_rps is not None]
        winner = max(feasible, key=lambda t: t.score()) if feasible else None
        winner_configs: dict[str, ModelConfig] = {}
        if winner is not None:
            point = next(p for p, t in self._by_point.items() if t is winner)
            winner_configs = self.configs_at(point)
        return TuneResult(
            model=self.model,
            tuned_models=tuple(self.tuned),
            budget_ms=self.budget_ms,
            trials=list(self.trials),
            space_size=self.space_size,
            strategy=strategy,
            default=default,
            winner=winner,
            winner_configs=winner_configs,
            stopped_at=self.stopped_at,
        )

    def _restore(self) -> None:
        if not self.server.is_running:
            return
        original = {name: self.configs[name] for name in self.tuned}
        # the report still stands if this fails; the server then keeps the last config tried
        with contextlib.suppress(TritonForgeError):
            self._load(original)


def write_winner(result: TuneResult, repository: str | os.PathLike[str]) -> list[str]:
    """Write the winning config of every tuned model into the repository (config.pbtxt, atomically)."""
    written = []
    for name, config in result.winner_configs.items():
        written.append(str(write_config(config, Path(repository) / name)))
    result.written = written
    return written


def write_tune_outputs(result: TuneResult, directory: str | os.PathLike[str]) -> None:
    """``tune.json`` (every trial, the winner or the closest), ``tune.csv`` (every level of every config)
    and ``report.html`` with its PNGs."""
    import html as _html

    from tritonforge.loadtest.output import write_results
    from tritonforge.loadtest.report import write_report

    out = Path(directory)
    sweeps = [t.sweep for t in result.trials if t.sweep is not None]
    write_results(sweeps, out, stem="tune", extra={"tune": result.as_dict()})
    if result.winner is not None:
        verdict = (
            f"<p><b>Best within p99 &le; {result.budget_ms:g} ms:</b> {_html.escape(result.winner.label)}"
            f" &mdash; {result.winner.throughput_rps:,.1f} infer/s</p>"
        )
    elif result.closest is not None:
        verdict = (
            f"<p class='warn'><b>No config met p99 &le; {result.budget_ms:g} ms.</b> Closest: "
            f"{_html.escape(result.closest.label)} (lowest p99 {result.closest.min_p99_ms:.2f} ms)</p>"
        )
    else:
        verdict = "<p class='warn'>No config could be measured.</p>"
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{_html.escape(str(c))}</td>"
            for c in (
                t.index,
                t.label,
                "-" if t.throughput_rps is None else f"{t.throughput_rps:,.1f}",
                "-" if not math.isfinite(t.min_p99_ms) else f"{t.min_p99_ms:.2f}",
                "winner" if t is result.winner else ("default" if t is result.default else ""),
                t.error or "",
            )
        )
        + "</tr>"
        for t in result.trials
    )
    if result.stopped_at:
        verdict = (
            f"<p class='warn'><b>Stopped early</b> at {_html.escape(result.stopped_at)}; the configs tried "
            "before are kept below.</p>" + verdict
        )
    summary = (
        f"{verdict}<p>Strategy: {_html.escape(result.strategy)}; tried {result.tried} of "
        f"{result.space_size} configs ({result.fraction_tried:.0%}). Tuned: "
        f"{_html.escape(', '.join(result.tuned_models))}.</p><table><tr><th>#</th><th>config</th>"
        f"<th>best infer/s within budget</th><th>lowest p99 ms</th><th></th><th>error</th></tr>{rows}</table>"
    )
    labels = [t.label for t in (result.default, result.winner) if t is not None]
    write_report(
        sweeps,
        out,
        title=f"tritonforge tune {result.model}",
        summary_html=summary,
        highlight=result.winner.label if result.winner else None,
        breakdowns=labels or None,
    )
