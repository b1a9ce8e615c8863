"""What the benchmarks share: summarising a closed-loop run's latencies."""

from __future__ import annotations

import numpy as np


def summary(latencies: list[float], duration_s: float) -> dict[str, float]:
    """Throughput (requests/s over the window) and p50/p99 in milliseconds of latencies in seconds."""
    ms = np.array(latencies) * 1e3
    return {
        "throughput": len(latencies) / duration_s,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }
