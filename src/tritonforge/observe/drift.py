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

import contextlib
import dataclasses
import datetime as _dt
import itertools
import json
import math
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

PROFILE_FILE = "drift_profile.json"
DEFAULT_ALPHA = 0.01
DEFAULT_MIN_PSI = 0.1
_SAMPLE = 2000  # reference values kept per feature for the KS test
_WIDE = 64  # a tensor with more values per row than this is summarised per row (mean, std, min, max, norm)
_VOCAB = 5000
_EMBEDDING_ROWS = 256  # reference rows kept per embedding tensor for the MMD test
_PERMUTATIONS = 500
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
        flat = _snap(array.reshape(array.shape[0], -1).astype(np.float64))
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
            out[f"{name}:norm"] = _snap(np.linalg.norm(flat, axis=1))
    return out


def _snap(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to 20 significant bits (about 6 decimal digits, relative): float32 models and
    float64 references disagree in the last bits (a normalised embedding's norm is 0.99999994 here and
    1.0000001 there), and with a bin per point mass that rounding noise would read as drift."""
    mantissa, exponent = np.frexp(values)
    return np.ldexp(np.round(mantissa * 2.0**20) / 2.0**20, exponent)


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
    #: per wide numeric tensor (an embedding), a sample of whole reference rows for the MMD test
    embeddings: dict[str, list[list[float]]] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": 1,
            "embeddings": self.embeddings,
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "created": self.created,
            "source": self.source,
            "vocab": self.vocab,
            "features": [dataclasses.asdict(f) for f in self.features.values()],
        }

    @classmethod
    def from_json(cls, data: Any) -> Profile:
        """A profile from its JSON form, checked: known keys, finite numbers, bins that add up.

        Raises:
            DriftError: anything malformed, named (a NaN share or an unknown key would otherwise
                disarm or skew the verdict).
        """
        if not isinstance(data, dict):
            raise DriftError(f"a profile is a JSON object, not {type(data).__name__}")
        _keys(data, _PROFILE_KEYS, {"model", "version", "rows", "features"}, "the profile")
        if data.get("format", 1) != 1:
            raise DriftError(f"profile format {data.get('format')!r} is not 1: rebuild with this version")
        rows = data["rows"]
        if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
            raise DriftError(f"rows must be a positive integer, not {rows!r}")
        vocab = data.get("vocab", {})
        if not isinstance(vocab, dict) or not all(
            isinstance(v, list) and all(isinstance(w, str) for w in v) for v in vocab.values()
        ):
            raise DriftError("vocab must map a tensor name to a list of words")
        if not isinstance(data["features"], list) or not data["features"]:
            raise DriftError("features must be a non-empty list")
        feats = {}
        for item in data["features"]:
            fp = _feature_from_json(item)
            if fp.name in feats:
                raise DriftError(f"feature {fp.name!r} appears twice")
            feats[fp.name] = fp
        embeddings = data.get("embeddings", {})
        if not isinstance(embeddings, dict):
            raise DriftError("embeddings must map a tensor name to a list of rows")
        for name, sample in embeddings.items():
            if not isinstance(sample, list) or len(sample) < 2:
                raise DriftError(f"embeddings of {name!r} must be a list of at least 2 rows")
            rows_of = [_finite_list(row, f"embeddings of {name!r} row {i}") for i, row in enumerate(sample)]
            if len({len(r) for r in rows_of}) != 1 or not rows_of[0]:
                raise DriftError(f"embeddings of {name!r}: every row must have the same non-zero width")
        return cls(
            str(data["model"]),
            str(data["version"]),
            rows,
            feats,
            {str(k): list(v) for k, v in vocab.items()},
            str(data.get("created", "")),
            str(data.get("source", "")),
            {str(k): v for k, v in embeddings.items()},
        )


_PROFILE_KEYS = {"format", "model", "version", "rows", "created", "source", "vocab", "features", "embeddings"}
_FEATURE_KEYS = {f.name for f in dataclasses.fields(FeatureProfile)}
_QUANTILES = ("p1", "p5", "p25", "p50", "p75", "p95", "p99")


def _keys(data: Mapping[str, Any], known: set[str], required: set[str], what: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise DriftError(f"{what} has unknown key(s) {unknown}: known are {sorted(known)}")
    missing = sorted(required - set(data))
    if missing:
        raise DriftError(f"{what} lacks {missing}")


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DriftError(f"{what} must be a finite number, not {value!r}")
    return float(value)


def _finite_list(values: Any, what: str) -> list[float]:
    if not isinstance(values, list):
        raise DriftError(f"{what} must be a list of numbers")
    return [_finite(v, f"{what}[{i}]") for i, v in enumerate(values)]


def _feature_from_json(item: Any) -> FeatureProfile:
    if not isinstance(item, dict):
        raise DriftError(f"a feature is a JSON object, not {type(item).__name__}")
    name = item.get("name")
    what = f"feature {name!r}"
    _keys(item, _FEATURE_KEYS, _FEATURE_KEYS, what)
    if not isinstance(name, str) or not name:
        raise DriftError(f"a feature's name must be a non-empty string, not {name!r}")
    if item["role"] not in ("input", "output"):
        raise DriftError(f"{what}: role must be 'input' or 'output', not {item['role']!r}")
    edges = _finite_list(item["edges"], f"{what} edges")
    shares = _finite_list(item["shares"], f"{what} shares")
    if any(b <= a for a, b in itertools.pairwise(edges)):
        raise DriftError(f"{what}: edges must be strictly increasing")
    if len(shares) != len(edges) + 1:
        raise DriftError(f"{what}: {len(edges)} edges need {len(edges) + 1} shares, not {len(shares)}")
    if any(x < 0 for x in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise DriftError(f"{what}: shares must be >= 0 and add up to 1 (they add up to {sum(shares):g})")
    quantiles = item["quantiles"]
    if not isinstance(quantiles, dict) or set(quantiles) != set(_QUANTILES):
        raise DriftError(f"{what}: quantiles must be {list(_QUANTILES)}")
    sample = _finite_list(item["sample"], f"{what} sample")
    if not sample:
        raise DriftError(f"{what}: the reference sample is empty")
    std = _finite(item["std"], f"{what} std")
    if std < 0:
        raise DriftError(f"{what}: std must be >= 0, not {std}")
    return FeatureProfile(
        name,
        item["role"],
        edges,
        shares,
        {k: _finite(v, f"{what} quantile {k}") for k, v in quantiles.items()},
        _finite(item["mean"], f"{what} mean"),
        std,
        sample,
    )


def _bins(values: np.ndarray, bins: int) -> tuple[list[float], list[float]]:
    """Interior cut points at the reference's quantiles, with a bin of its own for each point mass.

    A value holding at least ``1/bins`` of the rows (a pixel that is mostly 0, a constant) gets the bin
    ``[v, next float after v)``: otherwise deduplicated quantile cuts would merge it with everything above
    it, and a feature that is 0 in 90 % of the rows would keep one bin, a PSI of 0 whatever happens to it.
    """
    unique, counts = np.unique(values, return_counts=True)
    heavy = unique[counts >= len(values) / bins]
    rest = values[~np.isin(values, heavy)]
    cuts: set[float] = set()
    for v in heavy:
        cuts.update((float(v), float(np.nextafter(v, np.inf))))
    if len(rest):
        cont = max(2, round(bins * len(rest) / len(values)))
        cuts.update(float(c) for c in np.quantile(rest, np.linspace(0, 1, cont + 1)[1:-1]))
    edges = np.array(sorted(cuts), np.float64)
    filled = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return [float(c) for c in edges], [float(c) for c in filled / filled.sum()]


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
    held_out: dict[str, np.ndarray] = {}  # per text tensor: the rows its oov reference is measured on
    embeddings: dict[str, list[list[float]]] = {}
    for name, value in {**inputs, **(outputs or {})}.items():
        array = np.asarray(value)
        if _is_text(array):
            # The vocabulary comes from half of the rows and the share of unknown words is measured on
            # the other half: measured on the rows it was built from, it would be 0 and never move.
            order = rng.permutation(len(array))
            known, held = order[: len(array) // 2], order[len(array) // 2 :]
            counts = Counter(w for t in _texts(array[known]) for w in _WORD.findall(t.lower()))
            vocab[name] = [w for w, _ in counts.most_common(_VOCAB)]
            held_out[name] = array[held]
        elif array.ndim >= 2 and array.dtype.kind in "fiu":
            flat = array.reshape(array.shape[0], -1)
            if flat.shape[1] > _WIDE:  # an embedding: a sample of whole rows for the two-sample test
                pick = rng.choice(len(flat), min(len(flat), _EMBEDDING_ROWS), replace=False)
                embeddings[name] = np.round(flat[np.sort(pick)].astype(np.float64), 5).tolist()
    rows = 0
    feats: dict[str, FeatureProfile] = {}
    for role, tensors in (("input", inputs), ("output", outputs or {})):
        measured = features(tensors, vocab=vocab)
        for name in held_out:
            if name in tensors and len(held_out[name]):
                oov = features({name: held_out[name]}, vocab=vocab)[f"{name}:oov"]
                measured[f"{name}:oov"] = oov
        for fname, values in measured.items():
            rows = max(rows, len(values))
            if len(values) == 0:
                raise DriftError(f"feature {fname!r} has no rows: a profile needs the verification data")
            if not np.isfinite(values).all():
                raise DriftError(f"feature {fname!r} has non-finite values: a profile needs finite data")
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
    return Profile(model, str(version), rows, feats, vocab, created, source, embeddings)


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
                data = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DriftError(f"{candidate} is not readable JSON ({exc}): rebuild the model") from None
            try:
                return Profile.from_json(data)
            except DriftError as exc:
                raise DriftError(f"{candidate} is not a valid drift profile: {exc.message}") from None
    where = (
        f"{path}" + (f" for model {model!r}" if model else "") + (f" version {version}" if version else "")
    )
    raise DriftError(f"no {PROFILE_FILE} in {where}: {_who_writes(path, model, version)}")


def _who_writes(path: Path, model: str | None, version: str | int | None) -> str:
    """The hint after a missing profile: the build that writes one, from the manifest, if there is one."""
    manifests = []
    if model is not None:
        folder = path / model
        versions = [folder / str(version)] if version is not None else sorted(folder.glob("*"), reverse=True)
        manifests = [v / "manifest.json" for v in versions if (v / "manifest.json").is_file()]
    script = ""
    for manifest in manifests[:1]:
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            script = str(json.loads(manifest.read_text(encoding="utf-8"))["build"]["script"])
    if script in _PROFILING_BUILDS:
        return f"its build ({script}) writes one: rerun it with --force"
    made_by = f"its build ({script}) writes none" if script else "this model's build writes none"
    return (
        f"{made_by}; call tritonforge.observe.drift.profile + write_profile on its verification data "
        f"(as {' and '.join(sorted(_PROFILING_BUILDS))} do)"
    )


_PROFILING_BUILDS = {"tritonforge.examples.build_digits", "tritonforge.examples.build_minilm"}


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
