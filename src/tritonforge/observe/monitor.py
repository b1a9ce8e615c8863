"""`tritonforge monitor`: every model on one or several Triton servers, per server and summed.

:func:`snapshot` reads each server twice ``interval_s`` apart and returns a :class:`Snapshot` (rows per
server and model version, totals per model, server gauges); :func:`render` turns it into a rich table and
:meth:`Snapshot.as_dict` into JSON for scripts. With a price per hour, each row also carries the cost of
1,000 inferences at the throughput seen (the server's price shared by its models by compute time).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rich.table import Table

from tritonforge.observe.metrics import (
    ModelRates,
    Scrape,
    batch_sizes,
    metrics_url,
    model_rates,
    scrape,
    summed,
)

__all__ = ["NO_GPU", "SORT_KEYS", "Snapshot", "cost_per_1k", "render", "render_gpus", "select", "snapshot"]

NO_GPU = "no GPU metrics"  # what a server exporting none of Triton's nv_gpu_* gauges shows (no GPU)

#: what :func:`select` (``monitor --sort``) orders models by: their name, or a figure of their totals over
#: every server (largest first, models without the figure last)
SORT_KEYS: dict[str, str | None] = {
    "name": None,
    "requests": "requests_per_s",
    "failures": "failures_per_s",
    "p99": "p99_ms",
    "latency": "mean_latency_ms",
    "queue": "queue_ms",
    "busy": "busy_instances",
}


def cost_per_1k(price_per_hour: float, inferences_per_s: float) -> float | None:
    """What 1,000 inferences cost on a machine priced ``price_per_hour`` serving ``inferences_per_s``.

    Raises:
        ValueError: a negative price.
    """
    if price_per_hour < 0:
        raise ValueError(f"price per hour must be >= 0, not {price_per_hour}")
    if inferences_per_s <= 0:
        return None
    return price_per_hour / 3600.0 / inferences_per_s * 1000.0


@dataclasses.dataclass
class Snapshot:
    """What every server did over one interval: rows per server, totals per model, server gauges."""

    interval_s: float
    rows: list[ModelRates]
    totals: list[ModelRates]
    servers: dict[str, dict[str, float]]
    batch_sizes: dict[str, dict[str, dict[int, int]]]
    cost_per_1k: dict[str, float | None]
    summaries: bool
    # per server, per GPU (Triton's gpu_uuid): utilization, memory used/total bytes; None: not asked
    gpus: dict[str, dict[str, dict[str, float]]] | None = None
    # models the servers reported, and how many of them select() left out (filtered or past the limit)
    model_count: int | None = None
    hidden_models: int = 0

    def as_dict(self) -> dict[str, Any]:
        gpus = {}
        if self.gpus is not None:
            # a server with no GPU metrics: an empty list (and `gpu_note` says so, as the table does)
            gpus = {
                "gpus": {
                    server: [{"gpu_uuid": uuid, **gauges} for uuid, gauges in devices.items()]
                    for server, devices in self.gpus.items()
                },
                "gpu_note": {server: NO_GPU for server, devices in self.gpus.items() if not devices},
            }
        return {
            "interval_s": self.interval_s,
            "summaries": self.summaries,
            "model_count": len(self.totals) if self.model_count is None else self.model_count,
            "hidden_models": self.hidden_models,
            "servers": self.servers,
            "models": [r.as_dict() for r in self.rows],
            "totals": [{**r.as_dict(), "cost_per_1k": self.cost_per_1k.get(r.model)} for r in self.totals],
            "batch_sizes": {
                server: {model: {str(k): v for k, v in sizes.items()} for model, sizes in per.items()}
                for server, per in self.batch_sizes.items()
            },
            **gpus,
        }


def snapshot(
    urls: Sequence[str],
    *,
    interval_s: float = 1.0,
    grpc_urls: Sequence[str] = (),
    price_per_hour: float | None = None,
    previous: Mapping[str, Scrape] | None = None,
    auth: Any = None,
    gpu: bool = False,
) -> tuple[Snapshot, dict[str, Scrape]]:
    """Read every server twice ``interval_s`` apart (or once, after ``previous`` readings) and compare.

    ``grpc_urls`` (same order as ``urls``, optional) add the batch sizes from the statistics API
    (``auth``: a :class:`tritonforge.client.Auth` where that API is restricted or behind mutual TLS).
    ``gpu`` adds each server's GPUs as Triton exports them (``nv_gpu_utilization``,
    ``nv_gpu_memory_used_bytes``, ``nv_gpu_memory_total_bytes`` by ``gpu_uuid``; none on a server without).
    Returns the snapshot and the latest readings (pass them as ``previous`` to continue live).

    Raises:
        MetricsError: a server could not be read. ValueError: more gRPC URLs than metrics URLs.
    """
    if len(grpc_urls) > len(urls):
        raise ValueError(
            f"{len(grpc_urls)} --url for {len(urls)} --metrics-url: give at most one gRPC URL per server"
        )
    full = [metrics_url(u) for u in urls]
    with ThreadPoolExecutor(max_workers=max(1, len(full))) as pool:
        if previous is None:
            first = dict(zip(full, pool.map(scrape, full), strict=True))
            time.sleep(interval_s)
        else:
            first = dict(previous)
        second = dict(zip(full, pool.map(scrape, full), strict=True))
    rows = [r for url in full for r in model_rates(first[url], second[url])]
    totals = summed(rows)
    costs = _costs(full, rows, totals, price_per_hour) if price_per_hour is not None else {}
    batches = {
        full[i]: {f"{m}:{v}": sizes for (m, v), sizes in batch_sizes(g, auth=auth).items() if sizes}
        for i, g in enumerate(grpc_urls)
    }
    summaries = any(s.quantiles for s in second.values())
    servers = {url: s.server for url, s in second.items()}
    elapsed = max(second[u].at_s - first[u].at_s for u in full)
    gpus = {url: s.devices for url, s in second.items()} if gpu else None
    return Snapshot(elapsed, rows, totals, servers, batches, costs, summaries, gpus), second


def select(
    snap: Snapshot,
    *,
    match: Sequence[str] = (),
    sort: str = "name",
    limit: int | None = None,
    active_only: bool = False,
) -> Snapshot:
    """``snap`` narrowed to some models, the same ones in its rows and its totals.

    Models whose name matches one of the shell patterns ``match`` (any model when empty) and, with
    ``active_only``, that served requests in the interval; ordered by ``sort`` (a key of
    :data:`SORT_KEYS`, a figure of their totals: largest first) and cut to the first ``limit`` (``None``
    or 0: all); the batch sizes are those of the models kept. The result says how many models there
    were and how many it left out.

    Example:
        >>> busiest = select(snap, sort="requests", limit=20)    # doctest: +SKIP

    Raises:
        ValueError: an unknown sort key, or a negative limit.
    """
    if sort not in SORT_KEYS:
        raise ValueError(f"sort by one of {', '.join(SORT_KEYS)}, not {sort!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be 0 (all) or more, not {limit}")
    field = SORT_KEYS[sort]
    totals = [
        t
        for t in snap.totals
        if (not match or any(fnmatch.fnmatchcase(t.model, p) for p in match))
        and not (active_only and t.requests_per_s == 0)
    ]
    if field is not None:
        # stable: equal figures keep the models' alphabetical order
        totals.sort(key=lambda t: (getattr(t, field) is None, -(getattr(t, field) or 0.0)))
    if limit:
        totals = totals[:limit]
    rank = {t.model: i for i, t in enumerate(totals)}
    rows = [r for r in snap.rows if r.model in rank]
    if field is not None:
        rows.sort(key=lambda r: rank[r.model])
    count = len(snap.totals) if snap.model_count is None else snap.model_count
    batches = {
        server: {key: sizes for key, sizes in per.items() if key.rpartition(":")[0] in rank}
        for server, per in snap.batch_sizes.items()
    }
    return dataclasses.replace(
        snap,
        rows=rows,
        totals=totals,
        batch_sizes=batches,
        model_count=count,
        hidden_models=count - len(totals),
    )


def _costs(
    servers: Sequence[str], rows: Sequence[ModelRates], totals: Sequence[ModelRates], price_per_hour: float
) -> dict[str, float | None]:
    """Each model's cost of 1,000 inferences: every server's price shared among its models by the compute
    time they used (evenly when none was busy). One pass over the rows, whatever the number of models."""
    busy: dict[str, float] = dict.fromkeys(servers, 0.0)
    mine: dict[tuple[str, str], float] = {}
    on_server: dict[str, set[str]] = {server: set() for server in servers}
    for r in rows:
        busy[r.server] += r.busy_instances
        mine[r.server, r.model] = mine.get((r.server, r.model), 0.0) + r.busy_instances
        on_server[r.server].add(r.model)
    per_s = price_per_hour / 3600.0
    costs: dict[str, float | None] = {}
    for total in totals:
        cost_per_s = 0.0
        for server, models in on_server.items():
            if busy[server] > 0:
                share = mine.get((server, total.model), 0.0) / busy[server]
            else:
                share = 1.0 / max(1, len(models))
            cost_per_s += per_s * share
        costs[total.model] = (
            cost_per_s / total.inferences_per_s * 1000.0 if total.inferences_per_s > 0 else None
        )
    return costs


def _machine(url: str, gauges: Mapping[str, float]) -> str:
    """A server's CPU/GPU use, as far as Triton exports it (nothing for all-zero gauges)."""
    parts = []
    if gauges.get("cpu_utilization"):
        parts.append(f"CPU {gauges['cpu_utilization']:.0%}")
    if gauges.get("cpu_memory_used_bytes"):
        parts.append(f"RAM {gauges['cpu_memory_used_bytes'] / 2**30:.1f} GiB")
    if "gpu_utilization" in gauges:
        parts.append(f"GPU {gauges['gpu_utilization']:.0%}")
    if gauges.get("gpu_memory_used_bytes"):
        parts.append(f"GPU memory {gauges['gpu_memory_used_bytes'] / 2**30:.1f} GiB")
    return f"{_server(url)}: " + ", ".join(parts) if parts else ""


