"""PyTorch -> ONNX (dynamic batch and sequence axes) and -> TorchScript, each checked against the module.

``export_onnx`` / ``export_torchscript`` return an :class:`~tritonforge.export.result.Artifact` with the
figures of the check (on the example, and on the example with its batch doubled so that the dynamic
batch axis is exercised too); ``to_onnx`` / ``to_torchscript`` return the path and raise when the check
fails. torch is imported only when called.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.errors import ExportError
from tritonforge.export.result import Artifact
from tritonforge.verify import Report, Tolerance, compare

__all__ = [
    "DEFAULT_OPSET",
    "EXTERNAL_DATA_THRESHOLD_BYTES",
    "choose_opset",
    "export_onnx",
    "export_torchscript",
    "to_onnx",
    "to_torchscript",
]

#: opset 17 has every op transformer and CNN exports need (LayerNormalization included), and is served by
#: every onnxruntime Triton has shipped since 23.x; newer opsets buy nothing for these models.
DEFAULT_OPSET = 17
#: protobuf can't hold a model over 2 GiB: above this its weights go to ``<file>.data`` beside it
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3 - 64 * 1024**2
EXTERNAL_DATA_SUFFIX = ".data"


def choose_opset(requested: int | None = None) -> int:
    """``requested``, or the default capped by what the installed onnx knows.

    Raises:
        ExportError: ``requested`` is newer than the installed onnx supports.
    """
    import onnx.defs

    newest = onnx.defs.onnx_opset_version()
    if requested is None:
        return min(DEFAULT_OPSET, newest)
    if requested > newest:
        raise ExportError(f"opset {requested} is newer than the installed onnx supports ({newest})")
    return requested


def _as_tuple(example: Any) -> tuple[Any, ...]:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _outputs(module: Any, example: tuple[Any, ...]) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        out = module(*example)
    if isinstance(out, Mapping):
        out = tuple(out.values())
    elif hasattr(out, "to_tuple"):  # transformers' ModelOutput
        out = out.to_tuple()
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def _doubled(example: tuple[Any, ...]) -> tuple[Any, ...]:
    import torch

    return tuple(torch.cat([t, t.flip(0)]) if isinstance(t, torch.Tensor) and t.ndim else t for t in example)


def _check(
    names: Sequence[str], run: Any, module: Any, examples: Sequence[tuple[Any, ...]], tolerance: Tolerance
) -> dict[str, Report]:
    """Per output: the artifact vs the module over all ``examples`` (the worst figures are kept)."""
    reports: dict[str, Report] = {}
    for example in examples:
        want = _outputs(module, example)
        got = run(example)
        if len(got) < len(names) or len(want) < len(names):
            raise ExportError(
                f"the export gives {len(got)} outputs and the module {len(want)}; "
                f"{len(names)} output names were given"
            )
        for name, g, w in zip(names, got, want, strict=False):  # extra outputs are not checked
            report = compare(w, g, tolerance=tolerance)
            old = reports.get(name)
            if old is None or (report.passed, -report.max_abs) < (old.passed, -old.max_abs):
                reports[name] = report
    return reports


def _param_bytes(module: Any) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def export_onnx(
    module: Any,
    example: Any,
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    opset: int | None = None,
    tolerance: Tolerance | None = None,
    check_examples: Sequence[Any] = (),
    external_data_threshold_bytes: int = EXTERNAL_DATA_THRESHOLD_BYTES,
) -> Artifact:
    """Export ``module`` to ONNX at ``path`` and check it against the module.

    Args:
        dynamic_axes: per tensor, axis -> name; default: axis 0 of every input and output is ``batch``.
            Give e.g. ``{"input_ids": {0: "batch", 1: "sequence"}, ...}`` for a dynamic sequence axis.
        opset: default :data:`DEFAULT_OPSET` (see :func:`choose_opset`).
        tolerance: what the check must meet (default ``max_abs=1e-4``).
        check_examples: more inputs to check on (e.g. another sequence length); the example with its
            batch doubled is always checked too.
        external_data_threshold_bytes: models with more weights than this keep them in ``<path>.data``.

    Example:
        >>> art = export_onnx(model, torch.zeros(2, 64), "m.onnx",  # doctest: +SKIP
        ...                   input_names=["x"], output_names=["y"])
        >>> art.reports["y"].max_abs  # doctest: +SKIP

    Raises:
        ExportError: an unsupported layer/operator, an exporter failure, or an ONNX model that can't run.
    """
    import onnxruntime as ort
    import torch

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    chosen = choose_opset(opset)
    example_t = _as_tuple(example)
    axes = (
        {k: dict(v) for k, v in dynamic_axes.items()}
        if dynamic_axes
        else {name: {0: "batch"} for name in [*input_names, *output_names]}
    )
    module = module.eval()
    external = _param_bytes(module) > external_data_threshold_bytes
    work = Path(tempfile.mkdtemp(prefix=".tritonforge-export-", dir=target.parent)) if external else None
    exported = (work / target.name) if work else target
    try:
        try:
            with warnings.catch_warnings():
                # the TorchScript-based exporter is deprecated in favour of torch.export (needs onnxscript)
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module,
                    example_t,
                    str(exported),
                    input_names=list(input_names),
                    output_names=list(output_names),
                    dynamic_axes=axes,
                    opset_version=chosen,
                    dynamo=False,
                )
        except Exception as exc:
            raise ExportError(_explain_export_failure(module, exc, chosen)) from exc
        extra: tuple[Path, ...] = ()
        if work is not None:
            data = _save_external(exported, target)
            extra = (data,) if data.exists() else ()
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    try:
        session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"{target}: onnxruntime can't load the exported model: {exc}") from exc

    def run(ex: tuple[Any, ...]) -> list[np.ndarray]:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(input_names, ex, strict=True)}
        return session.run(list(output_names), feeds)

    tol = tolerance or Tolerance(max_abs=1e-4)
    examples = [example_t, _doubled(example_t), *(_as_tuple(e) for e in check_examples)]
    reports = _check(output_names, run, module, examples, tol)
    settings = {
        "format": "onnx",
        "exporter": f"torch.onnx (TorchScript-based), torch {torch.__version__}",
        "opset": chosen,
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in axes.items()},
        "external_data": bool(extra),
        "source_class": f"{type(module).__module__}.{type(module).__qualname__}",
    }
    return Artifact(target, "export", settings, reports, extra)


def _explain_export_failure(module: Any, exc: Exception, opset: int) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    kind = type(exc).__name__
    unsupported = "Unsupported" in kind or "unsupported" in text.lower() or "python operator" in text.lower()
    if unsupported:
        return (
            f"{type(module).__name__} uses a layer/operator the ONNX exporter does not support at opset "
            f"{opset}: {text}. Replace that layer, give it an ONNX symbolic, or try another opset"
        )
    return f"torch.onnx.export failed for {type(module).__name__} ({kind}): {text}"


def _save_external(exported: Path, target: Path) -> Path:
    """Re-save ``exported`` at ``target`` with every weight in one ``<target>.data`` file."""
    import onnx

    model = onnx.load(str(exported))  # pulls in whatever per-tensor files the exporter wrote
    location = target.name + EXTERNAL_DATA_SUFFIX
    (target.parent / location).unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(target),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=1024,
    )
    return target.parent / location


def to_onnx(
    module: Any,
    example: Any,
    path: str | os.PathLike[str],
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
) -> Path:
    """Export ``module`` to ONNX at ``path``, check it against the module, and return the path.

    By default axis 0 of every input and output is a dynamic ``batch`` axis.

    Raises:
        ExportError: the exporter failed (e.g. an unsupported operator) or the ONNX model disagrees.
    """
    artifact = export_onnx(
        module,
        example,
        path,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        opset=opset,
        tolerance=Tolerance(max_abs=atol),
    )
    _raise_unless_passed(artifact)
    return artifact.path


def _raise_unless_passed(artifact: Artifact) -> None:
    if not artifact.passed:
        figures = "; ".join(f"{n}: {r.summary()}" for n, r in artifact.reports.items())
        raise ExportError(
            f"{artifact.path}: differs from the source: {'; '.join(artifact.failures())} [{figures}]"
        )


def export_torchscript(
    module: Any,
    example: Any,
    path: str | os.PathLike[str],
    *,
    tolerance: Tolerance | None = None,
    output_names: Sequence[str] = ("OUTPUT__0",),
) -> Artifact:
    """Trace ``module`` on ``example`` to TorchScript at ``path`` and check it against the module.

    Raises:
        ExportError: tracing failed (names the layer when torch does) or the traced module can't be loaded.
    """
    import torch

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    example_t = _as_tuple(example)
    module = module.eval()
    try:
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(module, example_t)
        traced.save(str(target))
    except Exception as exc:
        raise ExportError(f"TorchScript tracing failed for {type(module).__name__}: {exc}") from exc
    loaded = torch.jit.load(str(target))
    names = list(output_names)
    probe = _outputs(module, example_t)
    names += [f"OUTPUT__{i}" for i in range(len(names), len(probe))]
    reports = _check(
        names,
        lambda ex: _outputs(loaded, ex),
        module,
        [example_t, _doubled(example_t)],
        tolerance or Tolerance(max_abs=1e-5),
    )
    settings = {
        "format": "torchscript",
        "method": "trace",
        "torch": torch.__version__,
        "source_class": f"{type(module).__module__}.{type(module).__qualname__}",
    }
    return Artifact(target, "export", settings, reports)


def to_torchscript(module: Any, example: Any, path: str | os.PathLike[str], *, atol: float = 1e-5) -> Path:
    """Trace ``module`` on ``example`` to TorchScript at ``path``, check it, and return the path.

    Raises:
        ExportError: tracing failed or the traced module disagrees with the source.
    """
    artifact = export_torchscript(module, example, path, tolerance=Tolerance(max_abs=atol))
    _raise_unless_passed(artifact)
    return artifact.path
