"""What the benchmarks share: summarising a closed-loop run's latencies, finding perf_analyzer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

#: perf_analyzer beside the project (a checkout next to a ``shared/tools/`` folder)
BESIDE_PROJECT = Path(__file__).resolve().parent.parent.parent / "shared" / "tools" / "perf_analyzer"


def find_perf_analyzer(given: str | None = None) -> str | None:
    """perf_analyzer: ``given``, ``$PERF_ANALYZER``, on ``PATH`` or in ``../shared/tools/``; else None."""
    found = (given, os.environ.get("PERF_ANALYZER"), shutil.which("perf_analyzer"), str(BESIDE_PROJECT))
    for candidate in found:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def summary(latencies: list[float], duration_s: float) -> dict[str, float]:
    """Throughput (requests/s over the window) and p50/p99 in milliseconds of latencies in seconds."""
    ms = np.array(latencies) * 1e3
    return {
        "throughput": len(latencies) / duration_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }
