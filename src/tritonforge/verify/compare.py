"""Numbers that say how far an artifact's outputs are from its source's: the figures users trust.

``compare`` measures one output tensor of a candidate (an export, a quantized model) against the
reference (the source module, the FP32 model) on the same inputs, and a ``Tolerance`` decides pass/fail::

    report = compare(reference, candidate, tolerance=Tolerance(min_cosine_mean=0.99), labels=y)
    report.passed, report.cosine_mean, report.accuracy

Only numpy is needed here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Artifact", "Report", "Tolerance", "compare", "merge_reports"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tolerance:
    """What a candidate must meet to pass; ``None`` leaves a figure unchecked.

    Example:
        >>> Tolerance(max_abs=1e-4).max_abs
        0.0001
    """

    max_abs: float | None = None
    max_rel: float | None = None
    min_cosine_mean: float | None = None
    min_cosine_min: float | None = None
    max_accuracy_drop: float | None = None
    min_label_agreement: float | None = None
    #: added to |reference| in the relative error, so near-zero values don't blow it up
    rel_floor: float = 1e-3

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "rel_floor"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Report:
    """How a candidate's outputs compare with the reference's on ``samples`` inputs."""

    samples: int
    max_abs: float
    max_rel: float
    cosine_mean: float
    cosine_min: float
    tolerance: Tolerance
    accuracy_reference: float | None = None
    accuracy: float | None = None
    label_agreement: float | None = None
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        """The figures as JSON-ready values (what goes into manifest.json)."""
        out: dict[str, Any] = {
            "samples": self.samples,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "cosine_mean": self.cosine_mean,
            "cosine_min": self.cosine_min,
            "tolerance": self.tolerance.as_dict(),
            "passed": self.passed,
        }
        for key in ("accuracy_reference", "accuracy", "label_agreement"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.failures:
            out["failures"] = list(self.failures)
        return out

    def summary(self) -> str:
        """One line with every figure, e.g. for an error message."""
        parts = [
            f"samples={self.samples}",
            f"max_abs={self.max_abs:.3g}",
            f"max_rel={self.max_rel:.3g}",
            f"cosine mean={self.cosine_mean:.5f} min={self.cosine_min:.5f}",
        ]
        if self.accuracy is not None:
            parts.append(f"accuracy={self.accuracy:.4f} (reference {self.accuracy_reference:.4f})")
        if self.label_agreement is not None:
            parts.append(f"label agreement={self.label_agreement:.4f}")
        return ", ".join(parts)


def _rows(array: np.ndarray) -> np.ndarray:
    """Samples as rows: axis 0 stays, the rest is flattened (a vector per sample)."""
    a = np.asarray(array, dtype=np.float64)
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(-1, 1)
    return a.reshape(a.shape[0], -1)


def _cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine similarity per vector: along the last axis (a token embedding, a probability row)."""
    r = np.asarray(ref, dtype=np.float64)
    g = np.asarray(got, dtype=np.float64)
    if r.ndim <= 1:
        r, g = _rows(r), _rows(g)
    r = r.reshape(-1, r.shape[-1])
    g = g.reshape(-1, g.shape[-1])
    num = np.sum(r * g, axis=1)
    den = np.linalg.norm(r, axis=1) * np.linalg.norm(g, axis=1)
    both_zero = den == 0
    cos = np.where(both_zero, 1.0, num / np.where(both_zero, 1.0, den))
    return cos


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    tolerance: Tolerance | None = None,
    labels: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    predictions: tuple[np.ndarray, np.ndarray] | None = None,
) -> Report:
    """Compare ``candidate`` with ``reference`` (same shape; axis 0 is the sample axis).

    Args:
        reference: the source's output, e.g. FP32 logits ``[N, C]`` or embeddings ``[N, T, D]``.
        candidate: the artifact's output on the same inputs.
        tolerance: what decides pass/fail (default: nothing checked, always passes).
        labels: true labels ``[N]``; with them the accuracy of both (argmax of the last axis, or
            ``predictions``) is reported.
        mask: ``[N, T]`` for token outputs: padded positions are left out of every figure.
        predictions: (reference labels, candidate labels) when the model returns labels itself.

    Example:
        >>> r = compare(np.ones((2, 3)), np.ones((2, 3)), tolerance=Tolerance(max_abs=0.0))
        >>> r.passed, r.cosine_min
        (True, 1.0)
    """
    tol = tolerance or Tolerance()
    ref = np.asarray(reference)
    got = np.asarray(candidate)
    if ref.shape != got.shape:
        return Report(
            samples=int(ref.shape[0]) if ref.ndim else 1,
            max_abs=float("inf"),
            max_rel=float("inf"),
            cosine_mean=0.0,
            cosine_min=0.0,
            tolerance=tol,
            failures=(f"shape {got.shape} differs from the reference's {ref.shape}",),
        )
    r64 = ref.astype(np.float64)
    g64 = got.astype(np.float64)
    if mask is not None:
        keep = np.asarray(mask).astype(bool)
        r_vec, g_vec = r64[keep], g64[keep]  # [kept tokens, D]
    else:
        r_vec, g_vec = r64, g64
    if r_vec.size:
        diff = np.abs(r_vec - g_vec)
        max_abs = float(diff.max())
        max_rel = float((diff / (np.abs(r_vec) + tol.rel_floor)).max())
        cos = _cosines(r_vec, g_vec)
        cos_mean, cos_min = float(cos.mean()), float(cos.min())
    else:
        max_abs = max_rel = 0.0
        cos_mean = cos_min = 1.0
    acc_ref = acc = agreement = None
    if predictions is not None or labels is not None:
        if predictions is not None:
            pred_ref, pred_got = (np.asarray(p).reshape(-1) for p in predictions)
        else:
            pred_ref, pred_got = (
                ref.reshape(ref.shape[0], -1).argmax(1),
                got.reshape(got.shape[0], -1).argmax(1),
            )
        agreement = float(np.mean(pred_ref == pred_got))
        if labels is not None:
            y = np.asarray(labels).reshape(-1)
            acc_ref, acc = float(np.mean(pred_ref == y)), float(np.mean(pred_got == y))
    failures = _failures(tol, max_abs, max_rel, cos_mean, cos_min, acc_ref, acc, agreement)
    return Report(
        samples=int(ref.shape[0]) if ref.ndim else 1,
        max_abs=max_abs,
        max_rel=max_rel,
        cosine_mean=cos_mean,
        cosine_min=cos_min,
        tolerance=tol,
        accuracy_reference=acc_ref,
        accuracy=acc,
        label_agreement=agreement,
        failures=tuple(failures),
    )


def _failures(
    tol: Tolerance,
    max_abs: float,
    max_rel: float,
    cos_mean: float,
    cos_min: float,
    acc_ref: float | None,
    acc: float | None,
    agreement: float | None,
) -> list[str]:
    out: list[str] = []
    if tol.max_abs is not None and not max_abs <= tol.max_abs:
        out.append(f"max abs error {max_abs:.3g} > {tol.max_abs:g}")
    if tol.max_rel is not None and not max_rel <= tol.max_rel:
        out.append(f"max rel error {max_rel:.3g} > {tol.max_rel:g}")
    if tol.min_cosine_mean is not None and not cos_mean >= tol.min_cosine_mean:
        out.append(f"mean cosine {cos_mean:.6f} < {tol.min_cosine_mean:g}")
    if tol.min_cosine_min is not None and not cos_min >= tol.min_cosine_min:
        out.append(f"min cosine {cos_min:.6f} < {tol.min_cosine_min:g}")
    if (
        tol.max_accuracy_drop is not None
        and acc is not None
        and acc_ref is not None
        and not acc_ref - acc <= tol.max_accuracy_drop
    ):
        out.append(
            f"accuracy {acc:.4f} is {acc_ref - acc:.4f} below the reference's {acc_ref:.4f} "
            f"(> {tol.max_accuracy_drop:g})"
        )
    if (
        tol.min_label_agreement is not None
        and agreement is not None
        and not agreement >= tol.min_label_agreement
    ):
        out.append(f"label agreement {agreement:.4f} < {tol.min_label_agreement:g}")
    return out


def merge_reports(reports: Mapping[str, Report]) -> dict[str, Any]:
    """Several outputs' reports as one manifest entry: ``{"passed": ..., "outputs": {name: figures}}``."""
    return {
        "passed": all(r.passed for r in reports.values()),
        "outputs": {name: r.as_dict() for name, r in reports.items()},
    }


def worst(reports: Sequence[Report]) -> Report:
    """The report with the lowest minimum cosine (for one-line summaries)."""
    return min(reports, key=lambda r: (r.passed, r.cosine_min))


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A model file checked against its source.

    ``settings`` go into the manifest under ``stage`` (``"export"`` or ``"quantization"``), the reports
    (one per output) under ``"verification"``. ``extra_files`` lie beside ``path`` and belong to it
    (ONNX external data).
    """

    path: Path
    stage: str
    settings: Mapping[str, Any]
    reports: Mapping[str, Report]
    extra_files: tuple[Path, ...] = ()

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.reports.values())

    def failures(self) -> list[str]:
        return [f"{name}: {f}" for name, r in self.reports.items() for f in r.failures]

    def manifest(self) -> dict[str, Any]:
        """The manifest entries this artifact contributes."""
        return {self.stage: dict(self.settings), "verification": merge_reports(self.reports)}
