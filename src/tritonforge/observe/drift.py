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
import datetime as _dt
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.atomic import atomic_path, write_atomic
from tritonforge.errors import DriftError

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_MIN_PSI",
    "PROFILE_FILE",
    "DriftError",
    "DriftReport",
    "FeatureDrift",
    "FeatureProfile",
    "Profile",
    "compare",
    "drift_registry",
    "features",
    "html_report",
    "profile",
    "psi",
    "read_profile",
    "write_metrics_file",
    "write_profile",
]

PROFILE_FILE = "drift_profile.json"
DEFAULT_ALPHA = 0.01
DEFAULT_MIN_PSI = 0.1
_SAMPLE = 2000  # reference values kept per feature for the KS test
_WIDE = 64  # a tensor with more values per row than this is summarised per row (mean, std, min, max, norm)
_VOCAB = 5000
_EPS = 1e-4
_WORD = re.compile(r"\w+", re.UNICODE)


# -- features -----------------------------------------------------------------------------------------


def _texts(array: np.ndarray) -> list[str]:
    rows = array.reshape(array.shape[0], -1) if array.ndim else array.reshape(1, 1)
    out = []
    for row in rows:
        parts = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in row]
        out.append(" ".join(parts))
    return out


def _is_text(array: np.ndarray) -> bool:
    return array.dtype.kind in ("O", "S", "U")


def features(
    tensors: Mapping[str, Any], *, vocab: Mapping[str, Sequence[str]] | None = None
) -> dict[str, np.ndarray]:
    """Per-row feature values of a batch of tensors: ``{feature name: 1-d float array}``.

    A numeric tensor of up to 64 values per row gives one feature per value (``name[i]``); a wider one
    (e.g. an embedding) gives per-row ``mean``, ``std``, ``min``, ``max`` and ``norm``. A text tensor gives
    ``tokens`` and ``chars`` per row, and ``oov`` (share of words not in ``vocab[name]``) when a vocabulary
    is known.

    Raises:
        DriftError: a tensor without a batch dimension or with mismatched row counts.
    """
    out: dict[str, np.ndarray] = {}
    rows: int | None = None
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.ndim == 0:
            raise DriftError(f"tensor {name!r} is a scalar: drift needs a batch dimension (rows first)")
        if rows is not None and array.shape[0] != rows:
            raise DriftError(f"tensor {name!r} has {array.shape[0]} rows, the others {rows}: pass one batch")
        rows = array.shape[0]
        if _is_text(array):
            texts = _texts(array)
            words = [_WORD.findall(t.lower()) for t in texts]
            out[f"{name}:tokens"] = np.array([len(w) for w in words], np.float64)
            out[f"{name}:chars"] = np.array([len(t) for t in texts], np.float64)
            if vocab and name in vocab:
                known = set(vocab[name])
                out[f"{name}:oov"] = np.array(
                    [sum(x not in known for x in w) / len(w) if w else 0.0 for w in words], np.float64
                )
            continue
        flat = array.reshape(array.shape[0], -1).astype(np.float64)
        if flat.shape[1] == 1:
            out[name] = flat[:, 0]
        elif flat.shape[1] <= _WIDE:
            for i in range(flat.shape[1]):
                out[f"{name}[{i}]"] = flat[:, i]
        else:
            out[f"{name}:mean"] = flat.mean(axis=1)
            out[f"{name}:std"] = flat.std(axis=1)
            out[f"{name}:min"] = flat.min(axis=1)
            out[f"{name}:max"] = flat.max(axis=1)
            out[f"{name}:norm"] = np.linalg.norm(flat, axis=1)
    return out


# -- profiles -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class FeatureProfile:
    """One feature of the reference: decile bin edges and shares, summary figures, a bounded sample."""

    name: str
    role: str  # "input" or "output"
    edges: list[float]
    shares: list[float]
    quantiles: dict[str, float]
    mean: float
    std: float
    sample: list[float]


