"""Triton's cumulative per-model counters (its statistics API) and the per-request split of a window.

Shared by the load tester (protobuf answers of ``tritonclient.grpc.aio``) and batch runs (the JSON answers
of :meth:`AsyncClient.model_statistics`): both diff two snapshots the same way, into one
:class:`ServerSplit` per model. No I/O here::

    before = Counters.from_dict(stats_before["model_stats"][0])
    after = Counters.from_dict(stats_after["model_stats"][0])
    print(split(before, after, model="clf").queue_us)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["Counters", "ServerSplit", "split"]


@dataclasses.dataclass(frozen=True)
class Counters:
    """One model's cumulative counters (all versions summed), as Triton reports them."""

    success: int = 0
    success_ns: int = 0
    fail: int = 0
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0
    inference_count: int = 0
    execution_count: int = 0

    def __add__(self, other: Counters) -> Counters:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return Counters(*(a + b for a, b in pairs))

    def __sub__(self, other: Counters) -> Counters:
        pairs = zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
        return Counters(*(a - b for a, b in pairs))

    @classmethod
    def from_proto(cls, stat: Any) -> Counters:
        """From one ``ModelStatistics`` protobuf message."""
        s = stat.inference_stats
        return cls(
            success=int(s.success.count),
            success_ns=int(s.success.ns),
            fail=int(s.fail.count),
            queue_ns=int(s.queue.ns),
            compute_input_ns=int(s.compute_input.ns),
            compute_infer_ns=int(s.compute_infer.ns),
            compute_output_ns=int(s.compute_output.ns),
            inference_count=int(stat.inference_count),
            execution_count=int(stat.execution_count),
        )

    @classmethod
    def from_dict(cls, stat: Mapping[str, Any]) -> Counters:
        """From one entry of ``model_stats`` in the JSON form (missing fields count as 0)."""
        s = stat.get("inference_stats", {})

        def field(name: str, key: str) -> int:
            return int(s.get(name, {}).get(key, 0))

        return cls(
            success=field("success", "count"),
            success_ns=field("success", "ns"),
            fail=field("fail", "count"),
            queue_ns=field("queue", "ns"),
            compute_input_ns=field("compute_input", "ns"),
            compute_infer_ns=field("compute_infer", "ns"),
            compute_output_ns=field("compute_output", "ns"),
            inference_count=int(stat.get("inference_count", 0)),
            execution_count=int(stat.get("execution_count", 0)),
        )


@dataclasses.dataclass(frozen=True)
class ServerSplit:
    """Where one model's requests spent their time on the server during a window (µs per request):
    requests answered and failed, inferences (rows) and model executions, and the mean time per request
    end to end, queued, and in compute (input, infer, output). ``model``: whose requests (``""`` when the
    caller keeps the name elsewhere, e.g. as a dict key)."""

    requests: int
    failed: int
    inferences: int
    executions: int
    request_us: float
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float
    model: str = ""

    @property
    def mean_batch(self) -> float:
        """Inferences per model execution: how well the dynamic batcher grouped requests."""
        return self.inferences / self.executions if self.executions else 0.0

    def as_dict(self) -> dict[str, float]:
        """The figures by name (``model`` left out: the caller keys them by model)."""
        out: dict[str, float] = dataclasses.asdict(self)
        del out["model"]
        out["mean_batch"] = round(self.mean_batch, 3)
        return out


def split(before: Counters, after: Counters, model: str = "") -> ServerSplit:
    """The per-request averages of ``model`` between two snapshots of its counters."""
    d = after - before
    per = (lambda ns: ns / d.success / 1e3) if d.success else (lambda ns: 0.0)
    return ServerSplit(
        requests=d.success,
        failed=d.fail,
        inferences=d.inference_count,
        executions=d.execution_count,
        request_us=per(d.success_ns),
        queue_us=per(d.queue_ns),
        compute_input_us=per(d.compute_input_ns),
        compute_infer_us=per(d.compute_infer_ns),
        compute_output_us=per(d.compute_output_ns),
        model=model,
    )
