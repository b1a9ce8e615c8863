"""Canary rollouts on a running Triton: the model's name is served by a splitter while traffic moves.

Triton has no traffic split of its own, and apps must not need to know about a rollout, so for its
duration the model's name is served by a small Python-backend *splitter* (``models/splitter.py``) and
the real versions by a *twin* model (``<model>__rollout``, the stable and the candidate version, files
hard-linked). The controller moves the splitter's weight step by step (the weight lives in the state
file the splitter re-reads), judges each step on live evidence (:mod:`tritonforge.rollout.evidence`),
and either promotes the candidate or rolls back. Every swap is a *reload*: Triton keeps the old model
serving until the new one is ready, so no request fails while versions load and unload.

Phases, saved atomically after each change (a crashed controller is resumed or rolled back from them):
``preparing`` → ``running`` (⇄ ``paused``) → ``promoting`` | ``rolling_back`` → done (state removed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonforge.config import DynamicBatching, InstanceGroup, ModelConfig, VersionPolicy, write_config
from tritonforge.errors import ClientError
from tritonforge.registry import promote as registry_promote
from tritonforge.registry import served_versions
from tritonforge.registry.audit import current_user, record_event
from tritonforge.repository.writer import load_config, versions
from tritonforge.rollout.evidence import Evidence, judge, read_snapshot
from tritonforge.rollout.state import (
    RolloutError,
    RolloutState,
    Thresholds,
    controller_lock,
    controller_running,
    load_state,
    request_control,
    save_state,
    state_paths,
    take_control_request,
)

if TYPE_CHECKING:
    from tritonforge.client.policies import Auth

__all__ = [
    "DEFAULT_STEPS",
    "Outcome",
    "Rollout",
    "parse_steps",
]

DEFAULT_STEPS = (5.0, 25.0, 50.0, 100.0)
TWIN_SUFFIX = "__rollout"
SPLITTER = Path(__file__).parent / "models" / "splitter.py"
# the splitter's file in the stable version's folder: not model.py, which a Python-backend model (a
# pipeline's router) has there itself, and which the twin shares through a hard link
SPLITTER_FILE = "tritonforge_rollout_splitter.py"
SPLITTER_MARK = "tritonforge_rollout"
_POLL_S = 0.25


def parse_steps(text: str | Sequence[float]) -> list[float]:
    """``"5,25,50,100"`` → ``[5.0, 25.0, 50.0, 100.0]`` (percent of traffic on the candidate).

    Raises:
        ValueError: not increasing percentages in (0, 100], or not ending at 100.
    """
    items = [s for s in text.split(",")] if isinstance(text, str) else list(text)
    try:
        steps = [float(s) for s in items]
    except ValueError as exc:
        raise ValueError(f"--steps must be percentages like 5,25,50,100, not {text!r}") from exc
    if not steps or any(not 0 < s <= 100 for s in steps) or steps != sorted(set(steps)):
        raise ValueError(f"--steps must be increasing percentages in (0, 100], not {text!r}")
    if steps[-1] != 100:
        raise ValueError(f"--steps must end at 100 (the candidate takes all traffic), not {text!r}")
    return steps


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a rollout ended (or stopped): ``promoted``, ``rolled_back`` or ``paused``."""

    model: str
    result: str
    stable: int
    candidate: int
    verdicts: tuple[dict[str, Any], ...]
    reason: str = ""


