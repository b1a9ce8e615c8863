"""Reports people look at: one self-contained HTML file (PNGs embedded as base64, no scripts, no CDN)
plus the PNGs beside it — throughput-vs-latency curves per config, Triton's server-side split as stacked
bars, and a table of every level.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

from tritonforge.atomic import write_atomic
from tritonforge.loadtest.sweep import SweepResult

__all__ = ["write_report"]

_PARTS = (
    ("queue_us", "queue"),
    ("compute_input_us", "compute input"),
    ("compute_infer_us", "compute infer"),
    ("compute_output_us", "compute output"),
)
_COLOURS = ("#8da0cb", "#66c2a5", "#fc8d62", "#e78ac3")


def _png(fig: object) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    canvas.print_png(buffer)
    return buffer.getvalue()


def curves_png(results: Sequence[SweepResult], highlight: str | None = None) -> bytes:
    """Throughput (x) against p99 and p50 latency (y), one line per config, points labelled by level."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    for result in results:
        levels = [lv for lv in result.levels if math.isfinite(lv.p99_ms)]
        if not levels:
            continue
        x = [lv.throughput_rps for lv in levels]
        strong = highlight is not None and result.label == highlight
        (line,) = ax.plot(
            x,
            [lv.p99_ms for lv in levels],
            marker="o",
            linewidth=3 if strong else 1.2,
            label=f"{result.label or result.model} p99",
        )
        if len(results) <= 3:
            ax.plot(
                x,
                [lv.latency_ms["p50"] for lv in levels],
                marker=".",
                linestyle="--",
                color=line.get_color(),
                label=f"{result.label or result.model} p50",
            )
            for lv, xi in zip(levels, x, strict=True):
                ax.annotate(
                    f"{lv.level:g}", (xi, lv.p99_ms), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(
        "throughput vs latency" + (" (labels: concurrency / request rate)" if len(results) <= 3 else "")
    )
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def breakdown_png(result: SweepResult) -> bytes | None:
    """Triton's per-request split (queue, compute input / infer / output) per level, one bar per model."""
    from matplotlib.figure import Figure

    models = [m for m in result.server_models if any(m in lv.server for lv in result.levels)]
    if not models or not result.levels:
        return None
    fig = Figure(figsize=(max(6, 1.2 * len(result.levels) * len(models)), 4.5), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / len(models)
    ticks, labels = [], []
    for i, level in enumerate(result.levels):
        for j, model in enumerate(models):
            split = level.server.get(model, {})
            x = i + j * width
            bottom = 0.0
            for (key, name), colour in zip(_PARTS, _COLOURS, strict=True):
                value = float(split.get(key, 0.0)) / 1e3
                ax.bar(
                    x, value, width * 0.9, bottom=bottom, color=colour, label=name if i == j == 0 else None
                )
                bottom += value
            ticks.append(x)
            labels.append(f"{level.level:g}\n{model}" if len(models) > 1 else f"{level.level:g}")
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("ms per request (server side)")
    ax.set_xlabel(result.mode.replace("_", " "))
    ax.set_title(f"server-side split: {result.label or result.model}")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def _table(results: Sequence[SweepResult]) -> str:
    head = (
        "config",
        "mode",
        "level",
        "throughput/s",
        "Triton's count/s",
        "p50 ms",
        "p90 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "stable",
        "windows",
    )
    rows = []
    for r in results:
        for lv in r.levels:
            server = "" if lv.server_throughput_rps is None else f"{lv.server_throughput_rps:,.1f}"
            cells = (
                r.label or r.model,
                lv.mode,
                f"{lv.level:g}",
                f"{lv.throughput_rps:,.1f}",
                server,
                *(f"{lv.latency_ms[p]:.2f}" for p in ("p50", "p90", "p95", "p99")),
                str(lv.errors),
                "yes" if lv.stable else "no",
                str(lv.windows),
            )
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


def _server_table(result: SweepResult) -> str:
    head = (
        "level",
        "model",
        "requests",
        "mean batch",
        "queue µs",
        "compute input µs",
        "compute infer µs",
        "compute output µs",
    )
    rows = []
    for lv in result.levels:
        for model, s in lv.server.items():
            cells = (
                f"{lv.level:g}",
                model,
                str(int(s["requests"])),
                f"{s['mean_batch']:.2f}",
                *(f"{s[k]:.0f}" for k, _ in _PARTS),
            )
            rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>"


_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{background:#f3f3f3}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px}img{max-width:100%}"""


def write_report(
    results: Sequence[SweepResult],
    directory: str | os.PathLike[str],
    *,
    title: str = "tritonforge sweep",
    summary_html: str = "",
    highlight: str | None = None,
    breakdowns: Sequence[str] | None = None,
) -> Path:
    """``report.html`` (self-contained) and its PNGs in ``directory``; returns the HTML path.

    ``breakdowns``: the labels of the configs whose server-side split to draw (default: all, up to 4).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, bytes]] = [("curves.png", curves_png(results, highlight))]
    chosen = [r for r in results if breakdowns is None or r.label in breakdowns][:4]
    for i, result in enumerate(chosen):
        png = breakdown_png(result)
        if png is not None:
            images.append((f"breakdown_{i}.png", png))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
    ]
    for r in results:
        if r.stopped_at:
            parts.append(
                f"<p class='warn'><b>Stopped early</b> ({html.escape(r.label or r.model)}): "
                f"{html.escape(r.stopped_at)}. The levels measured before that are kept below.</p>"
            )
    parts.append(summary_html)
    for name, png in images:
        (out / name).write_bytes(png)
        parts.append(
            f"<p><img alt='{name}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"
        )
    parts.append("<h2>Every level</h2>" + _table(results))
    for result in chosen:
        if any(lv.server for lv in result.levels):
            parts.append(
                f"<h2>Server-side split: {html.escape(result.label or result.model)}</h2>"
                + _server_table(result)
            )
    parts.append("</body></html>")
    path = out / "report.html"
    return write_atomic(path, "\n".join(parts))
