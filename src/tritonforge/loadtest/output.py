"""Sweep results to CSV and JSON files (written after every level, so a sweep cut short keeps its data)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tritonforge.atomic import atomic_path, write_atomic
from tritonforge.loadtest.sweep import SweepResult

__all__ = ["write_csv", "write_json", "write_results"]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(results: Sequence[SweepResult], path: Path, extra: dict[str, Any] | None = None) -> Path:
    data = {"sweeps": [r.as_dict() for r in results], **(extra or {})}
    return write_atomic(path, json.dumps(_clean(data), indent=2, allow_nan=False))


def write_csv(results: Sequence[SweepResult], path: Path) -> Path:
    rows = [{"model": r.model, "config": r.label, **level.row()} for r in results for level in r.levels]
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    if not columns:
        columns = ["model", "config", "mode", "level", "throughput_rps"]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_results(
    results: Sequence[SweepResult], directory: Path, stem: str = "sweep", extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """``<stem>.csv`` and ``<stem>.json`` in ``directory`` (created)."""
    directory.mkdir(parents=True, exist_ok=True)
    return {
        "csv": write_csv(results, directory / f"{stem}.csv"),
        "json": write_json(results, directory / f"{stem}.json", extra),
    }