@dataclasses.dataclass
class Profile:
    """A model version's reference: its features, the rows it came from, text vocabularies."""

    model: str
    version: str
    rows: int
    features: dict[str, FeatureProfile]
    vocab: dict[str, list[str]]
    created: str
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "created": self.created,
            "source": self.source,
            "vocab": self.vocab,
            "features": [dataclasses.asdict(f) for f in self.features.values()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Profile:
        feats = {f["name"]: FeatureProfile(**f) for f in data["features"]}
        return cls(
            str(data["model"]),
            str(data["version"]),
            int(data["rows"]),
            feats,
            {k: list(v) for k, v in data.get("vocab", {}).items()},
            str(data.get("created", "")),
            str(data.get("source", "")),
        )


def _bins(values: np.ndarray, bins: int) -> tuple[list[float], list[float]]:
    """Interior cut points at the reference's quantiles (deduplicated: discrete data has ties)."""
    cuts = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(cuts, values, side="right"), minlength=len(cuts) + 1)
    return [float(c) for c in cuts], [float(c) for c in counts / counts.sum()]


def profile(
    inputs: Mapping[str, Any],
    outputs: Mapping[str, Any] | None = None,
    *,
    model: str = "",
    version: str | int = "",
    bins: int = 10,
    source: str = "",
    seed: int = 0,
) -> Profile:
    """The reference profile of the data a model version was verified on (and its outputs on it).

    The build calls this right after verification (see ``tools/build_digits.py``) and stores the result
    with :func:`write_profile` beside the version's manifest.

    Raises:
        DriftError: no rows, or fewer than 2 bins.
    """
    if bins < 2:
        raise DriftError(f"bins must be at least 2, not {bins}")
    rng = np.random.default_rng(seed)
    vocab: dict[str, list[str]] = {}
    for name, value in {**inputs, **(outputs or {})}.items():
        array = np.asarray(value)
        if _is_text(array):
            counts = Counter(w for t in _texts(array) for w in _WORD.findall(t.lower()))
            vocab[name] = [w for w, _ in counts.most_common(_VOCAB)]
    rows = 0
    feats: dict[str, FeatureProfile] = {}
    for role, tensors in (("input", inputs), ("output", outputs or {})):
        for fname, values in features(tensors, vocab=vocab).items():
            rows = max(rows, len(values))
            if len(values) == 0:
                raise DriftError(f"feature {fname!r} has no rows: a profile needs the verification data")
            edges, shares = _bins(values, bins)
            qs = np.quantile(values, [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99])
            keep = values if len(values) <= _SAMPLE else rng.choice(values, _SAMPLE, replace=False)
            feats[fname] = FeatureProfile(
                fname,
                role,
                edges,
                shares,
                {
                    k: float(v)
                    for k, v in zip(("p1", "p5", "p25", "p50", "p75", "p95", "p99"), qs, strict=True)
                },
                float(values.mean()),
                float(values.std()),
                [float(v) for v in keep],
            )
    if not feats:
        raise DriftError("a profile needs at least one input or output tensor")
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return Profile(model, str(version), rows, feats, vocab, created, source)


def write_profile(version_dir: str | os.PathLike[str], prof: Profile) -> Path:
    """Store ``prof`` as ``<version_dir>/drift_profile.json`` (written to a temp file, then moved).

    Raises:
        DriftError: the version folder does not exist.
    """
    folder = Path(version_dir)
    if not folder.is_dir():
        raise DriftError(f"version folder {folder} does not exist: write the profile after the model")
    return write_atomic(folder / PROFILE_FILE, json.dumps(prof.to_json()))


