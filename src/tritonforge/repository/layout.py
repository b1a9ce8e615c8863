"""Serving layouts chosen by measurement: how many instances, and how many intra-op threads each.

A model on a CPU server can run as one instance using every core per call (the *latency* layout), or as
several single-threaded instances working side by side (the *throughput* layout), or in between. Which
serves more depends on the model and the machine: a small or INT8 model often gains from parallel
instances, a large FP32 one from threads. :func:`choose_layout` measures each candidate the way our
onnxruntime backend runs it (same session options: threads named, spinning off), every instance busy at
once, in alternating rounds, and keeps the fastest; the choice and its figures go into the manifest.

Example:
    >>> choice = choose_layout("model.onnx", {"x": x})       # doctest: +SKIP
    >>> config = choice.apply(config)                         # doctest: +SKIP
    >>> manifest_extra = {"layout": choice.as_manifest()}     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.config import ModelConfig
from tritonforge.repository.threads import available_cpus, with_layout

__all__ = ["Layout", "LayoutChoice", "candidate_layouts", "choose_layout", "layout_key"]

#: a candidate must beat a leaner one (fewer threads in all, then fewer instances) by this much to be
#: chosen: more threads take cores from the server's other models, and rounds on a busy machine wander by
#: several per cent
MIN_GAIN = 0.10


@dataclasses.dataclass(frozen=True)
class Layout:
    """``instances`` model instances of ``intra_op_threads`` threads each."""

    instances: int
    intra_op_threads: int

    @property
    def label(self) -> str:
        return f"{self.instances} x {self.intra_op_threads} thread{'s' if self.intra_op_threads > 1 else ''}"


@dataclasses.dataclass(frozen=True)
class LayoutChoice:
    """The layout chosen, and the rows per second every candidate served in each round."""

    chosen: Layout
    rows_per_s: Mapping[Layout, tuple[float, ...]]
    cpus: int
    workload: str

    def median(self, layout: Layout) -> float:
        return statistics.median(self.rows_per_s[layout])

    @property
    def reason(self) -> str:
        others = [layout for layout in self.rows_per_s if layout != self.chosen]
        best = self.median(self.chosen)
        against = ", ".join(f"{o.label} {self.median(o):.1f}" for o in others)
        return (
            f"{self.chosen.label} served {best:.1f} rows/s (median of {len(self.rows_per_s[self.chosen])} "
            f"alternating rounds, {self.workload}, {self.cpus} CPUs) against {against}"
        )

    def as_manifest(self) -> dict[str, Any]:
        """The manifest record: what was chosen, why, and every candidate's rounds."""
        return {
            "instances": self.chosen.instances,
            "intra_op_threads": self.chosen.intra_op_threads,
            "why": self.reason,
            "cpus": self.cpus,
            "workload": self.workload,
            "method": "choose_layout: in-process onnxruntime sessions as our backend runs them, every "
            "instance busy at once, alternating rounds",
            "measured_rows_per_s": {
                layout.label: [round(v, 2) for v in values] for layout, values in self.rows_per_s.items()
            },
        }

    def apply(self, config: ModelConfig) -> ModelConfig:
        """``config`` with the chosen instance count and intra-op threads (spinning off).

        Raises:
            ValueError: the config's platform is not one our backends thread.
        """
        return with_layout(config, self.chosen.instances, self.chosen.intra_op_threads)


def candidate_layouts(cpus: int) -> list[Layout]:
    """One single-threaded instance (the leanest, where a small model ends up: its calls are too short to
    share out), one instance on every CPU, one single-threaded instance per CPU, and halves in between."""
    if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
        raise ValueError(f"cpus must be a positive integer, got {cpus!r}")
    found = [Layout(1, 1), Layout(1, cpus), Layout(cpus, 1)]
    if cpus >= 4:
        found.append(Layout(2, cpus // 2))
    return list(dict.fromkeys(found))


def layout_key(cpus: int | None = None) -> dict[str, Any]:
    """What a measured layout depends on besides the model: the CPUs, the candidates and the rule.

    A build key holding it measures anew on a machine with another CPU count or after the rule changes,
    and reuses the recorded layout otherwise.
    """
    cpus = available_cpus() if cpus is None else cpus
    return {
        "layout_cpus": cpus,
        "layout_candidates": [layout.label for layout in candidate_layouts(cpus)],
        "layout_min_gain": MIN_GAIN,
    }


def _sessions(model: Path, layout: Layout) -> list[Any]:
    import onnxruntime as ort

    sessions = []
    for _ in range(layout.instances):
        options = ort.SessionOptions()
        options.intra_op_num_threads = layout.intra_op_threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        sessions.append(
            ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
        )
    return sessions


def _rows_per_s(
    sessions: Sequence[Any], feeds: Mapping[str, np.ndarray], rows: int, duration_s: float
) -> float:
    done = [0] * len(sessions)
    start = time.perf_counter()
    stop_at = start + duration_s

    def work(i: int) -> None:
        session = sessions[i]
        while time.perf_counter() < stop_at:
            session.run(None, dict(feeds))  # onnxruntime lets go of the GIL while it runs
            done[i] += rows

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - start)


def _weight(layout: Layout) -> tuple[int, int]:
    return (layout.instances * layout.intra_op_threads, layout.instances)


def choose_layout(
    model: str | os.PathLike[str],
    feeds: Mapping[str, np.ndarray],
    *,
    cpus: int | None = None,
    rounds: int = 3,
    duration_s: float = 0.5,
    candidates: Sequence[Layout] | None = None,
    queued: int = 1,
) -> LayoutChoice:
    """Measure each candidate layout on ``feeds`` (one request's inputs) and choose the fastest.

    Every instance of a layout runs ``feeds`` in a loop at the same time for ``duration_s``; the
    candidates alternate round by round (ABBA...), and the highest median wins unless a leaner layout
    (fewer threads in all, then fewer instances) is within ``MIN_GAIN`` of it.

    ``queued`` > 1 measures a model whose requests batch: that many requests wait at once and a layout's
    instances share them, as Triton's dynamic batcher hands each free instance what is queued — each call
    runs ``queued // instances`` requests (at least one) stacked into one batch. A single instance then
    batches more per call, which is what its threads are for.

    Raises:
        ValueError: ``feeds`` is empty, or ``rounds`` / ``duration_s`` / ``cpus`` / ``queued`` is not
            positive.
    """
    if not feeds:
        raise ValueError("feeds must hold the model's inputs (one request's worth)")
    if rounds < 1 or duration_s <= 0 or queued < 1:
        raise ValueError(
            f"rounds and queued must be >= 1 and duration_s > 0, got {rounds!r}, {queued!r}, {duration_s!r}"
        )
    cpus = available_cpus() if cpus is None else cpus
    layouts = list(candidates) if candidates else candidate_layouts(cpus)
    rows = int(next(iter(feeds.values())).shape[0]) if next(iter(feeds.values())).ndim else 1
    share = {layout: max(1, queued // layout.instances) for layout in layouts}
    batches = {
        n: {name: np.concatenate([array] * n) if n > 1 else array for name, array in feeds.items()}
        for n in set(share.values())
    }
    sessions = {layout: _sessions(Path(model), layout) for layout in layouts}
    for layout in layouts:  # warm each once: first runs allocate
        for session in sessions[layout]:
            session.run(None, dict(batches[share[layout]]))
    measured: dict[Layout, list[float]] = {layout: [] for layout in layouts}
    for r in range(rounds):
        order = layouts if r % 2 == 0 else list(reversed(layouts))
        for layout in order:
            n = share[layout]
            measured[layout].append(_rows_per_s(sessions[layout], batches[n], rows * n, duration_s))
    medians = {layout: statistics.median(values) for layout, values in measured.items()}
    best = max(medians, key=lambda layout: medians[layout])
    # the leanest layout within MIN_GAIN of the fastest: fewer threads in all (they fight the other models
    # of the server for the cores), then fewer instances (less memory)
    for layout in sorted(layouts, key=_weight):
        if _weight(layout) < _weight(best) and medians[layout] >= medians[best] * (1 - MIN_GAIN):
            best = layout
            break
    shapes = ", ".join(f"{name} {list(array.shape)}" for name, array in feeds.items())
    return LayoutChoice(
        chosen=best,
        rows_per_s={layout: tuple(values) for layout, values in measured.items()},
        cpus=cpus,
        workload=f"requests of {shapes}"
        + (f", {queued} waiting at once, shared by the instances in batches" if queued > 1 else ""),
    )
