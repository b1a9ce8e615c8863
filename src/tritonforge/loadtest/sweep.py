"""Sweeps like perf_analyzer's: closed-loop concurrency or open-loop request rate, windows until stable.

The load comes from one injected coroutine function, ``send()``, that sends one request and raises if it
fails; the sweep knows nothing else about the client. Each level (a concurrency, or a request rate) is
measured in windows of ``window_s`` until the last ``stable_windows`` agree within ``stability_percent``
(throughput and mean latency, as perf_analyzer does), or ``max_windows`` have run (the level is then
marked unstable). The level's figures are those of the stable windows merged. With a ``stats`` source,
Triton's counters are snapshotted at each window's edges, giving the server-side split (queue, compute
input / infer / output) per model and the server's own request count over the same window.

Example:
    >>> settings = SweepSettings(concurrency=(1, 4))
    >>> result = asyncio.run(run_sweep(send, settings, model="mlp"))  # doctest: +SKIP
    >>> result.levels[-1].throughput_rps                                                      # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from tritonforge.errors import ServerGone
from tritonforge.loadtest.stats import Counters, ServerSplit, splits

__all__ = [
    "LevelResult",
    "Send",
    "StatsSource",
    "SweepResult",
    "SweepSettings",
    "WindowResult",
    "run_sweep",
]

Send = Callable[[], Awaitable[Any]]
Mode = Literal["concurrency", "request_rate"]
PERCENTILES = (50, 90, 95, 99)


class StatsSource(Protocol):
    models: tuple[str, ...]

    async def snapshot(self) -> dict[str, Counters]: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepSettings:
    """What to sweep and how long to measure.

    Give ``concurrency`` levels (closed loop: each of N workers sends its next request when the last one
    answered) or ``request_rates`` (open loop: requests leave on a fixed schedule, whatever the answers).
    """

    concurrency: Sequence[int] = ()
    request_rates: Sequence[float] = ()
    window_s: float = 2.0
    stability_percent: float = 10.0
    stable_windows: int = 3
    max_windows: int = 10
    warmup_s: float = 0.5
    max_outstanding: int = 1024

    def __post_init__(self) -> None:
        object.__setattr__(self, "concurrency", tuple(int(c) for c in self.concurrency))
        object.__setattr__(self, "request_rates", tuple(float(r) for r in self.request_rates))
        if bool(self.concurrency) == bool(self.request_rates):
            raise ValueError("give either concurrency levels or request rates (not both, not neither)")
        if any(c < 1 for c in self.concurrency) or any(r <= 0 for r in self.request_rates):
            raise ValueError("concurrency levels must be >= 1 and request rates > 0")
        if self.window_s <= 0 or self.stable_windows < 1 or self.max_windows < self.stable_windows:
            raise ValueError("need window_s > 0 and 1 <= stable_windows <= max_windows")

    @property
    def mode(self) -> Mode:
        return "concurrency" if self.concurrency else "request_rate"

    @property
    def levels(self) -> tuple[float, ...]:
        return tuple(self.concurrency) if self.concurrency else tuple(self.request_rates)


@dataclasses.dataclass
class WindowResult:
    """One measurement window: what the client saw, and what Triton counted over the same span."""

    duration_s: float
    latencies_s: list[float]
    errors: int
    error_samples: list[str]
    server: dict[str, ServerSplit]

    @property
    def throughput_rps(self) -> float:
        return len(self.latencies_s) / self.duration_s

    @property
    def mean_latency_s(self) -> float:
        return float(np.mean(self.latencies_s)) if self.latencies_s else math.inf


@dataclasses.dataclass
class LevelResult:
    """One level of a sweep, from its stable windows merged (or its last ones, when it never settled)."""

    mode: Mode
    level: float
    throughput_rps: float
    server_throughput_rps: float | None
    requests: int
    errors: int
    latency_ms: dict[str, float]
    stable: bool
    windows: int
    window_throughputs: list[float]
    server: dict[str, dict[str, float]]
    error_samples: list[str] = dataclasses.field(default_factory=list)
    not_sent: int = 0

    @property
    def p99_ms(self) -> float:
        return self.latency_ms["p99"]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def row(self) -> dict[str, Any]:
        """A flat CSV row: the client figures, then ``<model>.<field>`` for each server-side model."""
        out: dict[str, Any] = {
            "mode": self.mode,
            "level": self.level,
            "throughput_rps": round(self.throughput_rps, 3),
            "server_throughput_rps": ""
            if self.server_throughput_rps is None
            else round(self.server_throughput_rps, 3),
            **{f"{k}_ms": round(v, 4) for k, v in self.latency_ms.items()},
            "requests": self.requests,
            "errors": self.errors,
            "stable": self.stable,
            "windows": self.windows,
            "not_sent": self.not_sent,
        }
        for model, fields in self.server.items():
            for key, value in fields.items():
                out[f"{model}.{key}"] = round(value, 3) if isinstance(value, float) else value
        return out


@dataclasses.dataclass
class SweepResult:
    """A whole sweep. ``stopped_at`` says where and why it stopped early; the levels done are kept."""

    model: str
    mode: Mode
    settings: dict[str, Any]
    levels: list[LevelResult] = dataclasses.field(default_factory=list)
    stopped_at: str | None = None
    server_models: tuple[str, ...] = ()
    label: str = ""

    @property
    def complete(self) -> bool:
        return self.stopped_at is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "label": self.label,
            "mode": self.mode,
            "settings": self.settings,
            "server_models": list(self.server_models),
            "stopped_at": self.stopped_at,
            "levels": [level.as_dict() for level in self.levels],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepResult:
        return cls(
            model=data["model"],
            mode=data["mode"],
            settings=dict(data["settings"]),
            levels=[LevelResult(**level) for level in data["levels"]],
            stopped_at=data.get("stopped_at"),
            server_models=tuple(data.get("server_models", ())),
            label=data.get("label", ""),
        )


# -- the load ---------------------------------------------------------------------------------------------


class _Load:
    """Runs the load for one level and keeps each answer as (end time, latency, error)."""

    def __init__(self, send: Send, mode: Mode, level: float, max_outstanding: int) -> None:
        self.send = send
        self.mode = mode
        self.level = level
        self.max_outstanding = max_outstanding
        self.records: list[tuple[float, float, str | None]] = []
        self.not_sent = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    async def _one(self) -> None:
        start = time.perf_counter()
        error: str | None = None
        try:
            await self.send()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is a data point: counted, a few kept verbatim
            error = f"{type(exc).__name__}: {exc}"[:300]
        end = time.perf_counter()
        self.records.append((end, end - start, error))
        if error is not None:
            # a send that fails before any I/O (a client-side check) never yields: let the loop breathe
            await asyncio.sleep(0)

    async def _worker(self) -> None:
        while not self._stop.is_set():
            await self._one()

    async def _schedule(self) -> None:
        interval = 1.0 / self.level
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stop.is_set():
            next_at += interval
            delay = next_at - loop.time()
            if delay > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                if self._stop.is_set():
                    return
            if len(self._tasks) >= self.max_outstanding + 1:  # +1: this scheduler task
                self.not_sent += 1
                continue
            self._spawn(self._one())

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        if self.mode == "concurrency":
            for _ in range(int(self.level)):
                self._spawn(self._worker())
        else:
            self._spawn(self._schedule())

    def take(self, start: float, end: float) -> list[tuple[float, float, str | None]]:
        """The answers that arrived in [start, end); older ones are dropped."""
        taken = [r for r in self.records if start <= r[0] < end]
        self.records = [r for r in self.records if r[0] >= end]
        return taken

    async def stop(self, grace_s: float = 5.0) -> None:
        self._stop.set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


_UNAVAILABLE = ("UNAVAILABLE", "Unavailable", "failed to connect", "Connection refused")


async def _edge(stats: StatsSource | None) -> tuple[float, dict[str, Counters] | None]:
    """A window edge: the time, and Triton's counters at (about) that time."""
    if stats is None:
        return time.perf_counter(), None
    before = time.perf_counter()
    try:
        snapshot = await asyncio.wait_for(stats.snapshot(), timeout=10)
    except Exception as exc:
        raise ServerGone(f"the server's statistics are unreachable ({type(exc).__name__}: {exc})") from exc
    return (before + time.perf_counter()) / 2, snapshot


