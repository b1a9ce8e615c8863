"""The loop that drives a rollout once it is started or resumed: steps judged on live evidence, pause,
abort, signals, the heartbeat, and the swaps in and out of the split.

:class:`Driver` holds the loop; :class:`~tritonforge.rollout.controller.Rollout` adds the verbs that
check what an operator asks and hand over to it. The repository side of every swap is
:mod:`tritonforge.rollout.twin`, the server side :class:`~tritonforge.rollout.waits.ServerView`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tritonforge.registry import promote as registry_promote
from tritonforge.registry import served_versions
from tritonforge.registry.audit import record_event
from tritonforge.repository.writer import load_config, versions
from tritonforge.rollout.evidence import Evidence, Snapshot, judge, read_snapshot
from tritonforge.rollout.state import (
    RolloutError,
    RolloutState,
    beat,
    load_state,
    save_state,
    state_paths,
    stop_beating,
    take_control_request,
)
from tritonforge.rollout.twin import (
    SPLITTER_MARK,
    install_splitter,
    remove_twin,
    restore_model,
    splitter_on_disk,
    write_twin,
)
from tritonforge.rollout.waits import ServerView

if TYPE_CHECKING:
    from tritonforge.client.policies import Auth

__all__ = ["Driver", "Outcome"]

_POLL_S = 0.25
_CHECK_S = 1.0  # how often a running step checks that the server still serves the split, and beats


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


class Driver:
    """The rollout loop of one model in ``repo`` on the server at ``url`` (see
    :class:`~tritonforge.rollout.controller.Rollout` for the arguments)."""

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
        self.server = ServerView(
            url,
            auth=auth,
            timeout_s=ready_timeout_s,
            then=f"the rollout state is kept: fix the server and `{self.continue_hint}`, or "
            f"`tritonforge rollout abort {model}`",
            on_wait=self._beat,
        )
        self._signal: int | None = None
        self._beat_at = 0.0

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
            self.server.close()

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
        self.server.load(state.twin, lambda: self._twin_ready(state))
        install_splitter(self.repo, state, self.paths)
        self.on_event(f"{self.model}: serving '{self.model}' through the splitter")
        self.server.load(self.model, lambda: self._served_by_splitter() is True)
        state.phase = "running"
        save_state(self.repo, state)

    def _ensure_split(self, state: RolloutState) -> bool:
        """Load what the split needs where the server lacks it (a restarted server, a resumed rollout):
        the twin with both versions, then the splitter. True when something had to be loaded."""
        self.server.wait_ready()
        changed = False
        if not self._twin_ready(state):
            write_twin(self.repo, state)
            self.on_event(f"{self.model}: the server lacks '{state.twin}': loading it again")
            self.server.load(state.twin, lambda: self._twin_ready(state))
            changed = True
        if self._served_by_splitter() is not True:
            self.on_event(f"{self.model}: the server does not serve the splitter: loading it again")
            self.server.load(self.model, lambda: self._served_by_splitter() is True)
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
        self.server.load(
            self.model,
            lambda: (
                self._served_by_splitter() is False
                and self.server.ready(self.model, serve)
                and not any(self.server.ready(self.model, v) for v in others)
            ),
        )
        # requests already inside the old splitter may still call the twin: let them finish
        time.sleep(1.0)
        self.server.unload(state.twin)
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

    def _check_access(self) -> None:
        """Refuse before anything changes when the server won't take our model-repository and statistics
        calls (restricted protocols without our key, mutual TLS without our certificate).

        Raises:
            AuthenticationError: naming the refused protocol group and how to pass its key.
        """
        self.server.client.repository_index()
        self.server.client.model_statistics(self.model)

    def _snapshot(self, state: RolloutState) -> Snapshot:
        return read_snapshot(
            self.paths.stats_files(), self.server.client, state.twin, state.stable, state.candidate
        )

    def _twin_ready(self, state: RolloutState) -> bool:
        return all(self.server.ready(state.twin, v) for v in (state.stable, state.candidate))

    def _served_by_splitter(self) -> bool | None:
        return self.server.served_with(self.model, SPLITTER_MARK)

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
