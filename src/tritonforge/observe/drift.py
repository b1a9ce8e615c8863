"""Drift: a reference profile per model version, and today's traffic compared with it feature by feature.

- :func:`profile` summarises the data a model was verified on: per input feature and per output, bin
  edges at the reference's deciles with the share in each bin, quantiles and a bounded sample (for the KS
  test); for text (BYTES) tensors, token and character lengths, the vocabulary, and each row's share of
  words outside it. :func:`write_profile` stores it as ``drift_profile.json`` beside the version's
  ``manifest.json``; :func:`read_profile` finds it again.
- :func:`compare` judges current traffic (e.g. from :class:`tritonforge.observe.sampler.SampleStore`)
  per feature with the population stability index (PSI) and scipy's two-sample KS test, with
  Benjamini-Hochberg control of the false discovery rate over all features: a feature drifted when its
  adjusted p-value is below ``alpha`` *and* its PSI reaches ``min_psi`` (a shift both real and material).
- :func:`html_report`, :func:`drift_registry` / :func:`write_metrics_file` show and export the result.

    ref = profile({"input": x_verified}, {"probabilities": p_verified}, model="digits_mlp", version="1")
    report = compare(ref, {"input": x_today, "probabilities": p_today})
    report.drifted, report.table()
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.atomic import atomic_path, write_atomic
from tritonforge.errors import DriftError
from tritonforge.observe.profile import (
    _EMBEDDING_ROWS,
    PROFILE_FILE,
    FeatureProfile,
    Profile,
    features,
    profile,
    read_profile,
    write_profile,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MIN_PSI",
    "PROFILE_FILE",
    "DriftError",
    "DriftReport",
    "FeatureDrift",
    "FeatureProfile",
    "Profile",
    "check_thresholds",
    "compare",
    "drift_registry",
    "features",
    "html_report",
    "mmd_test",
    "profile",
    "psi",
    "read_profile",
    "write_metrics_file",
    "write_profile",
]

DEFAULT_ALPHA = 0.01
DEFAULT_MIN_PSI = 0.1
_PERMUTATIONS = 500
_EPS = 1e-4


# -- comparison ---------------------------------------------------------------------------------------


def psi(edges: Sequence[float], ref_shares: Sequence[float], values: np.ndarray) -> float:
    """Population stability index of ``values`` against a reference's bins (0: same; >0.25: large)."""
    counts = np.bincount(np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(ref_shares))
    cur = np.maximum(counts / max(1, counts.sum()), _EPS)
    ref = np.maximum(np.asarray(ref_shares, np.float64), _EPS)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


@dataclasses.dataclass
class FeatureDrift:
    """How far one feature moved: PSI, KS statistic, raw and BH-adjusted p-values, means."""

    feature: str
    role: str
    psi: float
    ks: float
    p_value: float
    p_adjusted: float
    drifted: bool
    ref_mean: float
    cur_mean: float
    #: "psi+ks" (one feature: PSI and KS) or "mmd" (a whole embedding: ``ks`` holds the MMD² statistic,
    #: ``psi`` is 0 and drift needs the p-value only)
    test: str = "psi+ks"


@dataclasses.dataclass
class DriftReport:
    """The comparison of current traffic with a profile; ``drifted`` when any feature did."""

    model: str
    version: str
    reference_rows: int
    current_rows: int
    alpha: float
    min_psi: float
    features: list[FeatureDrift]
    current: dict[str, np.ndarray] = dataclasses.field(repr=False, default_factory=dict)
    reference: Profile | None = dataclasses.field(repr=False, default=None)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def drifted(self) -> bool:
        return any(f.drifted for f in self.features)

    @property
    def complete(self) -> bool:
        """Whether every reference input feature was judged on every sampled row (no problems)."""
        return not self.problems

    @property
    def verdict(self) -> str:
        """``"drifted"`` (some judged feature moved), ``"incomplete"`` (none moved, but part of the
        traffic or of the features could not be judged: never read as no drift) or ``"no drift"``."""
        if self.drifted:
            return "drifted"
        return "no drift" if self.complete else "incomplete"

    @property
    def moved(self) -> list[FeatureDrift]:
        return sorted((f for f in self.features if f.drifted), key=lambda f: -f.psi)

    @property
    def max_psi(self) -> float:
        return max((f.psi for f in self.features), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "verdict": self.verdict,
            "drifted": self.drifted,
            "complete": self.complete,
            "problems": list(self.problems),
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
            "alpha": self.alpha,
            "min_psi": self.min_psi,
            "max_psi": self.max_psi,
            "features": [dataclasses.asdict(f) for f in self.features],
        }


