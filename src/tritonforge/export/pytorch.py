"""PyTorch -> ONNX (dynamic batch axis) and -> TorchScript, each checked against the module it came from."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.errors import ExportError

__all__ = ["DEFAULT_OPSET", "to_onnx", "to_torchscript"]

DEFAULT_OPSET = 17  # served by every onnxruntime Triton has shipped since 23.x


def _as_tuple(example: Any) -> tuple[Any, ...]:
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def _reference(module: Any, example: tuple[Any, ...]) -> list[np.ndarray]:
    import torch

    with torch.inference_mode():
        out = module(*example)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def _check_close(name: str, got: Sequence[np.ndarray], want: Sequence[np.ndarray], atol: float) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise ExportError(f"{name}: output {i} has shape {g.shape}, the source module gives {w.shape}")
        err = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)))) if g.size else 0.0
        if err > atol:
            raise ExportError(f"{name}: output {i} differs from the source module by {err:.3g} (> {atol:g})")


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
    """Export ``module`` to ONNX at ``path`` and check it against the module on ``example``.

    By default axis 0 of every input and output is a dynamic ``batch`` axis.

    Raises:
        ExportError: the exporter failed (e.g. an unsupported operator) or the ONNX model disagrees.
    """
    import onnxruntime as ort
    import torch

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    example_t = _as_tuple(example)
    axes = dynamic_axes or {name: {0: "batch"} for name in [*input_names, *output_names]}
    module = module.eval()
    try:
        with warnings.catch_warnings():
            # the TorchScript-based exporter is deprecated in favour of torch.export, which needs onnxscript
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                example_t,
                str(target),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: {exc}") from exc
    session = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    feeds = {name: t.detach().cpu().numpy() for name, t in zip(input_names, example_t)}
    _check_close(str(target), session.run(list(output_names), feeds), _reference(module, example_t), atol)
    return target


def to_torchscript(module: Any, example: Any, path: str | os.PathLike[str], *, atol: float = 1e-5) -> Path:
    """Trace ``module`` on ``example`` to TorchScript at ``path`` and check it against the module.

    Raises:
        ExportError: tracing failed or the traced module disagrees with the source.
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
    _check_close(str(target), _reference(loaded, example_t), _reference(module, example_t), atol)
    return target
