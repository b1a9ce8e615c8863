"""Observe the models in production: Triton's metrics, SLO rules and dashboards, drift, structured logs.

- :mod:`~tritonforge.observe.metrics`: Triton's ``/metrics`` parsed with prometheus_client's parser and
  its statistics API -> per-model rates (:func:`scrape`, :func:`model_rates`, :func:`summed`).
- :mod:`~tritonforge.observe.monitor`: the ``tritonforge monitor`` view over one or several servers.
- :mod:`~tritonforge.observe.slo`: SLO YAML -> Prometheus recording/alert rules and a Grafana dashboard.
- :mod:`~tritonforge.observe.drift`: reference profiles per model version; PSI + KS (BH-controlled).
- :mod:`~tritonforge.observe.sampler`: a share of real traffic kept in a bounded Parquet store.
- :mod:`~tritonforge.observe.logs`: one JSON line per client call.
- :mod:`~tritonforge.observe.cost`: cost per 1,000 inferences from a bench run and an hourly price.

Layering: observe sits above client/server/registry; only ``tritonforge.commands`` imports it.
Drift and the sampler need the ``observe`` extra (scipy, pyarrow, matplotlib for the HTML plots).
"""

from __future__ import annotations

from tritonforge.observe.cost import CostRow, bench_costs, cheapest, read_sweeps
from tritonforge.observe.logs import JsonLogHook, log_record
from tritonforge.observe.metrics import (
    SUMMARY_FLAGS,
    MetricsError,
    ModelRates,
    Scrape,
    batch_sizes,
    metrics_url,
    model_rates,
    parse_metrics,
    scrape,
    summed,
)
from tritonforge.observe.monitor import Snapshot, cost_per_1k, render, select, snapshot
from tritonforge.observe.slo import SLOError, SLOSpec, dashboard, load_slo, rules, write

__all__ = [
    "SUMMARY_FLAGS",
    "CostRow",
    "JsonLogHook",
    "MetricsError",
    "ModelRates",
    "SLOError",
    "SLOSpec",
    "Scrape",
    "Snapshot",
    "batch_sizes",
    "bench_costs",
    "cheapest",
    "cost_per_1k",
    "dashboard",
    "load_slo",
    "log_record",
    "metrics_url",
    "model_rates",
    "parse_metrics",
    "read_sweeps",
    "render",
    "rules",
    "scrape",
    "select",
    "snapshot",
    "summed",
    "write",
]
