"""Live evidence for one rollout step and the verdict on it.

Two sources, both read as cumulative counters and differenced over the step's window:

* Triton's per-version statistics of the rollout's twin model (success / fail counts and the mean
  compute time of the stable and the candidate version), through the client's ``model_statistics``;
* the splitter's own counters (calls, errors incl. timeouts, a latency histogram per arm, and how many
  mirrored rows agreed), because Triton's statistics carry no percentiles and no output comparison.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tritonforge.rollout.state import Thresholds

__all__ = ["Evidence", "Snapshot", "judge", "read_snapshot"]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Cumulative counters at one moment."""

    arms: dict[str, dict[str, Any]]
    compared: int
    agreed: int
    triton: dict[str, dict[str, float]]
    disagreements: tuple[dict[str, Any], ...] = ()
    bounds_ms: tuple[float, ...] = ()


def _empty_arm(buckets: int) -> dict[str, Any]:
    return {"calls": 0, "errors": 0, "timeouts": 0, "hist": [0] * buckets}


def _sum_stats(
    files: list[Path],
) -> tuple[dict[str, dict[str, Any]], int, int, list[dict[str, Any]], list[float]]:
    arms: dict[str, dict[str, Any]] = {}
    compared = agreed = 0
    disagreements: list[dict[str, Any]] = []
    bounds: list[float] = []
    for file in files:
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being replaced right now; the next read has it
        bounds = record.get("bounds_ms", bounds)
        compared += int(record.get("compared", 0))
        agreed += int(record.get("agreed", 0))
        disagreements.extend(record.get("disagreements", []))
        for name, arm in record.get("arms", {}).items():
            total = arms.setdefault(name, _empty_arm(len(arm["hist"])))
            for key in ("calls", "errors", "timeouts"):
                total[key] += int(arm.get(key, 0))
            total["hist"] = [a + b for a, b in zip(total["hist"], arm["hist"], strict=True)]
    return arms, compared, agreed, disagreements, bounds


def _triton_counts(client: Any, twin: str, versions: dict[str, int]) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, float]] = {}
    for arm, version in versions.items():
        try:
            stats = client.model_statistics(twin, version).get("model_stats", [])
        except Exception:
            stats = []
        entry = stats[0].get("inference_stats", {}) if stats else {}
        success = entry.get("success", {})
        fail = entry.get("fail", {})
        compute = entry.get("compute_infer", {})
        counts[arm] = {
            "success": float(success.get("count", 0)),
            "fail": float(fail.get("count", 0)),
            "compute_ns": float(compute.get("ns", 0)),
            "compute_count": float(compute.get("count", 0)),
        }
    return counts


def read_snapshot(stats_files: list[Path], client: Any, twin: str, stable: int, candidate: int) -> Snapshot:
    """The counters now: the splitter's ``stats_files`` summed, and Triton's for the twin."""
    arms, compared, agreed, disagreements, bounds = _sum_stats(stats_files)
    triton = _triton_counts(client, twin, {"stable": stable, "candidate": candidate}) if client else {}
    return Snapshot(arms, compared, agreed, triton, tuple(disagreements[-5:]), tuple(bounds))