def _bh(p_values: np.ndarray) -> np.ndarray:
    from scipy.stats import false_discovery_control

    if len(p_values) == 0:
        return p_values
    return np.asarray(false_discovery_control(p_values, method="bh"))


def compare(
    reference: Profile,
    current: Mapping[str, Any],
    *,
    alpha: float = DEFAULT_ALPHA,
    min_psi: float = DEFAULT_MIN_PSI,
    min_rows: int = 30,
    problems: Sequence[str] = (),
) -> DriftReport:
    """Compare current traffic (``{tensor name: rows}``, inputs and outputs together) with ``reference``.

    ``problems`` are what was found wrong with the traffic before (e.g. by
    :meth:`tritonforge.observe.sampler.SampleStore.check`); they, a reference input feature the traffic
    lacks, or non-finite values make the report incomplete (:attr:`DriftReport.verdict`), never "no
    drift". Output features the traffic lacks (outputs not sampled) are left out; features it has that
    the profile lacks are ignored.

    Raises:
        DriftError: fewer than ``min_rows`` rows, no feature in common, or a bad ``alpha``/``min_psi``.
    """
    from scipy.stats import ks_2samp

    check_thresholds(alpha, min_psi, min_rows)
    issues = list(problems)
    cur = features(current, vocab=reference.vocab)
    common = [name for name in reference.features if name in cur]
    if not common:
        raise DriftError(
            f"the traffic of {reference.model or 'the model'} shares no feature with its profile "
            f"(traffic: {sorted(current)[:5]}, profile: {sorted(reference.features)[:5]}...): "
            "sample the same tensors the profile was made from"
        )
    lacking = [n for n, fp in reference.features.items() if fp.role == "input" and n not in cur]
    if lacking:
        issues.append(
            f"the traffic lacks {len(lacking)} input feature(s) of the profile ({', '.join(lacking[:5])}"
            f"{'...' if len(lacking) > 5 else ''}): they were not judged"
        )
    rows = len(cur[common[0]])
    if rows < min_rows:
        raise DriftError(
            f"only {rows} row(s) of traffic for {reference.model or 'the model'}: need {min_rows}"
        )
    stats = []
    for name in common:
        fp, values = reference.features[name], cur[name]
        finite = np.isfinite(values)
        if not finite.all():
            issues.append(f"feature {name!r}: {int((~finite).sum())} of {len(values)} values are not finite")
            values = values[finite]
            if len(values) == 0:
                continue
        ref_sample = np.asarray(fp.sample)
        if np.ptp(ref_sample) == 0 and np.ptp(values) == 0 and ref_sample[0] == values[0]:
            ks, p = 0.0, 1.0  # a constant feature that stayed the same value
        else:
            result = ks_2samp(ref_sample, values)
            ks, p = float(result.statistic), float(result.pvalue)
        stats.append((name, fp, psi(fp.edges, fp.shares, values), ks, p, float(values.mean())))
    multi = []  # (name, role, MMD², p, reference mean norm, current mean norm) per embedding tensor
    for name, sample in reference.embeddings.items():
        if name not in current:
            continue
        ref = np.asarray(sample, np.float64)
        now = np.asarray(current[name], np.float64).reshape(len(current[name]), -1)
        if now.shape[1] != ref.shape[1]:
            issues.append(
                f"tensor {name!r} is {now.shape[1]} wide in the traffic, {ref.shape[1]} in the profile"
            )
            continue
        now = now[np.isfinite(now).all(axis=1)]
        if len(now) < 2:
            continue
        stat, p = mmd_test(ref, now)
        role = next((fp.role for n, fp in reference.features.items() if n.startswith(f"{name}:")), "output")
        multi.append(
            (name, role, stat, p, float(np.linalg.norm(ref.mean(0))), float(np.linalg.norm(now.mean(0))))
        )
    adjusted = _bh(np.array([s[4] for s in stats] + [m[3] for m in multi]))
    out = [
        FeatureDrift(
            name,
            fp.role,
            score,
            ks,
            p,
            float(adj),
            bool(adj < alpha and score >= min_psi),
            fp.mean,
            cur_mean,
        )
        for (name, fp, score, ks, p, cur_mean), adj in zip(stats, adjusted[: len(stats)], strict=True)
    ]
    out += [
        FeatureDrift(
            f"{name}:mmd", role, 0.0, stat, p, float(adj), bool(adj < alpha), ref_norm, cur_norm, "mmd"
        )
        for (name, role, stat, p, ref_norm, cur_norm), adj in zip(multi, adjusted[len(stats) :], strict=True)
    ]
    return DriftReport(
        reference.model, reference.version, reference.rows, rows, alpha, min_psi, out, cur, reference, issues
    )


def mmd_test(
    reference: np.ndarray, current: np.ndarray, *, permutations: int = _PERMUTATIONS, seed: int = 0
) -> tuple[float, float]:
    """Two-sample test on whole rows (embeddings): the squared maximum mean discrepancy with a Gaussian
    kernel (bandwidth: the median distance) and its permutation p-value. Returns ``(MMD², p)``.

    Where no permutation reaches the observed MMD², the p-value is the normal tail beyond it (fitted to
    the permutations), so a clear drift is not capped at ``1 / (permutations + 1)`` (which, adjusted
    over the other features, could never fall below ``alpha``). At most ``_EMBEDDING_ROWS`` current rows
    are used (a seeded sample).
    """
    from scipy.stats import norm

    rng = np.random.default_rng(seed)
    if len(current) > _EMBEDDING_ROWS:
        current = current[rng.choice(len(current), _EMBEDDING_ROWS, replace=False)]
    z = np.vstack([reference, current])
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * z @ z.T, 0.0)
    scale = float(np.median(d2[np.triu_indices(len(z), 1)])) or 1.0
    kernel = np.exp(-d2 / scale)
    n, m = len(reference), len(current)
    base = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    observed = float(base @ kernel @ base)
    shuffled = np.array([rng.permutation(base) for _ in range(permutations)])
    null = np.einsum("pi,pi->p", shuffled @ kernel, shuffled)
    beyond = int((null >= observed).sum())
    if beyond:
        return observed, (beyond + 1) / (permutations + 1)
    spread = float(null.std()) or 1e-12
    return observed, float(min(1.0 / (permutations + 1), norm.sf((observed - null.mean()) / spread)))


def check_thresholds(alpha: float, min_psi: float, min_rows: int = 30) -> None:
    """Refuse thresholds that would make every verdict "no drift" (NaN, inf, out of range).

    Raises:
        DriftError: naming the threshold and its range.
    """
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise DriftError(f"alpha must be a number between 0 and 1 (exclusive), not {alpha}")
    if not isinstance(min_psi, (int, float)) or not math.isfinite(min_psi) or min_psi < 0:
        raise DriftError(f"min_psi must be a finite number >= 0, not {min_psi}")
    if not isinstance(min_rows, int) or min_rows < 1:
        raise DriftError(f"min_rows must be a positive integer, not {min_rows}")


# -- output -------------------------------------------------------------------------------------------


