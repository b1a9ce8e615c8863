"""Canary rollouts on a running Triton: the model's name is served by a splitter while traffic moves.

Triton has no traffic split of its own, and apps must not need to know about a rollout, so for its
duration the model's name is served by a small Python-backend *splitter* and the real versions by a
*twin* model (``<model>__rollout``; both written by :mod:`tritonforge.rollout.twin`). The controller
first holds a *shadow* step (the candidate gets mirrored traffic, users get stable's answers), then
moves the splitter's weight step by step (the weight lives in the state file the splitter re-reads),
judges each step on live evidence (:mod:`tritonforge.rollout.evidence`), and either promotes the
candidate (through the registry, so the audit says ``from [stable] to [candidate]``) or rolls back.
Every swap is a *reload*: Triton keeps the old model serving until the new one is ready. This module
holds the operator's verbs (start, resume, pause, abort, status), :mod:`tritonforge.rollout.driver` the
loop they hand over to.

Phases, saved atomically after each change (a crashed controller is resumed or rolled back from them):
``preparing`` → ``running`` (⇄ ``paused``) → ``promoting`` | ``rolling_back`` → done (state removed).
The controller beats a heartbeat file while it runs; SIGINT/SIGTERM pause the rollout (or abort it,
``on_signal="abort"``) and leave one line saying what to run next. Each tick it checks that the server
still serves the split (a restarted server is given its twin and splitter back) before judging.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from collections.abc import Sequence

from tritonforge.registry import served_versions
from tritonforge.registry.audit import current_user
from tritonforge.repository.writer import load_config, versions
from tritonforge.rollout.driver import Driver, Outcome
from tritonforge.rollout.state import (
    RolloutError,
    RolloutState,
    Thresholds,
    controller_lock,
    controller_running,
    load_state,
    read_heartbeat,
    request_control,
    save_state,
)
from tritonforge.rollout.twin import SPLITTER_MARK, TWIN_SUFFIX

__all__ = ["DEFAULT_STEPS", "Outcome", "Rollout", "parse_steps"]

DEFAULT_STEPS = (5.0, 25.0, 50.0, 100.0)
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


class Rollout(Driver):
    """Drive the rollout of one model in ``repo`` on the server at ``url``.

    Example:
        >>> Rollout("model_repository", "localhost:8001", "clf").start(to=2, hold_s=30)   # doctest: +SKIP

    ``on_event`` is called with a short line for each thing that happens (the CLI prints them).
    ``auth``: the client's credentials (:class:`~tritonforge.client.Auth`) where the server restricts its
    model-repository or statistics calls, or asks for mutual TLS. ``on_signal``: what SIGINT/SIGTERM do
    to a rollout this object drives from the main thread, ``"pause"`` (default) or ``"abort"``.
    ``continue_hint``: the command line that continues this rollout, for the line printed on a signal.
    """

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
            started_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
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
            try:
                return self._end(state, reason, None, cause="abort")
            finally:
                self.server.close()
