"""What a tune leaves behind: its reports (JSON, CSV, HTML with plots) and the winning config."""

from __future__ import annotations

import datetime as _dt
import html as _html
import math
import os
from pathlib import Path
from typing import Any

from tritonforge.errors import RepositoryError
from tritonforge.loadtest.output import write_results
from tritonforge.loadtest.report import write_report
from tritonforge.loadtest.search import Trial, TuneResult
from tritonforge.registry import served_versions
from tritonforge.repository import RepositoryWrite, versions

__all__ = ["layout_record", "write_tune_outputs", "write_winner"]

#: how many alternatives the one-line ``why`` names (every one is in ``measured_infer_per_s``)
WHY_ALTERNATIVES = 4


def _figures(trial: Trial) -> list[float]:
    return [round(v, 2) for v in (trial.single_rps, *trial.repeats) if v is not None]


def layout_record(result: TuneResult, name: str) -> dict[str, Any]:
    """The manifest record of ``name``'s tuned config: the layout chosen (instances, intra-op threads),
    the rest of the winner's knobs, and why — every config's measured figures, the budget, the CPUs.

    The keys mean what they mean in :meth:`tritonforge.repository.layout.LayoutChoice.as_manifest`
    (``instances``, ``intra_op_threads``, ``why``, ``cpus``, ``workload``, ``method``); the figures are
    inferences per second within the p99 budget on the server (``measured_infer_per_s``: the first sweep,
    then re-measurements), not rows per second in-process.

    Raises:
        ValueError: the result has no winner, or ``name`` was not tuned.
    """
    winner = result.winner
    if winner is None or name not in winner.knobs:
        raise ValueError(f"no winning config of '{name}' in this tune result")
    knobs = winner.knobs[name]
    others = sorted(
        (t for t in result.trials if t is not winner and t.throughput_rps is not None),
        key=lambda t: t.throughput_rps or 0.0,
        reverse=True,
    )
    over = [t for t in result.trials if t.throughput_rps is None]
    against = ", ".join(f"{t.label} {t.throughput_rps:.1f}" for t in others[:WHY_ALTERNATIVES]) or "nothing"
    if len(others) > WHY_ALTERNATIVES:
        against += f" and {len(others) - WHY_ALTERNATIVES} more"
    if over:
        against += f"; {len(over)} over the budget"
    sweeps = 1 + len(winner.repeats)
    why = (
        f"{winner.label} served {winner.throughput_rps:.1f} infer/s within p99 <= {result.budget_ms:g} ms "
        f"(median of {sweeps} sweep{'s' if sweeps > 1 else ''}, {result.workload}, {result.cpus} CPUs) "
        f"against {against}"
    )
    return {
        "instances": knobs["instances"],
        "intra_op_threads": knobs.get("intra_op_threads"),
        "why": why,
        "cpus": result.cpus,
        "workload": result.workload,
        "method": f"tritonforge tune {result.model}: {result.strategy}",
        "chosen_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "p99_budget_ms": result.budget_ms,
        "config": {k: v for k, v in knobs.items() if k not in ("instances", "intra_op_threads")},
        "measured_infer_per_s": {t.label: _figures(t) for t in result.trials if _figures(t)},
        "over_budget_lowest_p99_ms": {
            t.label: round(t.min_p99_ms, 3) for t in over if math.isfinite(t.min_p99_ms)
        },
    }


def write_winner(result: TuneResult, repository: str | os.PathLike[str]) -> list[str]:
    """Write the winning config of every tuned model into the repository, and record the layout chosen
    and why (:func:`layout_record`) under ``layout`` in the manifest of the version the tune measured (the
    highest one served). All models go in together, atomically, through the repository writer.

    Returns:
        The config files written.

    Raises:
        RepositoryError: a tuned model has no version folder to record it in.
    """
    repo = Path(repository)
    written = []
    with RepositoryWrite(repo) as write:
        for name, config in result.winner_configs.items():
            served = served_versions(config, versions(repo / name))
            if not served:
                raise RepositoryError(
                    f"model '{name}' has no served version in {repo} to record its tuned layout in",
                    model=name,
                )
            write.amend(name, served[-1], config=config, manifest={"layout": layout_record(result, name)})
            written.append(str(repo / name / "config.pbtxt"))
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