def read_profile(
    path: str | os.PathLike[str], model: str | None = None, version: str | int | None = None
) -> Profile:
    """A profile from a file, a version folder, or a repository (``model`` and optionally ``version``:
    default the newest version that has one).

    Raises:
        DriftError: no profile there (says where it looked and how to make one).
    """
    path = Path(path)
    if path.is_file():
        candidates = [path]
    elif model is None:
        candidates = [path / PROFILE_FILE]
    elif version is not None:
        candidates = [path / model / str(version) / PROFILE_FILE]
    else:
        folder = path / model
        numbered = sorted((p for p in folder.glob("*") if p.name.isdigit()), key=lambda p: -int(p.name))
        candidates = [p / PROFILE_FILE for p in numbered]
    for candidate in candidates:
        if candidate.is_file():
            try:
                return Profile.from_json(json.loads(candidate.read_text()))
            except (ValueError, KeyError, TypeError) as exc:
                raise DriftError(f"{candidate} is not a drift profile ({exc}): rebuild the model") from None
    where = (
        f"{path}" + (f" for model {model!r}" if model else "") + (f" version {version}" if version else "")
    )
    raise DriftError(
        f"no {PROFILE_FILE} in {where}: the build writes one (observe.drift.profile + write_profile)"
    )


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

    @property
    def drifted(self) -> bool:
        return any(f.drifted for f in self.features)

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
            "drifted": self.drifted,
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
) -> DriftReport:
    """Compare current traffic (``{tensor name: rows}``, inputs and outputs together) with ``reference``.

    Features the traffic lacks (e.g. outputs not sampled) are left out; features it has that the profile
    lacks are ignored.

    Raises:
        DriftError: fewer than ``min_rows`` rows, no feature in common, or a bad ``alpha``/``min_psi``.
    """
    from scipy.stats import ks_2samp

    if not 0 < alpha < 1:
        raise DriftError(f"alpha must be between 0 and 1, not {alpha}")
    if min_psi < 0:
        raise DriftError(f"min_psi must be >= 0, not {min_psi}")
    cur = features(current, vocab=reference.vocab)
    common = [name for name in reference.features if name in cur]
    if not common:
        raise DriftError(
            f"the traffic of {reference.model or 'the model'} shares no feature with its profile "
            f"(traffic: {sorted(current)[:5]}, profile: {sorted(reference.features)[:5]}...): "
            "sample the same tensors the profile was made from"
        )
    rows = len(cur[common[0]])
    if rows < min_rows:
        raise DriftError(
            f"only {rows} row(s) of traffic for {reference.model or 'the model'}: need {min_rows}"
        )
    stats = []
    for name in common:
        fp, values = reference.features[name], cur[name]
        ref_sample = np.asarray(fp.sample)
        if np.ptp(ref_sample) == 0 and np.ptp(values) == 0 and ref_sample[0] == values[0]:
            ks, p = 0.0, 1.0  # a constant feature that stayed the same value
        else:
            result = ks_2samp(ref_sample, values)
            ks, p = float(result.statistic), float(result.pvalue)
        stats.append((name, fp, psi(fp.edges, fp.shares, values), ks, p, float(values.mean())))
    adjusted = _bh(np.array([s[4] for s in stats]))
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
        for (name, fp, score, ks, p, cur_mean), adj in zip(stats, adjusted, strict=True)
    ]
    return DriftReport(
        reference.model, reference.version, reference.rows, rows, alpha, min_psi, out, cur, reference
    )


# -- output -------------------------------------------------------------------------------------------


def drift_registry(reports: Sequence[DriftReport]) -> Any:
    """A prometheus_client registry holding the reports as gauges (for a push or a textfile collector):
    ``tritonforge_drift_psi{model,version,feature}``, ``tritonforge_drift_drifted_features{model,version}``
    and ``tritonforge_drift_detected{model,version}`` (1 when drifted)."""
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
    for r in reports:
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
    verdict = "DRIFTED" if report.drifted else "no drift"
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
largest PSI {report.max_psi:.3f}.</p>
<h2>Features that moved most</h2>{images}
<h2>Every feature</h2><table><tr><th>feature</th><th>role</th><th>PSI</th><th>KS</th><th>p</th>
<th>p (BH)</th><th>ref mean</th><th>cur mean</th><th>drifted</th></tr>{rows}</table></body></html>"""
    return write_atomic(path, page)