async def _window(
    load: _Load, stats: StatsSource | None, window_s: float, start: tuple[float, Any]
) -> tuple[WindowResult, tuple[float, Any]]:
    await asyncio.sleep(window_s)
    end = await _edge(stats)
    records = load.take(start[0], end[0])
    errors = [r[2] for r in records if r[2] is not None]
    samples = list(dict.fromkeys(errors))[:3]
    server = splits(start[1], end[1]) if start[1] is not None and end[1] is not None else {}
    window = WindowResult(
        duration_s=end[0] - start[0],
        latencies_s=[r[1] for r in records if r[2] is None],
        errors=len(errors),
        error_samples=samples,
        server=server,
    )
    if errors and not window.latencies_s and all(any(u in e for u in _UNAVAILABLE) for e in errors):
        raise ServerGone(f"every request failed as unavailable ({samples[0]})")
    return window, end


def _stable(windows: Sequence[WindowResult], count: int, percent: float) -> bool:
    if len(windows) < count:
        return False
    last = windows[-count:]
    for values in ([w.throughput_rps for w in last], [w.mean_latency_s for w in last]):
        mean = float(np.mean(values))
        if not math.isfinite(mean) or mean == 0:
            return False
        if any(abs(v - mean) > mean * percent / 100 for v in values):
            return False
    return True


