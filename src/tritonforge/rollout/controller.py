"""Canary rollouts on a running Triton: the model's name is served by a splitter while traffic moves.

Triton has no traffic split of its own, and apps must not need to know about a rollout, so for its
duration the model's name is served by a small Python-backend *splitter* and the real versions by a
*twin* model (``<model>__rollout``; both written by :mod:`tritonforge.rollout.twin`). The controller
first holds a *shadow* step (the candidate gets mirrored traffic, users get stable's answers), then
moves the splitter's weight step by step (the weight lives in the state file the splitter re-reads),
judges each step on live evidence (:mod:`tritonforge.rollout.evidence`), and either promotes the
candidate (through the registry, so the audit says ``from [stable] to [candidate]``) or rolls back.
Every swap is a *reload*: Triton keeps the old model serving until the new one is ready.

Phases, saved atomically after each change (a crashed controller is resumed or rolled back from them):
``preparing`` → ``running`` (⇄ ``paused``) → ``promoting`` | ``rolling_back`` → done (state removed).
The controller beats a heartbeat file while it runs; SIGINT/SIGTERM pause the rollout (or abort it,
``on_signal="abort"``) and leave one line saying what to run next. Each tick it checks that the server
still serves the split (a restarted server is given its twin and splitter back) before judging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonforge.errors import ClientError
from tritonforge.registry import promote as registry_promote
from tritonforge.registry import served_versions
from tritonforge.registry.audit import current_user, record_event
from tritonforge.repository.writer import load_config, versions
from tritonforge.rollout.evidence import Evidence, Snapshot, judge, read_snapshot
from tritonforge.rollout.state import (
    RolloutError,
    RolloutState,
    Thresholds,
    beat,
    controller_lock,
    controller_running,
    load_state,
    read_heartbeat,
    request_control,
    save_state,
    state_paths,
    stop_beating,
    take_control_request,
)
from tritonforge.rollout.twin import (
    SPLITTER_MARK,
    TWIN_SUFFIX,
    install_splitter,
    remove_twin,
    restore_model,
    splitter_on_disk,
    write_twin,
)
from tritonforge.rollout.waits import load_and_wait

if TYPE_CHECKING:
    from tritonforge.client.policies import Auth

__all__ = ["DEFAULT_STEPS", "Outcome", "Rollout", "parse_steps"]

DEFAULT_STEPS = (5.0, 25.0, 50.0, 100.0)
_POLL_S = 0.25
_CHECK_S = 1.0  # how often a running step checks that the server still serves the split, and beats


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
    """How a rollout ended or stopped: ``promoted``, ``rolled_back`` (a breach), ``aborted`` (an
    operator's or a signal's decision), ``paused``, or ``resumed`` (a running controller was asked to).
    ``signal``: the signal that stopped the controller, if one did."""

    model: str
    result: str
    stable: int
    candidate: int
    verdicts: tuple[dict[str, Any], ...]
    reason: str = ""
    signal: int | None = None


class _Interrupted(Exception):
    """Raised inside the driver when SIGINT/SIGTERM arrived (handled where the state is consistent)."""


class Rollout:
    """Drive the rollout of one model in ``repo`` on the server at ``url``.

    Example:
        >>> Rollout("model_repository", "localhost:8001", "clf").start(to=2, hold_s=30)   # doctest: +SKIP

    ``on_event`` is called with a short line for each thing that happens (the CLI prints them).
    ``auth``: the client's credentials (:class:`~tritonforge.client.Auth`) where the server restricts its
    model-repository or statistics calls, or asks for mutual TLS. ``on_signal``: what SIGINT/SIGTERM do
    to a rollout this object drives from the main thread, ``"pause"`` (default) or ``"abort"``.
    ``continue_hint``: the command line that continues this rollout, for the line printed on a signal.
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
        on_signal: str = "pause",
        continue_hint: str | None = None,
    ) -> None:
        if on_signal not in ("pause", "abort"):
            raise ValueError(f"on_signal must be 'pause' or 'abort', not {on_signal!r}")
        self.repo = Path(repo)
        self.auth = auth
        self.url = url
        self.model = model
        self.paths = state_paths(repo, model)
        self.on_event = on_event or (lambda line: None)
        self.ready_timeout_s = ready_timeout_s
        self.on_signal = on_signal
        self.continue_hint = continue_hint or f"tritonforge rollout resume {model} --repo {repo} --url {url}"
        self._client: Any = None
        self._signal: int | None = None
        self._beat_at = 0.0

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
        shadow: bool = True,
    ) -> Outcome:
        """Start moving traffic to version ``to`` and drive it to the end. With ``shadow`` (default) a
        shadow step comes first: the first step's share of requests is mirrored to the candidate and
        judged while users still get stable's answers.

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
                f"({existing.phase}, {existing.step_label}); carry it on with `tritonforge rollout resume "
                f"{self.model}` or roll it back with `tritonforge rollout abort {self.model}`",
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
        found = versions(model_dir)
        served = served_versions(config, found)
        if len(served) != 1:
            raise RolloutError(
                f"'{self.model}' serves versions {served or 'none'}; a rollout moves traffic from exactly "
                f"one served version: promote one first (tritonforge promote {self.repo} {self.model} V)",
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
            shadow=bool(shadow),
        )
        with controller_lock(self.repo, self.model):
            save_state(self.repo, state)
            self._audit(
                state,
                "rollout-start",
                reason=reason,
                details={
                    "steps": state.steps,
                    "shadow": state.shadow,
                    "hold_s": state.hold_s,
                    "thresholds": state.thresholds,
                },
            )
            return self._drive(state)

    def resume(self) -> Outcome:
        """Carry on a paused or interrupted rollout from where its state says (the current step is held
        again from its start). A controller that died without stopping cleanly is recorded in the audit
        (``rollout-crash``), and the twin and the splitter are loaded again before anything is judged.

        Raises:
            RolloutError: no rollout in progress, or a live controller drives it and it is not paused.
        """
        state = self._require_state()
        if controller_running(self.repo, self.model):
            if state.phase != "paused":
                raise RolloutError(
                    f"the rollout of '{self.model}' is {state.phase} ({state.step_label}) under a live "
                    "controller: nothing to resume",
                    model=self.model,
                )
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
            last = read_heartbeat(self.repo, self.model)
            if last is not None:
                self._audit(
                    state,
                    "rollout-crash",
                    reason=f"the controller (pid {last.pid}) stopped without a word",
                    details={
                        "pid": last.pid,
                        "last_beat": _dt.datetime.fromtimestamp(last.at, _dt.timezone.utc).isoformat(
                            timespec="seconds"
                        ),
                        "phase": state.phase,
                        "step": state.step_label,
                    },
                )
                self.on_event(
                    f"{self.model}: the last controller (pid {last.pid}) died {last.age_s:.0f} s ago in "
                    f"{state.phase} ({state.step_label}); recorded in the audit"
                )
            if state.phase == "paused":
                state.phase = "running"
                save_state(self.repo, state)
            self._audit(state, "rollout-resume", details={"phase": state.phase, "step": state.step_label})
            return self._drive(state)

    def pause(self) -> None:
        """Hold the current weight until resumed (the running controller, or the saved state, is told).

        Raises:
            RolloutError: no rollout in progress, or it is already paused or finishing.
        """
        state = self._require_state()
        if state.phase not in ("preparing", "running"):
            raise RolloutError(
                f"the rollout of '{self.model}' is {state.phase}: only a running rollout can be paused",
                model=self.model,
            )
        if controller_running(self.repo, self.model):
            request_control(self.repo, self.model, "pause")
            return
        with controller_lock(self.repo, self.model):
            state.phase = "paused"
            save_state(self.repo, state)
            self._audit(state, "rollout-pause", details={"weight": state.weight, "step": state.step_label})

    def abort(self, reason: str = "aborted by operator") -> Outcome:
        """Roll back now: all traffic to stable, the model restored as it was. Recorded as the operator's
        decision (``rollout-abort`` with ``reason``), not as a failed step.

        Raises:
            RolloutError: no rollout in progress, or the running controller did not finish in time.
        """
        state = self._require_state()
        if controller_running(self.repo, self.model):
            request_control(self.repo, self.model, "abort", reason)
            deadline = time.monotonic() + self.ready_timeout_s
            while load_state(self.repo, self.model) is not None:
                if time.monotonic() > deadline:
                    raise RolloutError(
                        f"the controller of '{self.model}' did not finish the abort within "
                        f"{self.ready_timeout_s:g} s; see `tritonforge rollout status {self.model}`",
                        model=self.model,
                    )
                time.sleep(_POLL_S)
            return Outcome(
                self.model, "aborted", state.stable, state.candidate, tuple(state.verdicts), reason
            )
        with controller_lock(self.repo, self.model):
            state = self._require_state()
            return self._end(state, reason, None, cause="abort")

    # -- the driver --------------------------------------------------------------------------------------

    def _drive(self, state: RolloutState) -> Outcome:
        try:
            with self._signals():
                self._beat(force=True)
                try:
                    if state.phase == "preparing":
                        self._prepare(state)
                    if state.phase == "promoting":
                        return self._promote(state)
                    if state.phase == "rolling_back":
                        return self._end(state, state.breach or "finishing an interrupted rollback", None)
                    if state.phase == "paused":
                        self.on_event(
                            f"{self.model}: paused at {state.weight:g}% ({state.step_label}); continue with "
                            f"`{self.continue_hint}`"
                        )
                        return Outcome(
                            self.model, "paused", state.stable, state.candidate, tuple(state.verdicts)
                        )
                    self._ensure_split(state)
                    while state.shadow or state.step_index < len(state.steps):
                        result = self._run_step(state)
                        if result is not None:
                            return result
                    state.phase = "promoting"
                    save_state(self.repo, state)
                    return self._promote(state)
                except _Interrupted:
                    return self._interrupted(state)
        finally:
            # a clean stop, even by an error (its message says what to run next); only a killed
            # controller leaves its heartbeat behind, which the next resume records as a crash
            stop_beating(self.repo, self.model)
            if self._client is not None:
                self._client.close()
                self._client = None

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM set a flag the driver checks at its next tick (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            self._signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _tick(self, state: RolloutState) -> None:
        self._beat()
        if self._signal is not None:
            raise _Interrupted

    def _interrupted(self, state: RolloutState) -> Outcome:
        name = signal.Signals(self._signal or signal.SIGINT).name
        if self.on_signal == "abort":
            outcome = self._end(state, f"interrupted by {name}", None, cause="abort")
            self.on_event(f"{self.model}: {name}: rolled back to v{state.stable}; nothing left to continue")
            return dataclasses.replace(outcome, signal=self._signal)
        state.phase = "paused"
        save_state(self.repo, state)
        self._audit(state, "rollout-pause", reason=f"interrupted by {name}", details={"weight": state.weight})
        self.on_event(
            f"{self.model}: {name}: paused at {state.weight:g}% to v{state.candidate} ({state.step_label}), "
            f"the split still serving; continue with `{self.continue_hint}` or roll back with "
            f"`tritonforge rollout abort {self.model} --repo {self.repo} --url {self.url}`"
        )
        return Outcome(
            self.model, "paused", state.stable, state.candidate, tuple(state.verdicts), name, self._signal
        )

    def _run_step(self, state: RolloutState) -> Outcome | None:
        weight = state.steps[0] if state.shadow else state.steps[state.step_index]
        state.weight = weight
        save_state(self.repo, state)
        if state.shadow:
            self.on_event(
                f"{self.model}: shadow step: {weight:g}% of requests mirrored to v{state.candidate} "
                f"(users get v{state.stable}'s answers), holding {state.hold_s:g} s"
            )
        else:
            self.on_event(
                f"{self.model}: {state.step_label}: {weight:g}% to v{state.candidate}, "
                f"holding {state.hold_s:g} s"
            )
        max_hold = state.max_hold_s if state.max_hold_s is not None else max(10 * state.hold_s, 30.0)
        time.sleep(0.3)  # the splitter re-reads the weight at most every 0.1 s per instance
        before, started, checked = self._snapshot(state), time.monotonic(), time.monotonic()
        while True:
            time.sleep(_POLL_S)
            self._tick(state)
            request = take_control_request(self.repo, self.model)
            if request is not None:
                command, why = request
                if command == "abort":
                    return self._end(state, why or "aborted by operator", None, cause="abort")
                if command == "pause":
                    outcome = self._pause_here(state)
                    if outcome is not None:
                        return outcome
                    before, started = self._snapshot(state), time.monotonic()
                continue
            if time.monotonic() - checked >= _CHECK_S:
                checked = time.monotonic()
                if self._ensure_split(state):
                    before, started = self._snapshot(state), time.monotonic()
                    continue
            after = self._snapshot(state)
            if _went_back(before, after):  # the server restarted: its counters began again
                before, started = after, time.monotonic()
                continue
            evidence = Evidence.between(before, after)
            elapsed = time.monotonic() - started
            verdict, reasons = judge(evidence, state.limits, final=elapsed >= state.hold_s)
            if verdict == "fail":
                return self._end(state, "; ".join(reasons), evidence)
            if verdict == "pass":
                record = {
                    "step": "shadow" if state.shadow else state.step_index + 1,
                    "weight": weight,
                    "verdict": "pass",
                    "evidence": evidence.as_dict(),
                }
                state.verdicts.append(record)
                if state.shadow:
                    state.shadow = False
                else:
                    state.step_index += 1
                save_state(self.repo, state)
                self._audit(state, "rollout-step", details=record)
                self.on_event(_evidence_line(self.model, record))
                return None
            if elapsed >= max_hold:
                return self._end(
                    state,
                    f"not enough traffic to judge the step within {max_hold:g} s: {reasons[0]}",
                    evidence,
                )

    def _pause_here(self, state: RolloutState) -> Outcome | None:
        """Hold until resumed (None) or aborted (the outcome)."""
        state.phase = "paused"
        save_state(self.repo, state)
        self._audit(state, "rollout-pause", details={"weight": state.weight, "step": state.step_label})
        self.on_event(f"{self.model}: paused at {state.weight:g}% ({state.step_label})")
        while True:
            time.sleep(_POLL_S)
            self._tick(state)
            request = take_control_request(self.repo, self.model)
            if request is None:
                continue
            command, why = request
            if command == "abort":
                return self._end(state, why or "aborted by operator", None, cause="abort")
            if command == "resume":
                state.phase = "running"
                save_state(self.repo, state)
                self._audit(state, "rollout-resume", details={"weight": state.weight})
                self.on_event(f"{self.model}: resumed at {state.weight:g}% ({state.step_label})")
                return None

    # -- the swaps ---------------------------------------------------------------------------------------

    def _prepare(self, state: RolloutState) -> None:
        """Twin loaded with both versions, then the model's name reloaded as the splitter."""
        write_twin(self.repo, state)
        self.on_event(f"{self.model}: loading v{state.stable} and v{state.candidate} as '{state.twin}'")
        self._load(state.twin, lambda: self._twin_ready(state))
        install_splitter(self.repo, state, self.paths)
        self.on_event(f"{self.model}: serving '{self.model}' through the splitter")
        self._load(self.model, lambda: self._served_by_splitter() is True)
        state.phase = "running"
        save_state(self.repo, state)

    def _ensure_split(self, state: RolloutState) -> bool:
        """Load what the split needs where the server lacks it (a restarted server, a resumed rollout):
        the twin with both versions, then the splitter. True when something had to be loaded."""
        self._wait_server()
        changed = False
        if not self._twin_ready(state):
            write_twin(self.repo, state)
            self.on_event(f"{self.model}: the server lacks '{state.twin}': loading it again")
            self._load(state.twin, lambda: self._twin_ready(state))
            changed = True
        if self._served_by_splitter() is not True:
            self.on_event(f"{self.model}: the server does not serve the splitter: loading it again")
            self._load(self.model, lambda: self._served_by_splitter() is True)
            changed = True
        return changed

    def _restore(self, state: RolloutState, serve: int) -> None:
        """The model's name back to its own config, serving ``serve`` (a promote goes through the
        registry); the twin unloaded and removed."""
        if splitter_on_disk(self.repo, state):
            restore_model(self.repo, state)
        found = versions(self.repo / self.model)
        if serve != state.stable and served_versions(load_config(self.repo / self.model), found) != [serve]:
            passed = sum(1 for v in state.verdicts if v.get("verdict") == "pass")
            registry_promote(
                self.repo,
                self.model,
                serve,
                reason=f"rollout passed {passed} step(s)" + (f": {state.reason}" if state.reason else ""),
            )
        others = [v for v in found if v != serve]
        self._load(
            self.model,
            lambda: (
                self._served_by_splitter() is False
                and self._ready(self.model, serve)
                and not any(self._ready(self.model, v) for v in others)
            ),
        )
        # requests already inside the old splitter may still call the twin: let them finish
        time.sleep(1.0)
        with contextlib.suppress(ClientError):
            self._client_().unload_model(state.twin)
        remove_twin(self.repo, state.twin)
        self._remove_stats()

    def _promote(self, state: RolloutState) -> Outcome:
        state.weight = 100.0
        save_state(self.repo, state)
        self.on_event(f"{self.model}: {state.step_label}; promoting v{state.candidate}")
        self._restore(state, state.candidate)
        passed = sum(1 for v in state.verdicts if v.get("verdict") == "pass")
        self._audit(state, "rollout-done", details={"result": "promoted", "steps_passed": passed})
        self._clear()
        self._remove_stats()  # a last write of the old splitter may have raced the first removal
        return Outcome(self.model, "promoted", state.stable, state.candidate, tuple(state.verdicts))

    def _end(self, state: RolloutState, reason: str, evidence: Evidence | None, cause: str = "") -> Outcome:
        """Roll back: for a breach (the failed step recorded), or an operator's abort (``cause="abort"``:
        recorded as ``rollout-abort``, not as a failed step)."""
        if state.phase != "rolling_back":
            cause = cause or "breach"
            if cause == "abort":
                self._audit(
                    state,
                    "rollout-abort",
                    reason=reason,
                    details={"weight": state.weight, "step": state.step_label},
                )
                self.on_event(f"{self.model}: aborted ({reason}); rolling back")
            else:
                record: dict[str, Any] = {
                    "step": "shadow" if state.shadow else state.step_index + 1,
                    "weight": state.weight,
                    "verdict": "fail",
                    "reasons": reason,
                }
                if evidence is not None:
                    record["evidence"] = evidence.as_dict()
                state.verdicts.append(record)
                self._audit(state, "rollout-step", reason=reason, details=record)
                self.on_event(f"{self.model}: {state.step_label} FAILED: {reason}; rolling back")
            state.phase = "rolling_back"
            state.breach = reason
            state.cause = cause
            state.weight = 0.0  # the splitter stops sending traffic to the candidate right away
            save_state(self.repo, state)
        if (
            self.paths.stats_files()
            or (self.repo / state.twin).exists()
            or splitter_on_disk(self.repo, state)
        ):
            self._restore(state, state.stable)
        self._audit(
            state,
            "rollout-rollback",
            reason=state.breach or reason,
            details={
                "from": [state.stable, state.candidate],
                "to": [state.stable],
                "rollout": True,
                "cause": state.cause or "breach",
            },
        )
        self._clear()
        self._remove_stats()
        result = "aborted" if state.cause == "abort" else "rolled_back"
        return Outcome(
            self.model, result, state.stable, state.candidate, tuple(state.verdicts), state.breach or reason
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

    def _snapshot(self, state: RolloutState) -> Snapshot:
        return read_snapshot(
            self.paths.stats_files(), self._client_(), state.twin, state.stable, state.candidate
        )

    def _ready(self, model: str, version: int | None = None) -> bool:
        try:
            return bool(self._client_().is_model_ready(model, version))
        except ClientError:
            return False

    def _twin_ready(self, state: RolloutState) -> bool:
        return all(self._ready(state.twin, v) for v in (state.stable, state.candidate))

    def _served_by_splitter(self) -> bool | None:
        try:
            config = self._client_().model_config(self.model)
        except ClientError:
            return None
        return SPLITTER_MARK in config.parameters

    def _wait_server(self) -> None:
        """Until the server answers ready (a restarting one), beating meanwhile.

        Raises:
            RolloutError: not ready within the timeout (the state is kept for resume or abort).
        """
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            with contextlib.suppress(ClientError):
                if self._client_().is_server_ready():
                    return
            if time.monotonic() > deadline:
                raise RolloutError(
                    f"the server at {self.url} is not ready after {self.ready_timeout_s:g} s; the rollout "
                    f"state is kept: `{self.continue_hint}` once it is, or `tritonforge rollout abort "
                    f"{self.model}`",
                    model=self.model,
                )
            self._beat()
            time.sleep(0.5)

    def _load(self, model: str, done: Callable[[], bool]) -> None:
        load_and_wait(
            self._client_(),
            model,
            done,
            timeout_s=self.ready_timeout_s,
            url=self.url,
            then=f"the rollout state is kept: fix the server and `{self.continue_hint}`, or "
            f"`tritonforge rollout abort {self.model}`",
        )

    # -- bookkeeping -------------------------------------------------------------------------------------

    def _beat(self, force: bool = False) -> None:
        if force or time.monotonic() - self._beat_at >= _CHECK_S:
            self._beat_at = time.monotonic()
            beat(self.repo, self.model)

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


def _went_back(before: Snapshot, after: Snapshot) -> bool:
    """Triton's counters are lower than before: the server restarted within the window."""
    for arm, counts in before.triton.items():
        now = after.triton.get(arm, {})
        if any(now.get(k, 0.0) < v for k, v in counts.items() if k in ("success", "fail")):
            return True
    return False


def _evidence_line(model: str, record: dict[str, Any]) -> str:
    e = record.get("evidence", {})
    step = "shadow step" if record["step"] == "shadow" else f"step {record['step']}"
    return (
        f"{model}: {step} ({record['weight']:g}%) passed: {e.get('candidate_calls')} candidate "
        f"calls, error rate {e.get('error_rate')}, p99 {e.get('candidate_p99_ms')} ms "
        f"(stable {e.get('stable_p99_ms')} ms), agreement {e.get('agreement')}"
    )


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