def _percentile(hist: list[int], bounds: tuple[float, ...], q: float) -> float | None:
    total = sum(hist)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(hist):
        seen += count
        if seen >= rank:
            return bounds[i] if i < len(bounds) else float("inf")
    return float("inf")


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What happened between two snapshots, per arm, and the verdict on it."""

    candidate_calls: int
    candidate_errors: int
    candidate_timeouts: int
    stable_calls: int
    stable_errors: int
    candidate_p99_ms: float | None
    stable_p99_ms: float | None
    compared_rows: int
    agreed_rows: int
    triton: dict[str, dict[str, float]]
    disagreements: tuple[dict[str, Any], ...] = ()

    @property
    def error_rate(self) -> float:
        """The candidate's failed share: the larger of the splitter's count and Triton's."""
        ours = self.candidate_errors / self.candidate_calls if self.candidate_calls else 0.0
        t = self.triton.get("candidate", {})
        total = t.get("success", 0.0) + t.get("fail", 0.0)
        theirs = t.get("fail", 0.0) / total if total else 0.0
        return max(ours, theirs)

    @property
    def agreement(self) -> float | None:
        return self.agreed_rows / self.compared_rows if self.compared_rows else None

    def as_dict(self) -> dict[str, Any]:
        def mean_ms(arm: str) -> float | None:
            t = self.triton.get(arm, {})
            return round(t["compute_ns"] / t["compute_count"] / 1e6, 3) if t.get("compute_count") else None

        return {
            "candidate_calls": self.candidate_calls,
            "candidate_errors": self.candidate_errors,
            "candidate_timeouts": self.candidate_timeouts,
            "stable_calls": self.stable_calls,
            "stable_errors": self.stable_errors,
            "error_rate": round(self.error_rate, 5),
            "candidate_p99_ms": None if self.candidate_p99_ms is None else round(self.candidate_p99_ms, 2),
            "stable_p99_ms": None if self.stable_p99_ms is None else round(self.stable_p99_ms, 2),
            "agreement": None if self.agreement is None else round(self.agreement, 5),
            "compared_rows": self.compared_rows,
            "triton_candidate": {
                k: int(v) for k, v in self.triton.get("candidate", {}).items() if k in ("success", "fail")
            },
            "triton_stable": {
                k: int(v) for k, v in self.triton.get("stable", {}).items() if k in ("success", "fail")
            },
            "candidate_compute_mean_ms": mean_ms("candidate"),
            "stable_compute_mean_ms": mean_ms("stable"),
            "disagreements": list(self.disagreements),
        }

    @classmethod
    def between(cls, before: Snapshot, after: Snapshot) -> Evidence:
        buckets = len(after.bounds_ms) + 1 if after.bounds_ms else 1

        def arm(name: str) -> dict[str, Any]:
            a = after.arms.get(name, _empty_arm(buckets))
            b = before.arms.get(name, _empty_arm(len(a["hist"])))
            hist = (
                [x - y for x, y in zip(a["hist"], b["hist"], strict=True)]
                if len(b["hist"]) == len(a["hist"])
                else a["hist"]
            )
            return {
                "calls": a["calls"] - b["calls"],
                "errors": a["errors"] - b["errors"],
                "timeouts": a["timeouts"] - b["timeouts"],
                "hist": hist,
            }

        cand, stab = arm("candidate"), arm("stable")
        triton = {
            name: {
                k: after.triton.get(name, {}).get(k, 0.0) - before.triton.get(name, {}).get(k, 0.0)
                for k in after.triton.get(name, {})
            }
            for name in after.triton
        }
        return cls(
            candidate_calls=cand["calls"],
            candidate_errors=cand["errors"],
            candidate_timeouts=cand["timeouts"],
            stable_calls=stab["calls"],
            stable_errors=stab["errors"],
            candidate_p99_ms=_percentile(cand["hist"], after.bounds_ms, 0.99),
            stable_p99_ms=_percentile(stab["hist"], after.bounds_ms, 0.99),
            compared_rows=after.compared - before.compared,
            agreed_rows=after.agreed - before.agreed,
            triton=triton,
            disagreements=after.disagreements
            if after.agreed - before.agreed < after.compared - before.compared
            else (),
        )


def judge(evidence: Evidence, limits: Thresholds, *, final: bool) -> tuple[str, list[str]]:
    """``("pass" | "fail" | "wait", reasons)`` for a step's evidence so far.

    Before the step's hold is over (``final`` false) only a breach decides ("fail") — at once, as soon as
    ``min_requests`` candidate calls show it; at the end a step passes only with enough calls.
    """
    breaches: list[str] = []
    enough = evidence.candidate_calls >= limits.min_requests
    if (
        evidence.candidate_calls
        and evidence.error_rate > limits.max_error_rate
        and (enough or evidence.candidate_errors > limits.max_error_rate * limits.min_requests)
    ):
        breaches.append(
            f"error rate {evidence.error_rate:.2%} > {limits.max_error_rate:.2%} "
            f"({evidence.candidate_errors} of {evidence.candidate_calls} candidate calls, "
            f"{evidence.candidate_timeouts} timed out)"
        )
    if (
        limits.max_p99_ms is not None
        and enough
        and evidence.candidate_p99_ms is not None
        and evidence.candidate_p99_ms > limits.max_p99_ms
    ):
        breaches.append(f"candidate p99 {evidence.candidate_p99_ms:.1f} ms > {limits.max_p99_ms:g} ms")
    agreement = evidence.agreement
    if (
        limits.min_agreement is not None
        and agreement is not None
        and evidence.compared_rows >= limits.min_requests
        and agreement < limits.min_agreement
    ):
        breaches.append(
            f"agreement with stable {agreement:.2%} < {limits.min_agreement:.2%} "
            f"({evidence.agreed_rows} of {evidence.compared_rows} mirrored rows)"
        )
    if breaches:
        return "fail", breaches
    if not final or not enough:
        return "wait", [f"{evidence.candidate_calls} of {limits.min_requests} candidate calls so far"]
    return "pass", []
