"""What a batch run did: :class:`BatchResult` (rows, shards, latencies, the server's own view) and the
process exit codes it maps to. No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tritonforge.client.stats import ServerSplit

__all__ = [
    "EXIT_FAILED_ROWS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TOO_MANY_FAILURES",
    "BatchResult",
    "ServerSplit",
    "latency_summary",
]

EXIT_OK = 0
EXIT_FAILED_ROWS = 3  # finished; some rows are in the errors files
EXIT_TOO_MANY_FAILURES = 4  # stopped at --max-errors; finished shards kept
EXIT_INTERRUPTED = 143  # SIGTERM / SIGINT: stopped cleanly; run again to resume


@dataclass
class BatchResult:
    """What a run did. ``status``: ``complete``, ``interrupted`` or ``too many failures``."""

    status: str
    output: Path
    rows_total: int  # rows of this process's shards
    rows_skipped: int  # already done by an earlier run
    rows_ok: int  # answered in this run
    rows_failed: int  # failed in this run
    shards_total: int
    shards_done: int  # finished shards, earlier runs included
    elapsed_s: float
    requests: int
    latencies_ms: dict[str, float]
    server: list[ServerSplit] = field(default_factory=list)
    failed_before: int = 0
    startup_s: float = 0.0  # from the call until the first request went out (reading, metadata, manifest)
    requests_streamed: int = 0  # of ``requests``, answered on a lane's stream (the rest: client calls)

    @property
    def rows_per_s(self) -> float:
        return (self.rows_ok + self.rows_failed) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.status == "interrupted":
            return EXIT_INTERRUPTED
        if self.status == "too many failures":
            return EXIT_TOO_MANY_FAILURES
        return EXIT_FAILED_ROWS if self.rows_failed + self.failed_before else EXIT_OK


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float]:
    """p50, p99 and mean of the requests' latencies, in ms (0 for a run that sent none)."""
    lat = np.array(latencies_s) * 1e3
    return {
        "p50": float(np.percentile(lat, 50)) if len(lat) else 0.0,
        "p99": float(np.percentile(lat, 99)) if len(lat) else 0.0,
        "mean": float(lat.mean()) if len(lat) else 0.0,
    }
