"""Replicas and instance counts for a target request rate, from a measured sweep (``tritonforge bench`` /
``tritonforge tune`` output), with the reasoning written down.

A sweep measures one server -- one pod. Its capacity is the best throughput among the levels with no
errors (and within the p99 budget, when one is given). Pods are planned to run at ``utilisation`` of that
capacity, so a pod lost to a rollout or a node drain doesn't push the others past it, and the autoscaler
has room to react before queues grow.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonforge.errors import DeployError
from tritonforge.files import read_text

__all__ = ["Sizing", "load_measurement", "size_for"]

DEFAULT_UTILISATION = 0.7
MIN_HA_REPLICAS = 2


@dataclasses.dataclass(frozen=True)
class Sizing:
    target_rps: float
    per_replica_rps: float
    at_level: float
    p99_ms: float
    utilisation: float
    replicas: int
    min_replicas: int
    max_replicas: int
    instances: dict[str, int]
    source: str
    reasons: list[str]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_measurement(path: str | Path) -> tuple[dict[str, Any], dict[str, int], str]:
    """The sweep to size from, the instance counts it was measured with (a tune's winner; empty for a
    plain bench), and a description. ``path``: ``sweep.json`` of ``bench`` or ``tune.json`` of ``tune``.

    Raises:
        DeployError: no such file, not JSON, no sweep in it, or a tune with no winner.
    """
    file = Path(path)
    text = read_text(file, what="measured sweep", error=DeployError)
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DeployError(f"can't read the measured sweep {file}: {exc}") from exc
    sweeps = data.get("sweeps") if isinstance(data, dict) else None
    if not sweeps:
        raise DeployError(f"{file} has no sweep: give the sweep.json of `tritonforge bench` or tune.json")
    tune = data.get("tune")
    if tune is None:
        sweep = sweeps[0]
        return sweep, {}, f"bench sweep of '{sweep['model']}' ({file})"
    winner = tune.get("winner")
    if not winner:
        raise DeployError(
            f"{file}: the tune found no config within its p99 budget, so there is nothing to size from"
        )
    for sweep in sweeps:
        if sweep.get("label") == winner["config"]:
            instances = {
                m: int(k["instances"]) for m, k in winner.get("knobs", {}).items() if "instances" in k
            }
            return sweep, instances, f"tune winner '{winner['config']}' of '{tune['model']}' ({file})"
    raise DeployError(f"{file}: no sweep labelled with the winner's config {winner['config']!r}")


def size_for(
    target_rps: float,
    sweep: Mapping[str, Any],
    *,
    p99_budget_ms: float | None = None,
    utilisation: float = DEFAULT_UTILISATION,
    instances: Mapping[str, int] | None = None,
    source: str = "sweep",
) -> Sizing:
    """Replicas for ``target_rps`` from one server's ``sweep`` (a ``SweepResult.as_dict()``).

    Raises:
        ValueError: a non-positive target or a utilisation outside (0, 1].
        DeployError: no level of the sweep was error-free (and within the budget).
    """
    if target_rps <= 0:
        raise ValueError(f"target rps must be > 0, got {target_rps}")
    if not 0 < utilisation <= 1:
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation}")
    levels = list(sweep.get("levels", []))
    usable = [
        lv
        for lv in levels
        if lv["errors"] == 0 and (p99_budget_ms is None or lv["latency_ms"]["p99"] <= p99_budget_ms)
    ]
    model = sweep.get("model", "?")
    if not usable:
        budget = "" if p99_budget_ms is None else f" within p99 <= {p99_budget_ms:g} ms"
        raise DeployError(
            f"no level of the sweep of '{model}' ran without errors{budget}; measure lower levels "
            "or relax the budget",
            model=model,
        )
    best = max(usable, key=lambda lv: lv["throughput_rps"])
    capacity = float(best["throughput_rps"])
    planned = capacity * utilisation
    needed = math.ceil(target_rps / planned)
    replicas = max(MIN_HA_REPLICAS, needed)
    max_replicas = max(replicas * 2, replicas + 2)
    mode = "concurrency" if sweep.get("mode", "concurrency") == "concurrency" else "request rate"
    reasons = [
        f"measured: {source}",
        f"one pod = one server: best {capacity:,.1f} infer/s at {mode} {best['level']:g} "
        f"(p99 {best['latency_ms']['p99']:.1f} ms, no errors"
        + ("" if p99_budget_ms is None else f", within the {p99_budget_ms:g} ms budget")
        + f"; {len(usable)} of {len(levels)} levels usable)",
        f"planned at {utilisation:.0%} of that: {planned:,.1f} infer/s per pod",
        f"{target_rps:,.1f} / {planned:,.1f} = {target_rps / planned:.2f} -> {needed} pod(s)",
    ]
    if replicas > needed:
        reasons.append(f"raised to {replicas}: two pods at least, so a drain or rollout never stops serving")
    reasons.append(f"autoscaling range {MIN_HA_REPLICAS}..{max_replicas} (twice the plan, for bursts)")
    counts = dict(instances or {})
    if counts:
        reasons.append(
            "instances per model as measured: " + ", ".join(f"{m}={n}" for m, n in sorted(counts.items()))
        )
    return Sizing(
        target_rps=float(target_rps),
        per_replica_rps=capacity,
        at_level=float(best["level"]),
        p99_ms=float(best["latency_ms"]["p99"]),
        utilisation=utilisation,
        replicas=replicas,
        min_replicas=MIN_HA_REPLICAS,
        max_replicas=max_replicas,
        instances=counts,
        source=source,
        reasons=reasons,
    )
