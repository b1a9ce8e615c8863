"""A config tuner like Model Analyzer's: try configs by reloading the model, sweep each, keep the fastest
within a p99 budget — and it works on ensembles, by tuning their composing models under the ensemble's
end-to-end load.

The search itself (knobs, grid, trials, coordinate search) is pure and lives in
:mod:`tritonforge.loadtest.search`; this module loads configs on a server and measures them; the writers
(reports, the winning config) are in :mod:`tritonforge.loadtest.tune_output`.

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
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from tritonforge.config import ComposingWalk, ModelConfig, read_config
from tritonforge.errors import ModelNotFoundError, ServerGone, TritonForgeError
from tritonforge.loadtest.search import (
    KNOBS,
    Point,
    SearchSpace,
    Trial,
    TuneResult,
    apply_knobs,
    coordinate_search,
    knobs_of,
    refine_leaders,
)
from tritonforge.loadtest.sweep import Event, SweepResult, SweepSettings, run_sweep
from tritonforge.loadtest.target import open_target
from tritonforge.repository.layout import candidate_layouts
from tritonforge.repository.threads import available_cpus

__all__ = ["Tuner", "tunable_models", "tune"]


def tunable_models(repository: Path, model: str) -> tuple[list[str], dict[str, ModelConfig]]:
    """The models to tune for ``model`` (itself, or the non-ensemble models its ensemble runs) and the
    config of every model involved, read from the repository.

    Raises:
        ModelNotFoundError: a model is not in the repository.
    """
    configs: dict[str, ModelConfig] = {}
    order: list[str] = []
    walk = ComposingWalk(model)
    for name in walk:
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
            walk.add(step.model_name for step in config.ensemble_steps or ())
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
        cpus: int | None = None,
    ) -> None:
        self.server = server
        self.cpus = available_cpus() if cpus is None else cpus
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or self.cpus < 1:
            raise ValueError(f"cpus must be a positive integer, got {cpus!r}")
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
        thread_values = self.space.intra_op_threads or sorted(
            {layout.intra_op_threads for layout in candidate_layouts(self.cpus)}
        )
        for name in self.tuned:
            current = knobs_of(self.configs[name])
            for knob in KNOBS:
                if knob not in current:
                    continue  # intra-op threads of a model our backends don't thread
                values = list(thread_values if knob == "intra_op_threads" else self.space.values(knob))
                if knob == "max_batch_size":
                    values = [v for v in values if v >= floor]
                if current[knob] not in values:
                    values.append(current[knob])
                if knob != "preferred":
                    values.sort()
                self.dims.append((name, knob, tuple(values)))
        self.space_size = self._count_points()
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
            point.append(values.index(knobs_of(self.configs[name])[knob]))
        return tuple(point)

    def _count_points(self) -> int:
        """How many configs :meth:`points` yields, counted per model (the product grows fast)."""
        size = 1
        for name in self.tuned:
            by_knob = {knob: values for m, knob, values in self.dims if m == name}
            size *= math.prod(
                len(v) for knob, v in by_knob.items() if knob not in ("instances", "intra_op_threads")
            )
            if "intra_op_threads" in by_knob:
                size *= sum(
                    1
                    for i in by_knob["instances"]
                    for t in by_knob["intra_op_threads"]
                    if t >= 1 and i * t <= self.cpus
                )
            else:
                size *= len(by_knob["instances"])
        return size + (0 if self.allowed(self.default_point) else 1)

    def allowed(self, point: Point) -> bool:
        """Whether ``point`` is a candidate: no threaded model asks for more threads than the CPUs
        (``instances x intra_op_threads <= cpus``). The config as served is measured whatever it is."""
        for knobs in self.knobs_at(point).values():
            threads = knobs.get("intra_op_threads")
            if threads is not None and (threads < 1 or knobs["instances"] * threads > self.cpus):
                return False
        return True

    def knobs_at(self, point: Point) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {name: {} for name in self.tuned}
        for (name, knob, values), i in zip(self.dims, point, strict=True):
            out[name][knob] = values[i]
        return out

    def configs_at(self, point: Point) -> dict[str, ModelConfig]:
        return {name: apply_knobs(self.configs[name], knobs) for name, knobs in self.knobs_at(point).items()}

    def label(self, point: Point) -> str:
        def one(k: Mapping[str, Any]) -> str:
            threads = k.get("intra_op_threads")
            return (
                f"mbs={k['max_batch_size']} pref={k['preferred']} delay={k['max_queue_delay_us']}us "
                f"inst={k['instances']}" + ("" if threads is None else f" threads={threads or 'default'}")
            )

        knobs = self.knobs_at(point)
        if len(knobs) == 1 and self.tuned == [self.model]:
            return one(knobs[self.model])
        return " | ".join(f"{name}: {one(k)}" for name, k in knobs.items())

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """The dimensions searched together, per tuned model: (max batch size, queue delay), then
        (instances, intra-op threads) or instances alone, then preferred sizes."""
        out: list[tuple[int, ...]] = []
        for name in self.tuned:
            index = {knob: i for i, (m, knob, _) in enumerate(self.dims) if m == name}
            layout: tuple[int, ...] = (index["instances"],)
            if "intra_op_threads" in index:
                layout = (index["instances"], index["intra_op_threads"])
            out += [(index["max_batch_size"], index["max_queue_delay_us"]), layout, (index["preferred"],)]
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
            allowed=self.allowed,
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
        """Every config of the space: the candidates (see :meth:`allowed`) and the config as served."""
        default = self.default_point
        for point in itertools.product(*(range(len(v)) for _, _, v in self.dims)):
            if point == default or self.allowed(point):
                yield point

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
            cpus=self.cpus,
            workload=self.workload,
        )

    @property
    def workload(self) -> str:
        """What every config is measured on, in words (goes into the manifest with the winner)."""
        kind = "concurrency" if self.settings.concurrency else "request rate"
        levels = "/".join(f"{level:g}" for level in self.settings.levels)
        return (
            f"gRPC sweeps of '{self.model}' on the server at {kind} {levels}, "
            f"{self.settings.window_s:g} s windows"
        )

    def _restore(self) -> None:
        if not self.server.is_running:
            return
        original = {name: self.configs[name] for name in self.tuned}
        # the report still stands if this fails; the server then keeps the last config tried
        with contextlib.suppress(TritonForgeError):
            self._load(original)


def tune(
    model: str,
    *,
    repository: str | os.PathLike[str],
    p99_budget_ms: float,
    space: SearchSpace | None = None,
    settings: SweepSettings | None = None,
    max_trials: int | None = None,
    exhaustive: bool = False,
    refine: int = 2,
    write: bool = False,
    output: str | os.PathLike[str] | None = None,
    on_event: Event | None = None,
) -> TuneResult:
    """Tune ``model`` on an embedded server over ``repository`` (explicit model control), end to end.

    With ``output``, the reports (``tune.json``, ``tune.csv``, ``report.html``) are rewritten after every
    config tried, so a long run shows its progress, and once more at the end. With ``write``, the winning
    config of every tuned model goes into the repository — only when the run finished (not when the
    server stopped under it).

    Raises:
        RepositoryError: there is no repository there.
        ModelNotFoundError: the repository has no such model.
        TritonForgeError: the model has nothing to tune, or the server could not start.
    """
    from tritonforge.loadtest.bench import embedded_server
    from tritonforge.loadtest.tune_output import write_tune_outputs, write_winner

    repo = Path(repository)
    out = Path(output or ".")
    with embedded_server(repo, model) as server:
        tuner = Tuner(
            server,
            repo,
            model,
            p99_budget_ms=p99_budget_ms,
            space=space,
            settings=settings,
            max_trials=max_trials,
            exhaustive=exhaustive,
            refine=refine,
            on_event=on_event,
            on_trial=None if output is None else lambda _: write_tune_outputs(tuner.result("running"), out),
        )
        result = tuner.run()
    if write and result.winner is not None and result.stopped_at is None:
        write_winner(result, repo)
    if output is not None:
        write_tune_outputs(result, out)
    return result
