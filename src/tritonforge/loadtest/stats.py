"""Triton's server-side view of a window: counters from its statistics API, diffed, per model.

Triton keeps cumulative counters per model (requests, time queued, time in compute input / infer /
output). A window's server-side split is the difference of two snapshots taken at its edges. For an
ensemble the composing models are snapshotted too, so the split is shown step by step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["Counters", "ServerSplit", "TritonStats", "composing_models", "split"]

_FIELDS = ("queue", "compute_input", "compute_infer", "compute_output")


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


@dataclasses.dataclass(frozen=True)
class ServerSplit:
    """Where one model's requests spent their time on the server during a window (µs per request)."""

    requests: int
    failed: int
    inferences: int
    executions: int
    request_us: float
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float

    @property
    def mean_batch(self) -> float:
        """Inferences per model execution: how well the dynamic batcher grouped requests."""
        return self.inferences / self.executions if self.executions else 0.0

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = dataclasses.asdict(self)
        out["mean_batch"] = round(self.mean_batch, 3)
        return out


def split(before: Counters, after: Counters) -> ServerSplit:
    """The per-request averages between two snapshots of one model."""
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
    )


def _counters(stat: Any) -> Counters:
    s = stat.inference_stats
    return Counters(
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


def parse_statistics(response: Any, models: tuple[str, ...]) -> dict[str, Counters]:
    """Counters per model from a ``ModelStatisticsResponse`` (protobuf), versions summed."""
    out = {name: Counters() for name in models}
    for stat in response.model_stats:
        if stat.name in out:
            out[stat.name] = out[stat.name] + _counters(stat)
    return out


async def composing_models(client: Any, model: str) -> tuple[str, ...]:
    """``model`` followed by every model its ensemble steps run (recursively), each once."""
    found: list[str] = []
    pending = [model]
    while pending:
        name = pending.pop(0)
        if name in found:
            continue
        found.append(name)
        config = (await client.get_model_config(name)).config
        pending.extend(step.model_name for step in config.ensemble_scheduling.step)
    return tuple(found)


class TritonStats:
    """Snapshots of one model's (and its composing models') counters through an asyncio gRPC client.

    ``client`` is a ``tritonclient.grpc.aio.InferenceServerClient``; ``models`` comes from
    :func:`composing_models`.
    """

    def __init__(self, client: Any, models: tuple[str, ...]) -> None:
        self.client = client
        self.models = models

    async def snapshot(self) -> dict[str, Counters]:
        response = await self.client.get_inference_statistics("")
        return parse_statistics(response, self.models)


def splits(before: Mapping[str, Counters], after: Mapping[str, Counters]) -> dict[str, ServerSplit]:
    return {name: split(before[name], after[name]) for name in after if name in before}
