"""Triton's server-side view of a window: counters from its statistics API, diffed, per model.

Triton keeps cumulative counters per model (requests, time queued, time in compute input / infer /
output). A window's server-side split is the difference of two snapshots taken at its edges. For an
ensemble the composing models are snapshotted too, so the split is shown step by step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tritonforge.client._stats import Counters, ServerSplit, split
from tritonforge.config import ComposingWalk

__all__ = ["Counters", "ServerSplit", "TritonStats", "composing_models", "split"]


def parse_statistics(response: Any, models: tuple[str, ...]) -> dict[str, Counters]:
    """Counters per model from a ``ModelStatisticsResponse`` (protobuf), versions summed."""
    out = {name: Counters() for name in models}
    for stat in response.model_stats:
        if stat.name in out:
            out[stat.name] = out[stat.name] + Counters.from_proto(stat)
    return out


async def composing_models(client: Any, model: str) -> tuple[str, ...]:
    """``model`` followed by every model its ensemble steps run (recursively), each once."""
    walk = ComposingWalk(model)
    for name in walk:
        config = (await client.get_model_config(name)).config
        walk.add(step.model_name for step in config.ensemble_scheduling.step)
    return walk.found


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