def drift_registry(reports: Sequence[DriftReport]) -> Any:
    """A prometheus_client registry holding the reports as gauges (for a push or a textfile collector):
    ``tritonforge_drift_psi{model,version,feature}``, ``tritonforge_drift_drifted_features{model,version}``
    ``tritonforge_drift_detected{model,version}`` (1 when drifted) and
    ``tritonforge_drift_incomplete{model,version}`` (1 when not everything could be judged)."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    psi_g = Gauge(
        "tritonforge_drift_psi",
        "PSI of a feature vs the reference",
        ["model", "version", "feature"],
        registry=registry,
    )
    count_g = Gauge(
        "tritonforge_drift_drifted_features",
        "Features judged drifted",
        ["model", "version"],
        registry=registry,
    )
    flag_g = Gauge(
        "tritonforge_drift_detected", "1 when any feature drifted", ["model", "version"], registry=registry
    )
    incomplete_g = Gauge(
        "tritonforge_drift_incomplete",
        "1 when part of the traffic or of the features could not be judged",
        ["model", "version"],
        registry=registry,
    )
    for r in reports:
        incomplete_g.labels(r.model, r.version).set(0 if r.complete else 1)
        for f in r.features:
            psi_g.labels(r.model, r.version, f.feature).set(f.psi)
        count_g.labels(r.model, r.version).set(len(r.moved))
        flag_g.labels(r.model, r.version).set(1 if r.drifted else 0)
    return registry


def write_metrics_file(reports: Sequence[DriftReport], path: str | os.PathLike[str]) -> Path:
    """Write the gauges of :func:`drift_registry` in Prometheus text format (node_exporter's textfile
    collector picks ``*.prom`` files up), atomically."""
    from prometheus_client import write_to_textfile

    with atomic_path(path) as tmp:
        write_to_textfile(str(tmp), drift_registry(reports))
    return Path(path)


def html_report(report: DriftReport, path: str | os.PathLike[str], *, plots: int = 12) -> Path:
    """A self-contained HTML page: verdict, the table of every feature, and reference-vs-current
    histograms of the ``plots`` features that moved most (PNG, embedded)."""
    import base64
    import html
    import io

    if Path(path).is_dir():
        raise DriftError(f"{path} is a folder: give the report a file name, e.g. {Path(path) / 'drift.html'}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    top = sorted(report.features, key=lambda f: -f.psi)[:plots]
    for f in top:
        ref = np.asarray(report.reference.features[f.feature].sample) if report.reference else np.array([])
        cur = report.current.get(f.feature, np.array([]))
        fig, ax = plt.subplots(figsize=(4, 2.6), dpi=90)
        both = np.concatenate([ref, cur]) if len(ref) else cur
        edges: Any = np.histogram_bin_edges(both, bins=20) if np.ptp(both) > 0 else 3
        ax.hist(ref, bins=edges, alpha=0.55, density=True, label="reference")
        ax.hist(cur, bins=edges, alpha=0.55, density=True, label="current")
        ax.set_title(f"{f.feature}  PSI {f.psi:.3f}" + ("  DRIFTED" if f.drifted else ""), fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        figures.append(base64.b64encode(buf.getvalue()).decode())
    verdict = report.verdict.upper() if report.verdict != "no drift" else "no drift"
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in report.problems)
    rows = "\n".join(
        f"<tr class='{'d' if f.drifted else ''}'><td>{html.escape(f.feature)}</td><td>{f.role}</td>"
        f"<td>{f.psi:.4f}</td><td>{f.ks:.3f}</td><td>{f.p_value:.2e}</td><td>{f.p_adjusted:.2e}</td>"
        f"<td>{f.ref_mean:.4g}</td><td>{f.cur_mean:.4g}</td><td>{'yes' if f.drifted else ''}</td></tr>"
        for f in sorted(report.features, key=lambda f: -f.psi)
    )
    images = "".join(f"<img src='data:image/png;base64,{b}'>" for b in figures)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>drift: {html.escape(report.model)} v{html.escape(report.version)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}
td:first-child{{text-align:left}}tr.d{{background:#fdd}}img{{margin:4px}}</style></head><body>
<h1>{html.escape(report.model)} version {html.escape(report.version)}: {verdict}</h1>
<p>{len(report.moved)} of {len(report.features)} features drifted (BH-adjusted KS p &lt; {report.alpha}
and PSI &ge; {report.min_psi}); {report.current_rows} current rows vs {report.reference_rows} reference rows;
largest PSI {report.max_psi:.3f}.</p>{f"<h2>Not judged</h2><ul>{problems}</ul>" if problems else ""}
<h2>Features that moved most</h2>{images}
<h2>Every feature</h2><table><tr><th>feature</th><th>role</th><th>PSI</th><th>KS</th><th>p</th>
<th>p (BH)</th><th>ref mean</th><th>cur mean</th><th>drifted</th></tr>{rows}</table></body></html>"""
    return write_atomic(path, page)