def _server(url: str) -> str:
    return url.removeprefix("http://").removesuffix("/metrics")


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render(snap: Snapshot, *, active_only: bool = False) -> Table:
    """The snapshot as one table: a row per server and model version, then the totals per model."""
    several = len(snap.servers) > 1
    machine = "; ".join(filter(None, (_machine(url, gauges) for url, gauges in snap.servers.items())))
    table = Table(
        title=f"Triton models over {snap.interval_s:.1f}s on {len(snap.servers)} server(s)",
        caption="p50 p99 mean queue compute: ms per request; batch: inferences per execution; "
        "busy: instances kept busy"
        + ("; $/1k: cost of 1,000 inferences" if snap.cost_per_1k else "")
        + (f"\n{machine}" if machine else "")
        + (
            ""
            if snap.summaries
            else "; p50/p99 need Triton's summaries (--metrics-config=summary_latencies=true)"
        )
        + (
            f"\n{snap.hidden_models} of {snap.model_count} models hidden "
            "(narrowed by --match, --active or --limit; --limit 0 shows all)"
            if snap.hidden_models
            else ""
        ),
    )
    columns = ["server", "model", "ver", "req/s", "fail/s", "p50", "p99", "mean", "queue", "compute", "batch"]
    columns += ["busy", "pending"]
    if snap.cost_per_1k:
        columns.append("$/1k")
    widths = {
        "server": max((len(_server(r.server)) for r in snap.rows), default=6),
        "model": max((len(r.model) for r in snap.rows), default=5),
    }
    for c in columns:
        # names are never cut short, whatever the terminal's width (readable when piped)
        table.add_column(
            c,
            justify="left" if c in ("server", "model", "ver") else "right",
            no_wrap=True,
            min_width=max(len(c), widths.get(c, 0)),
        )

    def add(r: ModelRates, server: str, style: str | None = None) -> None:
        cells = [
            server,
            r.model,
            r.version,
            _num(r.requests_per_s),
            _num(r.failures_per_s),
            _num(r.p50_ms, "{:.2f}"),
            _num(r.p99_ms, "{:.2f}"),
            _num(r.mean_latency_ms, "{:.2f}"),
            _num(r.queue_ms, "{:.2f}"),
            _num(r.compute_ms, "{:.2f}"),
            _num(r.batch_size, "{:.2f}"),
            _num(r.busy_instances, "{:.2f}"),
            f"{r.pending:g}",
        ]
        if snap.cost_per_1k:
            cells.append(_num(snap.cost_per_1k.get(r.model) if r.server == "all" else None, "{:.5f}"))
        if r.failures_per_s > 0:
            style = "red"
        table.add_row(*cells, style=style)

    for r in snap.rows:
        if active_only and r.requests_per_s == 0:
            continue
        add(r, _server(r.server))
    if several or snap.cost_per_1k:
        table.add_section()
        for r in snap.totals:
            if active_only and r.requests_per_s == 0:
                continue
            add(r, "all", "bold")
    return table


def render_gpus(snap: Snapshot) -> Table:
    """Each server's GPUs: utilization and memory used / total (a server without any: "no GPU metrics")."""
    table = Table(title="GPUs (Triton's nv_gpu_* gauges)")
    servers = snap.gpus or {}
    uuids = [u for devices in servers.values() for u in devices] or [NO_GPU]
    table.add_column("server", no_wrap=True, min_width=max((len(_server(u)) for u in servers), default=6))
    table.add_column("gpu", no_wrap=True, min_width=max(len(u) for u in uuids))
    for c in ("util", "memory used", "memory total", "memory %"):
        table.add_column(c, justify="right", no_wrap=True, min_width=len(c))
    for url, devices in servers.items():
        if not devices:
            table.add_row(_server(url), NO_GPU, "-", "-", "-", "-")
        for uuid, g in devices.items():
            used, total = g.get("memory_used_bytes"), g.get("memory_total_bytes")
            table.add_row(
                _server(url),
                uuid,
                _num(g.get("utilization"), "{:.0%}"),
                _num(None if used is None else used / 2**30, "{:.2f} GiB"),
                _num(None if total is None else total / 2**30, "{:.2f} GiB"),
                _num(used / total if used is not None and total else None, "{:.0%}"),
            )
    return table
