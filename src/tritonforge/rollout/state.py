"""A rollout's persisted state: one JSON file per model, replaced atomically, and the controller's lock.

Everything lives in files at the repository's top level, named ``.tritonforge-rollout-<model>.*``
(never a folder: Triton takes every folder of the repository, hidden ones too, for a model, and a
server starting in ``none`` or ``poll`` mode exits when one fails to load): ``.json`` (the state; the
splitter model re-reads its ``weight`` from it), ``.stats-<instance>.json`` (the splitter's counters,
one file per instance), ``.lock`` (held by the running controller, so a crashed controller is told
apart from a live one: the kernel drops the lock with the process), ``.heartbeat`` (the controller's pid
and the time of its last beat, removed when it stops cleanly: one left behind without a live lock holder
is a crash) and ``.control`` (pause / resume / abort requests from another shell).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tritonforge.atomic import write_atomic
from tritonforge.errors import RolloutError
from tritonforge.files import read_text, read_yaml

__all__ = [
    "STATE_PREFIX",
    "Heartbeat",
    "RolloutError",
    "RolloutState",
    "StatePaths",
    "Thresholds",
    "read_heartbeat",
    "rollouts_in",
    "state_paths",
]

STATE_PREFIX = ".tritonforge-rollout-"
PHASES = ("preparing", "running", "paused", "promoting", "rolling_back")


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Limits a candidate must stay within at every step.

    ``max_error_rate`` is a fraction (0.01 = 1 %), ``max_p99_ms`` the candidate's p99 latency as the
    splitter sees it, ``min_agreement`` the fraction of mirrored rows whose outputs match stable's within
    ``agreement_atol``/``agreement_rtol``; ``min_requests`` candidate calls are needed before a step is
    judged (a breach with fewer is judged at once only when it can't be undone by more traffic).
    """

    max_error_rate: float = 0.01
    max_p99_ms: float | None = None
    min_agreement: float | None = 0.99
    agreement_atol: float = 1e-3
    agreement_rtol: float = 1e-3
    min_requests: int = 20
    candidate_timeout_ms: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be a fraction in [0, 1], not {self.max_error_rate}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be a fraction in [0, 1], not {self.min_agreement}")
        if self.max_p99_ms is not None and self.max_p99_ms <= 0:
            raise ValueError(f"max_p99_ms must be positive, not {self.max_p99_ms}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be at least 1, not {self.min_requests}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> Thresholds:
        """Thresholds from a JSON or YAML file (keys as the fields), then ``overrides`` that are not None.

        Raises:
            RolloutError: the file is missing, unreadable or has unknown keys.
        """
        file = Path(path)
        if file.suffix in (".yaml", ".yml"):
            data = read_yaml(file, what="thresholds file", error=RolloutError) or {}
        else:
            try:
                data = json.loads(read_text(file, what="thresholds file", error=RolloutError))
            except (ValueError, RecursionError) as exc:
                raise RolloutError(f"thresholds file {file}: {exc}") from None
        if not isinstance(data, dict):
            raise RolloutError(f"thresholds file {file}: expected a mapping of threshold names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RolloutError(
                f"thresholds file {file}: unknown key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(known))}"
            )
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise RolloutError(f"thresholds file {file}: {exc}") from exc


@dataclasses.dataclass
class RolloutState:
    """What a rollout is doing; saved after every change so a new process can carry on."""

    model: str
    stable: int
    candidate: int
    steps: list[float]
    hold_s: float
    thresholds: dict[str, Any]
    original_config: str
    twin: str
    phase: str = "preparing"
    step_index: int = 0
    weight: float = 0.0
    reason: str | None = None
    by: str | None = None
    started_at: str | None = None
    verdicts: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    max_hold_s: float | None = None
    breach: str | None = None  # why it is rolling back (kept for a resume that finishes the rollback)
    cause: str | None = None  # "breach" or "abort" (an operator's or a signal's decision)
    shadow: bool = False  # the current step mirrors traffic to the candidate; users get stable's answers

    @property
    def step_label(self) -> str:
        """``"shadow"`` or ``"step 2 of 4"`` (never past the last step: promoting says "all N steps")."""
        if self.shadow:
            return "shadow step"
        if self.step_index >= len(self.steps):
            return f"all {len(self.steps)} steps passed"
        return f"step {self.step_index + 1} of {len(self.steps)}"

    def as_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        limits = Thresholds(**self.thresholds)
        # the splitter reads these from the same file
        record["candidate_timeout_ms"] = limits.candidate_timeout_ms
        record["agreement_atol"] = limits.agreement_atol
        record["agreement_rtol"] = limits.agreement_rtol
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def limits(self) -> Thresholds:
        return Thresholds(**self.thresholds)


@dataclasses.dataclass(frozen=True)
class StatePaths:
    root: Path
    state: Path
    stats_prefix: str
    lock: Path
    control: Path
    heartbeat: Path

    def stats_files(self) -> list[Path]:
        """The splitter's counter files (one per instance that has answered)."""
        return sorted(self.root.glob(f"{self.stats_prefix}*.json"))


def state_paths(repo: str | os.PathLike[str], model: str) -> StatePaths:
    """Where the rollout of ``model`` in ``repo`` keeps its files."""
    root = Path(repo)
    base = f"{STATE_PREFIX}{model}"
    return StatePaths(
        root=root,
        state=root / f"{base}.json",
        stats_prefix=f"{base}.stats-",
        lock=root / f"{base}.lock",
        control=root / f"{base}.control",
        heartbeat=root / f"{base}.heartbeat",
    )


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` at once (temp file, fsync, rename, fsync of the folder)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str))


def load_state(repo: str | os.PathLike[str], model: str) -> RolloutState | None:
    """The saved rollout of ``model``, or None when none is in progress.

    Raises:
        RolloutError: the state file is unreadable.
    """
    path = state_paths(repo, model).state
    if not path.is_file():
        return None
    try:
        return RolloutState.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise RolloutError(
            f"{path}: unreadable rollout state ({exc}); fix or remove it", model=model
        ) from exc


def rollouts_in(repo: str | os.PathLike[str]) -> dict[str, RolloutState]:
    """Every rollout in progress in ``repo``: model name -> its state (unreadable states left out)."""
    root = Path(repo)
    found: dict[str, RolloutState] = {}
    if not root.is_dir():
        return found
    for path in sorted(root.glob(f"{STATE_PREFIX}*.json")):
        model = path.name[len(STATE_PREFIX) : -len(".json")]
        if ".stats-" in model:
            continue
        with contextlib.suppress(RolloutError):
            state = load_state(root, model)
            if state is not None:
                found[model] = state
    return found


def save_state(repo: str | os.PathLike[str], state: RolloutState) -> None:
    write_json_atomic(state_paths(repo, state.model).state, state.as_dict())


@contextlib.contextmanager
def controller_lock(repo: str | os.PathLike[str], model: str) -> Iterator[None]:
    """Hold the controller lock of ``model``'s rollout.

    Raises:
        RolloutError: another controller holds it (a live process: the lock dies with its holder).
    """
    path = state_paths(repo, model).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole rollout
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RolloutError(
                f"the rollout of '{model}' is being driven by {holder}; steer it with `tritonforge rollout "
                f"pause|resume|abort {model}`",
                model=model,
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


def controller_running(repo: str | os.PathLike[str], model: str) -> bool:
    """Whether a live process drives ``model``'s rollout (holds its lock)."""
    path = state_paths(repo, model).lock
    if not path.exists():
        return False
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def request_control(
    repo: str | os.PathLike[str], model: str, command: str, reason: str | None = None
) -> None:
    """Ask the running controller to ``pause``, ``resume`` or ``abort`` (with the operator's reason)."""
    write_json_atomic(
        state_paths(repo, model).control, {"command": command, "pid": os.getpid(), "reason": reason}
    )


def take_control_request(repo: str | os.PathLike[str], model: str) -> tuple[str, str | None] | None:
    """The pending request as ``(command, reason)``, removed once read; None when there is none."""
    path = state_paths(repo, model).control
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    command = data.get("command")
    return (str(command), data.get("reason")) if command else None


@dataclasses.dataclass(frozen=True)
class Heartbeat:
    """The last beat of a rollout's controller: its pid, when it beat, and whether it still holds the lock."""

    pid: int
    at: float
    alive: bool

    @property
    def age_s(self) -> float:
        return max(0.0, time.time() - self.at)


def beat(repo: str | os.PathLike[str], model: str) -> None:
    """Record that this process drives ``model``'s rollout, now."""
    write_json_atomic(state_paths(repo, model).heartbeat, {"pid": os.getpid(), "at": time.time()})


def stop_beating(repo: str | os.PathLike[str], model: str) -> None:
    """The controller stops cleanly: no heartbeat left to be taken for a crash."""
    with contextlib.suppress(FileNotFoundError):
        state_paths(repo, model).heartbeat.unlink()


def read_heartbeat(repo: str | os.PathLike[str], model: str) -> Heartbeat | None:
    """The controller's last beat (None when none is recorded: never started, or stopped cleanly)."""
    try:
        data = json.loads(state_paths(repo, model).heartbeat.read_text(encoding="utf-8"))
        return Heartbeat(int(data["pid"]), float(data["at"]), controller_running(repo, model))
    except (OSError, ValueError, KeyError, TypeError):
        return None
