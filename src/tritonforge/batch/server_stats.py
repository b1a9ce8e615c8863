"""Triton's own view of a batch run: the models it runs (an ensemble's composing models too) and their
statistics counters, snapshotted before and after the run and diffed into a :class:`ServerSplit` each.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from tritonforge.client.stats import Counters, ServerSplit, split
from tritonforge.config import ComposingWalk
from tritonforge.errors import ClientError

__all__ = ["composing", "splits", "statistics", "statistics_after"]


async def composing(client: Any, model: str, config: Any) -> list[str]:
    """The model and, for an ensemble, every model its steps run (recursively)."""
    walk = ComposingWalk(model)
    for name in walk:
        if name == model:
            walk.add(step.model_name for step in config.ensemble_scheduling.step)
            continue
        with contextlib.suppress(ClientError):
            walk.add(step.model_name for step in (await client.model_config(name)).ensemble_scheduling.step)
    return list(walk.found)


async def statistics(
    urls: Sequence[str], models: Sequence[str], options: Mapping[str, Any]
) -> dict[str, Counters]:
    """Triton's cumulative counters per model, summed over endpoints (each asked alone)."""
    from tritonforge.client import AsyncClient

    totals: dict[str, Counters] = {}
    for url in urls:
        try:
            async with AsyncClient(
                url, metrics=False, **{k: v for k, v in options.items() if k in ("tls", "headers")}
            ) as c:
                data = await c.model_statistics("")
        except ClientError:
            continue
        for stat in data.get("model_stats", []):
            name = stat.get("name")
            if name in models:
                totals[name] = totals.get(name, Counters()) + Counters.from_dict(stat)
    return totals


async def statistics_after(
    urls: Sequence[str],
    models: Sequence[str],
    options: Mapping[str, Any],
    before: Mapping[str, Counters],
    answered: int,
    timeout_s: float = 2.0,
) -> dict[str, Counters]:
    """:func:`statistics` once every one of ``models`` has counted ``answered`` successful requests since
    ``before`` (at most ``timeout_s``, then as they are).

    A backend sends a request's response before it reports the request's statistics, so counters read
    right after the last answer can be one short. The run's model and an ensemble's steps each count one
    request per answered request (every step of an ensemble runs for each of its requests).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        after = await statistics(urls, models, options)
        counted = [(after.get(m, Counters()) - before.get(m, Counters())).success for m in models]
        if all(n >= answered for n in counted) or time.monotonic() >= deadline:
            return after
        await asyncio.sleep(0.05)


def splits(before: Mapping[str, Counters], after: Mapping[str, Counters]) -> list[ServerSplit]:
    """Each model's split of the run (a model that had no counters before starts from 0)."""
    return [split(before.get(name, Counters()), a, model=name) for name, a in after.items()]
