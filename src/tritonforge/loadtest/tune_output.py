"""What a tune leaves behind: its reports (JSON, CSV, HTML with plots) and the winning config."""

from __future__ import annotations

import html as _html
import math
import os
from pathlib import Path

from tritonforge.config import write_config
from tritonforge.loadtest.output import write_results
from tritonforge.loadtest.report import write_report
from tritonforge.loadtest.search import TuneResult

__all__ = ["write_tune_outputs", "write_winner"]


def write_winner(result: TuneResult, repository: str | os.PathLike[str]) -> list[str]:
    """Write the winning config of every tuned model into the repository (config.pbtxt, atomically)."""
    written = []
    for name, config in result.winner_configs.items():
        written.append(str(write_config(config, Path(repository) / name)))
    result.written = written
    return written


def write_tune_outputs(result: TuneResult, directory: str | os.PathLike[str]) -> None:
    """``tune.json`` (every trial, the winner or the closest), ``tune.csv`` (every level of every config)
    and ``report.html`` with its PNGs."""
    out = Path(directory)
    sweeps = [t.sweep for t in result.trials if t.sweep is not None]
    write_results(sweeps, out, stem="tune", extra={"tune": result.as_dict()})
    if result.winner is not None:
        verdict = (
            f"<p><b>Best within p99 &le; {result.budget_ms:g} ms:</b> {_html.escape(result.winner.label)}"
            f" &mdash; {result.winner.throughput_rps:,.1f} infer/s</p>"
        )
    elif result.closest is not None:
        verdict = (
            f"<p class='warn'><b>No config met p99 &le; {result.budget_ms:g} ms.</b> Closest: "
            f"{_html.escape(result.closest.label)} (lowest p99 {result.closest.min_p99_ms:.2f} ms)</p>"
        )
    else:
        verdict = "<p class='warn'>No config could be measured.</p>"
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{_html.escape(str(c))}</td>"
            for c in (
                t.index,
                t.label,
                "-" if t.throughput_rps is None else f"{t.throughput_rps:,.1f}",
                "-" if not math.isfinite(t.min_p99_ms) else f"{t.min_p99_ms:.2f}",
                "winner" if t is result.winner else ("default" if t is result.default else ""),
                t.error or "",
            )
        )
        + "</tr>"
        for t in result.trials
    )
    if result.stopped_at:
        verdict = (
            f"<p class='warn'><b>Stopped early</b> at {_html.escape(result.stopped_at)}; the configs tried "
            "before are kept below.</p>" + verdict
        )
    summary = (
        f"{verdict}<p>Strategy: {_html.escape(result.strategy)}; tried {result.tried} of "
        f"{result.space_size} configs ({result.fraction_tried:.0%}). Tuned: "
        f"{_html.escape(', '.join(result.tuned_models))}.</p><table><tr><th>#</th><th>config</th>"
        f"<th>best infer/s within budget</th><th>lowest p99 ms</th><th></th><th>error</th></tr>{rows}</table>"
    )
    labels = [t.label for t in (result.default, result.winner) if t is not None]
    write_report(
        sweeps,
        out,
        title=f"tritonforge tune {result.model}",
        summary_html=summary,
        highlight=result.winner.label if result.winner else None,
        breakdowns=labels or None,
    )