class Rollout:
    """Drive the rollout of one model in ``repo`` on the server at ``url``.

    Example:
        >>> Rollout("model_repository", "localhost:8001", "clf").start(to=2, hold_s=30)   # doctest: +SKIP

    ``on_event`` is called with a short line for each thing that happens (the CLI prints them).
    ``auth``: the client's credentials (:class:`~tritonforge.client.Auth`) where the server restricts its
    model-repository or statistics calls, or asks for mutual TLS.
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        url: str,
        model: str,
        *,
        on_event: Callable[[str], None] | None = None,
        ready_timeout_s: float = 120.0,
        auth: Auth | None = None,
    ) -> None:
        self.repo = Path(repo)
        self.auth = auth
        self.url = url
        self.model = model
        self.paths = state_paths(repo, model)
        self.on_event = on_event or (lambda line: None)
        self.ready_timeout_s = ready_timeout_s
        self._client: Any = None

    # -- public verbs ------------------------------------------------------------------------------------

    def status(self) -> RolloutState | None:
        """The saved state of this model's rollout, None when none is in progress."""
        return load_state(self.repo, self.model)

    def start(
        self,
        to: int,
        *,
        steps: Sequence[float] = DEFAULT_STEPS,
        hold_s: float = 60.0,
        thresholds: Thresholds | None = None,
        reason: str | None = None,
        max_hold_s: float | None = None,
    ) -> Outcome:
        """Start moving traffic to version ``to`` and drive it to the end.

        Raises:
            RolloutError: a rollout of this model is already in progress, the model serves more or less
                than one version, ``to`` is missing or is the served one.
            AuthenticationError: the server refuses our model-repository or statistics calls (checked
                before anything changes: pass ``auth=``).
            ClientError: the server can't be reached or refuses a load (the message says why).
        """
        existing = load_state(self.repo, self.model)
        if existing is not None:
            raise RolloutError(
                f"a rollout of '{self.model}' to v{existing.candidate} is already in progress "
                f"({existing.phase}, step {existing.step_index + 1} of {len(existing.steps)}); "
                "use --resume to carry it on or --abort to roll it back",
                model=self.model,
            )
        model_dir = self.repo / self.model
        if not (model_dir / "config.pbtxt").is_file():
            raise RolloutError(f"no model '{self.model}' in {self.repo}", model=self.model)
        config = load_config(model_dir)
        if config.parameters.get(SPLITTER_MARK):
            raise RolloutError(
                f"'{self.model}' is served by a rollout splitter but no rollout state exists in "
                f"{self.paths.state}; restore its config.pbtxt by hand",
                model=self.model,
            )
        if config.is_ensemble or (config.backend == "python" and not config.platform):
            pass  # a Python or ensemble model rolls out the same way: the twin holds its versions
        found = versions(model_dir)
        served = served_versions(config, found)
        if len(served) != 1:
            raise RolloutError(
                f"'{self.model}' serves versions {served or 'none'}; a rollout moves traffic from exactly "
                "one "
                f"served version: promote one first (tritonforge promote {self.repo} {self.model} V)",
                model=self.model,
            )
        stable = served[0]
        if to not in found:
            raise RolloutError(
                f"'{self.model}' has no version {to}; it has {', '.join(map(str, found))}", model=self.model
            )
        if to == stable:
            raise RolloutError(f"'{self.model}' already serves v{to}", model=self.model, version=to)
        self._check_access()
        limits = thresholds or Thresholds()
        state = RolloutState(
            model=self.model,
            stable=stable,
            candidate=int(to),
            steps=parse_steps(list(steps)),
            hold_s=float(hold_s),
            thresholds=dataclasses.asdict(limits),
            original_config=(model_dir / "config.pbtxt").read_text(encoding="utf-8"),
            twin=self.model + TWIN_SUFFIX,
            reason=reason,
            by=current_user(),
            started_at=_now(),
            max_hold_s=max_hold_s,
        )
        with controller_lock(self.repo, self.model):
            save_state(self.repo, state)
            self._audit(
                state,
                "rollout-start",
                reason=reason,
                details={"steps": state.steps, "hold_s": state.hold_s, "thresholds": state.thresholds},
            )
            return self._drive(state)

    def resume(self) -> Outcome:
        """Carry on a paused or interrupted rollout from where its state says (the current step is held
        again from its start).

        Raises:
            RolloutError: no rollout in progress, or a live controller already drives it.
        """
        state = self._require_state()
        if controller_running(self.repo, self.model):
            request_control(self.repo, self.model, "resume")
            return Outcome(
                self.model,
                "resumed",
                state.stable,
                state.candidate,
                tuple(state.verdicts),
                "the running controller was asked to resume",
            )
        with controller_lock(self.repo, self.model):
            state = self._require_state()
            if state.phase == "paused":
                state.phase = "running"
                save_state(self.repo, state)
            self._audit(state, "rollout-resume", details={"phase": state.phase, "step": state.step_index + 1})
            return self._drive(state)

    def pause(self) -> None:
        """Hold the current weight until resumed (the running controller, or the saved state, is told).

        Raises:
            RolloutError: no rollout in progress.
        """
        state = self._require_state()
        if controller_running(self.repo, self.model):
            request_control(self.repo, self.model, "pause")
            return
        with controller_lock(self.repo, self.model):
            if state.phase in ("preparing", "running"):
                state.phase = "paused"
                save_state(self.repo, state)
            self._audit(state, "rollout-pause", details={"weight": state.weight})

    def abort(self, reason: str = "aborted by operator") -> Outcome:
        """Roll back now: all traffic to stable, the model restored as it was.

        Raises:
            RolloutError: no rollout in progress.
        """
        state = self._require_state()
        if controller_running(self.repo, self.model):
            request_control(self.repo, self.model, "abort")
            deadline = time.monotonic() + self.ready_timeout_s
            while time.monotonic() < deadline and load_state(self.repo, self.model) is not None:
                time.sleep(_POLL_S)
            return Outcome(
                self.model, "rolled_back", state.stable, state.candidate, tuple(state.verdicts), reason
            )
        with controller_lock(self.repo, self.model):
            state = self._require_state()
            return self._rollback(state, reason, None)

    # -- the driver --------------------------------------------------------------------------------------

    def _drive(self, state: RolloutState) -> Outcome:
        try:
            if state.phase == "preparing":
                self._prepare(state)
            if state.phase == "promoting":
                return self._promote(state)
            if state.phase == "rolling_back":
                return self._rollback(state, "finishing an interrupted rollback", None)
            if state.phase == "paused":
                self.on_event(f"{self.model}: paused at {state.weight:g}% (resume with --resume)")
                return Outcome(self.model, "paused", state.stable, state.candidate, tuple(state.verdicts))
            while state.step_index < len(state.steps):
                result = self._run_step(state)
                if result is not None:
                    return result
            state.phase = "promoting"
            save_state(self.repo, state)
            return self._promote(state)
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _run_step(self, state: RolloutState) -> Outcome | None:
        weight = state.steps[state.step_index]
        state.weight = weight
        save_state(self.repo, state)
        self.on_event(
            f"{self.model}: step {state.step_index + 1}/{len(state.steps)}: {weight:g}% to "
            f"v{state.candidate}, holding {state.hold_s:g} s"
        )
        limits = state.limits
        max_hold = state.max_hold_s if state.max_hold_s is not None else max(10 * state.hold_s, 30.0)
        time.sleep(0.3)  # the splitter re-reads the weight at most every 0.1 s per instance
        before = self._snapshot(state)
        started = time.monotonic()
        while True:
            time.sleep(_POLL_S)
            command = take_control_request(self.repo, self.model)
            if command == "abort":
                return self._rollback(state, "aborted by operator", None)
            if command == "pause":
                state.phase = "paused"
                save_state(self.repo, state)
                self._audit(state, "rollout-pause", details={"weight": weight})
                self.on_event(f"{self.model}: paused at {weight:g}%")
                paused_for = self._wait_paused(state)
                if paused_for == "abort":
                    return self._rollback(state, "aborted by operator", None)
                before, started = self._snapshot(state), time.monotonic()
                continue
            evidence = Evidence.between(before, self._snapshot(state))
            elapsed = time.monotonic() - started
            verdict, reasons = judge(evidence, limits, final=elapsed >= state.hold_s)
            if verdict == "fail":
                return self._rollback(state, "; ".join(reasons), evidence)
            if verdict == "pass":
                record = {
                    "step": state.step_index + 1,
                    "weight": weight,
                    "verdict": "pass",
                    "evidence": evidence.as_dict(),
                }
                state.verdicts.append(record)
                state.step_index += 1
                save_state(self.repo, state)
                self._audit(state, "rollout-step", details=record)
                self.on_event(_evidence_line(self.model, record))
                return None
            if elapsed >= max_hold:
                return self._rollback(
                    state,
                    f"not enough traffic to judge the step within {max_hold:g} s: {reasons[0]}",
                    evidence,
                )

    def _wait_paused(self, state: RolloutState) -> str:
        while True:
            time.sleep(_POLL_S)
            command = take_control_request(self.repo, self.model)
            if command in ("resume", "abort"):
                if command == "resume":
                    state.phase = "running"
                    save_state(self.repo, state)
                    self._audit(state, "rollout-resume", details={"weight": state.weight})
                    self.on_event(f"{self.model}: resumed at {state.weight:g}%")
                return command

    # -- the swaps ---------------------------------------------------------------------------------------

    def _prepare(self, state: RolloutState) -> None:
        """Twin loaded with both versions, then the model's name reloaded as the splitter."""
        original = ModelConfig.from_pbtxt(state.original_config)
        twin_dir = self.repo / state.twin
        if not twin_dir.exists():
            staging = self.repo / f".tritonforge-staging-{state.twin}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            for version in (state.stable, state.candidate):
                _link_tree(self.repo / self.model / str(version), staging / str(version))
            write_config(
                original.replace(
                    name=state.twin, version_policy=VersionPolicy.specific(state.stable, state.candidate)
                ),
                staging,
            )
            staging.rename(twin_dir)
        self.on_event(f"{self.model}: loading v{state.stable} and v{state.candidate} as '{state.twin}'")
        self._load(
            state.twin, lambda: all(self._ready(state.twin, v) for v in (state.stable, state.candidate))
        )
        splitter = ModelConfig(
            name=self.model,
            backend="python",
            max_batch_size=original.max_batch_size,
            inputs=original.inputs,
            outputs=original.outputs,
            dynamic_batching=DynamicBatching() if original.max_batch_size > 0 else None,
            instance_groups=(InstanceGroup(count=2),),
            version_policy=VersionPolicy.specific(state.stable),
            default_model_filename=SPLITTER_FILE,
            parameters={
                SPLITTER_MARK: "splitter",
                "rollout_target": state.twin,
                "rollout_state": str(self.paths.state.relative_to(self.repo)),
                "rollout_stats": self.paths.stats_prefix,
            },
        )
        model_dir = self.repo / self.model
        shutil.copyfile(SPLITTER, model_dir / str(state.stable) / SPLITTER_FILE)
        write_config(splitter, model_dir)
        self.on_event(f"{self.model}: serving '{self.model}' through the splitter")
        self._load(self.model, lambda: self._served_by_splitter() is True)
        state.phase = "running"
        save_state(self.repo, state)

    def _restore(self, state: RolloutState, serve: int) -> None:
        """The model's name back to its own config, serving ``serve``; the twin unloaded and removed."""
        model_dir = self.repo / self.model
        original = ModelConfig.from_pbtxt(state.original_config)
        write_config(original.replace(version_policy=VersionPolicy.specific(serve)), model_dir)
        with contextlib.suppress(FileNotFoundError):
            (model_dir / str(state.stable) / SPLITTER_FILE).unlink()
        self._load(self.model, lambda: self._served_by_splitter() is False and self._ready(self.model, serve))
        # requests already inside the old splitter may still call the twin: let them finish
        time.sleep(1.0)
        with contextlib.suppress(ClientError):
            self._client_().unload_model(state.twin)
        shutil.rmtree(self.repo / state.twin, ignore_errors=True)
        self._remove_stats()

    def _promote(self, state: RolloutState) -> Outcome:
        state.weight = 100.0
        save_state(self.repo, state)
        self.on_event(f"{self.model}: every step passed; promoting v{state.candidate}")
        self._restore(state, state.candidate)
        passed = sum(1 for v in state.verdicts if v.get("verdict") == "pass")
        registry_promote(
            self.repo,
            self.model,
            state.candidate,
            reason=f"rollout passed {passed} step(s)" + (f": {state.reason}" if state.reason else ""),
        )
        self._audit(state, "rollout-done", details={"result": "promoted", "steps_passed": passed})
        self._clear()
        self._remove_stats()  # a last write of the old splitter may have raced the first removal
        return Outcome(self.model, "promoted", state.stable, state.candidate, tuple(state.verdicts))

    def _rollback(self, state: RolloutState, reason: str, evidence: Evidence | None) -> Outcome:
        if state.phase != "rolling_back":
            record = {
                "step": state.step_index + 1,
                "weight": state.weight,
                "verdict": "fail",
                "reasons": reason,
            }
            if evidence is not None:
                record["evidence"] = evidence.as_dict()
            state.verdicts.append(record)
            state.phase = "rolling_back"
            state.weight = 0.0  # the splitter stops sending traffic to the candidate right away
            save_state(self.repo, state)
            self._audit(state, "rollout-step", reason=reason, details=record)
            self.on_event(f"{self.model}: step {state.step_index + 1} FAILED: {reason}; rolling back")
        if self.paths.stats_files() or (self.repo / state.twin).exists() or self._splitter_files(state):
            self._restore(state, state.stable)
        self._audit(
            state,
            "rollout-rollback",
            reason=reason,
            details={"from": [state.stable, state.candidate], "to": [state.stable], "rollout": True},
        )
        self._clear()
        self._remove_stats()
        return Outcome(
            self.model, "rolled_back", state.stable, state.candidate, tuple(state.verdicts), reason
        )

    def _splitter_files(self, state: RolloutState) -> bool:
        return (self.repo / self.model / str(state.stable) / SPLITTER_FILE).exists() or bool(
            load_config(self.repo / self.model).parameters.get(SPLITTER_MARK)
        )

    def _remove_stats(self) -> None:
        for file in self.paths.stats_files():
            with contextlib.suppress(FileNotFoundError):
                file.unlink()

    def _clear(self) -> None:
        for path in (self.paths.state, self.paths.control):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- server helpers ----------------------------------------------------------------------------------

    def _client_(self) -> Any:
        if self._client is None:
            from tritonforge.client import Client

            self._client = Client(self.url, metrics=False, auth=self.auth)
        return self._client

    def _check_access(self) -> None:
        """Refuse before anything changes when the server won't take our model-repository and statistics
        calls (restricted protocols without our key, mutual TLS without our certificate).

        Raises:
            AuthenticationError: naming the refused protocol group and how to pass its key.
        """
        client = self._client_()
        client.repository_index()
        client.model_statistics(self.model)

    def _snapshot(self, state: RolloutState) -> Any:
        return read_snapshot(
            self.paths.stats_files(), self._client_(), state.twin, state.stable, state.candidate
        )

    def _ready(self, model: str, version: int | None = None) -> bool:
        return bool(self._client_().is_model_ready(model, version))

    def _served_by_splitter(self) -> bool | None:
        try:
            config = self._client_().model_config(self.model)
        except ClientError:
            return None
        return SPLITTER_MARK in config.parameters

    def _load(self, model: str, done: Callable[[], bool]) -> None:
        """Load (reload) ``model`` with explicit model control; under poll mode, wait for the server to
        pick the change up itself. Either way, return once ``done()`` holds.

        Raises:
            RolloutError: the server did not get there within the timeout (its reason included).
        """
        try:
            self._client_().load_model(model)
        except ClientError as exc:
            if "poll" not in str(exc).lower():
                raise RolloutError(
                    f"the server refused to load '{model}': {exc.message}", model=model
                ) from exc
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if done():
                return
            time.sleep(0.2)
        raise RolloutError(
            f"'{model}' did not become ready on {self.url} within {self.ready_timeout_s:g} s; the rollout "
            "state is kept: fix the server and run --resume, or --abort",
            model=model,
        )

    # -- bookkeeping -------------------------------------------------------------------------------------

    def _require_state(self) -> RolloutState:
        state = load_state(self.repo, self.model)
        if state is None:
            raise RolloutError(
                f"no rollout of '{self.model}' is in progress in {self.repo}", model=self.model
            )
        return state

    def _audit(
        self,
        state: RolloutState,
        action: str,
        *,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        merged = {"stable": state.stable, "candidate": state.candidate, **(details or {})}
        record_event(
            self.repo,
            action,
            model=self.model,
            version=state.candidate,
            reason=reason or state.reason,
            details=merged,
        )


def _link_tree(source: Path, destination: Path) -> None:
    """Copy a version folder by hard links (no extra disk for big models), copies across filesystems."""
    destination.mkdir(parents=True)
    for item in source.iterdir():
        if item.name == SPLITTER_FILE:
            continue
        target = destination / item.name
        if item.is_dir():
            _link_tree(item, target)
        else:
            try:
                os.link(item, target)
            except OSError:
                shutil.copy2(item, target)


def _evidence_line(model: str, record: dict[str, Any]) -> str:
    e = record.get("evidence", {})
    return (
        f"{model}: step {record['step']} ({record['weight']:g}%) passed: {e.get('candidate_calls')} "
        "candidate "
        f"calls, error rate {e.get('error_rate')}, p99 {e.get('candidate_p99_ms')} ms "
        f"(stable {e.get('stable_p99_ms')} ms), agreement {e.get('agreement')}"
    )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
