"""Cost per 1,000 inferences: a bench run's throughput and an hourly price.

:func:`bench_costs` reads what ``tritonforge bench`` / ``tune`` wrote (``sweep.json``): per model,
configuration and load level, the inferences per second (requests/s times the rows per request that
Triton counted) and what 1,000 of them cost on a machine priced ``price_per_hour``; levels with errors
are marked, since their throughput is not one to plan on. :func:`cheapest` picks each configuration's
cheapest error-free level within an optional p99 budget.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tritonforge.errors import TritonForgeError
from tritonforge.files import read_text
from tritonforge.observe.monitor import cost_per_1k

__all__ = ["CostRow", "bench_costs", "cheapest", "read_sweeps"]


@dataclasses.dataclass(frozen=True)
class CostRow:
    """One level of one sweep, priced."""

    model: str
    config: str
    level: float
    requests_per_s: float
    inferences_per_s: float
    p99_ms: float | None
    errors: int
    cost_per_1k: float | None


def read_sweeps(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The sweeps in a bench/tune ``sweep.json`` (or a folder holding one).

    Raises:
        TritonForgeError: no such file, or not a sweep file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "sweep.json"
    text = read_text(path, what="sweep file", error=TritonForgeError, fix="give the sweep.json `bench` wrote")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise TritonForgeError(f"{path} is not JSON: {exc}") from None
    sweeps = data.get("sweeps") if isinstance(data, dict) else None
    if not isinstance(sweeps, list):
        raise TritonForgeError(
            f"{path} holds no `sweeps`: give the sweep.json of `tritonforge bench` or `tune`"
        )
    return sweeps


def bench_costs(sweeps: Iterable[Mapping[str, Any]], price_per_hour: float) -> list[CostRow]:
    """Every level of every sweep with its cost per 1,000 inferences.

    Raises:
        ValueError: a negative price.
    """
    rows = []
    for sweep in sweeps:
        model = str(sweep["model"])
        config = str(sweep.get("label") or "default")
        for level in sweep.get("levels", []):
            rps = float(level.get("throughput_rps") or 0.0)
            served = (level.get("server") or {}).get(model) or {}
            requests, inferences = served.get("requests") or 0, served.get("inferences") or 0
            rows_per_request = inferences / requests if requests and inferences else 1.0
            ips = rps * rows_per_request
            p99 = (level.get("latency_ms") or {}).get("p99")
            rows.append(
                CostRow(
                    model,
                    config,
                    float(level["level"]),
                    rps,
                    ips,
                    None if p99 is None else float(p99),
                    int(level.get("errors") or 0),
                    cost_per_1k(price_per_hour, ips),
                )
            )
    return rows


def cheapest(rows: Iterable[CostRow], p99_budget_ms: float | None = None) -> dict[tuple[str, str], CostRow]:
    """Per (model, config): the error-free level with the lowest cost (within the p99 budget, if given)."""
    best: dict[tuple[str, str], CostRow] = {}
    for row in rows:
        if row.errors or row.cost_per_1k is None:
            continue
        if p99_budget_ms is not None and (row.p99_ms is None or row.p99_ms > p99_budget_ms):
            continue
        key = (row.model, row.config)
        if key not in best or row.cost_per_1k < best[key].cost_per_1k:  # type: ignore[operator]
            best[key] = row
    return best
