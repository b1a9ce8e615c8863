"""Reference profiles for drift: what a model version was verified on, feature by feature.

:func:`features` flattens a model's inputs and outputs into named features (wide tensors summarised per
row, text tensors as token/character lengths and unknown-word shares); :func:`profile` keeps per feature
bin edges at the reference's deciles (a value holding a tenth of the rows gets a bin of its own), the share
in each bin, quantiles and a bounded sample, plus a vocabulary and embedding rows for the text and MMD
tests. :func:`write_profile` stores it as ``drift_profile.json`` beside the version's ``manifest.json``
(0644, atomically); :func:`read_profile` finds it again and refuses a malformed one field by field.
:mod:`tritonforge.observe.drift` compares traffic with it.
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

from tritonforge.atomic import write_atomic
from tritonforge.errors import DriftError
from tritonforge.files import read_text

__all__ = [
    "PROFILE_FILE",
    "FeatureProfile",
    "Profile",
    "features",
    "profile",
    "read_profile",
    "write_profile",
]

PROFILE_FILE = "drift_profile.json"
_SAMPLE = 2000  # reference values kept per feature for the KS test
_WIDE = 64  # a tensor with more values per row than this is summarised per row (mean, std, min, max, norm)
_VOCAB = 5000
_EMBEDDING_ROWS = 256  # reference rows kept per embedding tensor for the MMD test
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
    if not path.is_dir() and (path.exists() or path.is_symlink()):  # a file: a FIFO is refused by name
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
        if candidate.exists() or candidate.is_symlink():
            text = read_text(candidate, what="drift profile", error=DriftError)  # bounded, regular only
            try:
                data = json.loads(text)
            except (ValueError, RecursionError) as exc:
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
