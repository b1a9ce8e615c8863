"""scikit-learn estimators and pipelines -> ONNX with tensor outputs, checked against the estimator.

Classifiers give ``label`` (INT64 ``[N]``) and ``probabilities`` (FP32 ``[N, classes]``) — plain tensors,
not skl2onnx's default ZipMap (a list of dicts, which Triton can't serve); regressors give ``variable``.
Inputs are one FP32 tensor ``[N, features]`` named ``input``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.errors import ExportError
from tritonforge.export.result import Artifact
from tritonforge.verify import Report, Tolerance, compare

__all__ = ["DEFAULT_SKLEARN_OPSET", "export_sklearn"]

#: skl2onnx's converters are tested against this ai.onnx opset; ai.onnx.ml stays at 3 (TreeEnsemble v3)
DEFAULT_SKLEARN_OPSET = 17
INPUT_NAME = "input"


def _final_estimator(estimator: Any) -> Any:
    steps = getattr(estimator, "steps", None)
    return steps[-1][1] if steps else estimator


def export_sklearn(
    estimator: Any,
    sample: np.ndarray,
    path: str | os.PathLike[str],
    *,
    opset: int = DEFAULT_SKLEARN_OPSET,
    tolerance: Tolerance | None = None,
    labels: np.ndarray | None = None,
    name: str | None = None,
) -> Artifact:
    """Convert a fitted ``estimator`` (or Pipeline) to ONNX at ``path`` and check it on ``sample``.

    The check requires the ONNX labels to equal ``estimator.predict`` on every sample row and the
    probabilities to match ``predict_proba`` within ``tolerance`` (default ``max_abs=1e-4``). With
    ``labels`` the accuracy of both is recorded.

    Example:
        >>> clf = LogisticRegression().fit(x, y)  # doctest: +SKIP
        >>> art = export_sklearn(clf, x_test, "clf.onnx", labels=y_test)  # doctest: +SKIP
        >>> art.reports["label"].label_agreement  # doctest: +SKIP
        1.0

    Raises:
        ExportError: skl2onnx has no converter for a step (names it), or the ONNX model disagrees with
            the estimator.
    """
    import onnxruntime as ort
    import skl2onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    x = np.ascontiguousarray(sample, dtype=np.float32)
    if x.ndim != 2:
        raise ExportError(f"the sample must be 2-D [rows, features], got shape {x.shape}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    final = _final_estimator(estimator)
    is_classifier = hasattr(final, "predict_proba") and hasattr(final, "classes_")
    options = {id(final): {"zipmap": False}} if is_classifier else None
    try:
        onx = convert_sklearn(
            estimator,
            name=name or type(estimator).__name__,
            initial_types=[(INPUT_NAME, FloatTensorType([None, x.shape[1]]))],
            options=options,
            target_opset={"": opset, "ai.onnx.ml": 3},
        )
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(
            f"can't convert {type(estimator).__name__} to ONNX: {type(exc).__name__}: {first}. "
            "skl2onnx has no "
            "converter for that estimator/step: replace it, or register a custom converter with "
            "skl2onnx.update_registered_converter"
        ) from exc
    onx.ir_version = min(onx.ir_version, 9)  # readable by older onnxruntime builds (Triton's) too
    target.write_bytes(onx.SerializeToString())
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    got = session.run(None, {INPUT_NAME: x})
    tol = tolerance or Tolerance(max_abs=1e-4)
    reports: dict[str, Report] = {}
    if is_classifier:
        want_labels = estimator.predict(x)
        got_labels = got[0].reshape(-1)
        class_index = {c: i for i, c in enumerate(final.classes_)}
        reports[output_names[0]] = compare(
            np.array([class_index[c] for c in want_labels], dtype=np.float64),
            np.array([class_index.get(c, -1) for c in got_labels], dtype=np.float64),
            tolerance=Tolerance(max_abs=0.0, min_label_agreement=1.0),
            labels=None if labels is None else np.asarray(labels),
            predictions=(want_labels, got_labels),
        )
        reports[output_names[1]] = compare(
            estimator.predict_proba(x),
            got[1],
            tolerance=tol,
            labels=None if labels is None else np.asarray(labels),
        )
    else:
        want = np.asarray(estimator.predict(x), dtype=np.float64).reshape(got[0].shape)
        reports[output_names[0]] = compare(want, got[0], tolerance=tol)
    settings = {
        "format": "onnx",
        "exporter": f"skl2onnx {skl2onnx.__version__}",
        "opset": {"": opset, "ai.onnx.ml": 3},
        "zipmap": False,
        "input": {"name": INPUT_NAME, "dtype": "FP32", "features": int(x.shape[1])},
        "outputs": output_names,
        "source_class": f"{type(estimator).__module__}.{type(estimator).__qualname__}",
    }
    return Artifact(target, "export", settings, reports)