def _merge(
    mode: Mode, level: float, windows: Sequence[WindowResult], stable: bool, total_windows: int, not_sent: int
) -> LevelResult:
    duration = sum(w.duration_s for w in windows)
    latencies = np.array([v for w in windows for v in w.latencies_s]) * 1e3
    if latencies.size:
        latency = {f"p{p}": float(np.percentile(latencies, p)) for p in PERCENTILES}
        latency["mean"] = float(latencies.mean())
    else:
        latency = {**{f"p{p}": math.inf for p in PERCENTILES}, "mean": math.inf}
    server: dict[str, dict[str, float]] = {}
    server_rps: float | None = None
    if windows and windows[0].server:
        for model in windows[0].server:
            parts = [w.server[model] for w in windows if model in w.server]
            requests = sum(p.requests for p in parts)

            def avg(field: str, parts: list[ServerSplit] = parts, requests: int = requests) -> float:
                return sum(getattr(p, field) * p.requests for p in parts) / requests if requests else 0.0

            executions = sum(p.executions for p in parts)
            inferences = sum(p.inferences for p in parts)
            server[model] = {
                "requests": requests,
                "failed": sum(p.failed for p in parts),
                "inferences": inferences,
                "executions": executions,
                "mean_batch": inferences / executions if executions else 0.0,
                **{
                    f: avg(f)
                    for f in (
                        "request_us",
                        "queue_us",
                        "compute_input_us",
                        "compute_infer_us",
                        "compute_output_us",
                    )
                },
            }
        first = next(iter(server))
        server_rps = server[first]["requests"] / duration
    errors = sum(w.errors for w in windows)
    samples = list(dict.fromkeys(s for w in windows for s in w.error_samples))[:3]
    return LevelResult(
        mode=mode,
        level=level,
        throughput_rps=len(latencies) / duration if duration else 0.0,
        server_throughput_rps=server_rps,
        requests=int(latencies.size),
        errors=errors,
        latency_ms=latency,
        stable=stable,
        windows=total_windows,
        window_throughputs=[round(w.throughput_rps, 3) for w in windows],
        server=server,
        error_samples=samples,
        not_sent=not_sent,
    )


Event = Callable[[str, Mapping[str, Any]], None]


async def run_level(
    send: Send,
    settings: SweepSettings,
    level: float,
    *,
    stats: StatsSource | None = None,
    on_event: Event | None = None,
) -> LevelResult:
    """Measure one level until stable (or ``max_windows``).

    Raises:
        ServerGone: the server stopped answering; the message says in which window.
    """
    mode = settings.mode
    load = _Load(send, mode, level, settings.max_outstanding)
    windows: list[WindowResult] = []
    load.start()
    try:
        if settings.warmup_s > 0:
            await asyncio.sleep(settings.warmup_s)
        try:
            edge = await _edge(stats)
        except ServerGone as exc:
            raise ServerGone(f"{mode} {level:g}, before window 1: {exc}") from exc
        while len(windows) < settings.max_windows:
            try:
                window, edge = await _window(load, stats, settings.window_s, edge)
            except ServerGone as exc:
                raise ServerGone(f"{mode} {level:g}, window {len(windows) + 1}: {exc}") from exc
            windows.append(window)
            if on_event:
                on_event(
                    "window",
                    {
                        "level": level,
                        "window": len(windows),
                        "throughput_rps": window.throughput_rps,
                        "max_windows": settings.max_windows,
                    },
                )
            if _stable(windows, settings.stable_windows, settings.stability_percent):
                break
    finally:
        await load.stop()
    stable = _stable(windows, settings.stable_windows, settings.stability_percent)
    return _merge(mode, level, windows[-settings.stable_windows :], stable, len(windows), load.not_sent)


async def run_sweep(
    send: Send,
    settings: SweepSettings,
    *,
    model: str,
    stats: StatsSource | None = None,
    on_event: Event | None = None,
    on_level: Callable[[SweepResult], None] | None = None,
    label: str = "",
) -> SweepResult:
    """Every level of ``settings`` in turn. A server that stops answering ends the sweep early:
    ``stopped_at`` says where, and the levels measured so far are kept. ``on_level`` is called with the
    partial result after each level (to write it out as it grows)."""
    result = SweepResult(
        model=model,
        mode=settings.mode,
        settings=dataclasses.asdict(settings),
        server_models=tuple(stats.models) if stats is not None else (),
        label=label,
    )
    for level in settings.levels:
        if on_event:
            on_event("level", {"level": level, "index": len(result.levels), "count": len(settings.levels)})
        try:
            result.levels.append(await run_level(send, settings, level, stats=stats, on_event=on_event))
        except ServerGone as exc:
            result.stopped_at = str(exc)
            break
        finally:
            if on_level:
                on_level(result)
    return result
