"""Structured pruning of torch models: whole hidden neurons removed, so the exported ONNX is smaller and
does less work (unstructured sparsity leaves dense matrices of zeros: no smaller, no faster on CPU).

A *pair* is two ``nn.Linear`` layers where the first's outputs reach the second only through elementwise
modules (ReLU, GELU, Tanh, Dropout, ...): dropping a hidden neuron removes a row of the first (and its
bias) and the matching column of the second. In an ``nn.Sequential`` the pairs are found; elsewhere name
them (``pairs=[("fc1", "fc2")]``). A neuron's importance is the norm of its incoming row times the norm
of its outgoing column (a neuron with a small product changes the next layer's input the least).

:func:`export_pruned_onnx` prunes a copy, optionally fine-tunes it (your function), exports it, and
checks the ONNX file against the *unpruned* source on a held-out set with the same tolerance gate as
quantization (:class:`~tritonforge.verify.Tolerance`): a model that drifts too far fails and is
refused by the registry unless forced.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.errors import ExportError
from tritonforge.export.result import Artifact
from tritonforge.verify import Tolerance, compare

__all__ = ["PruneResult", "export_pruned_onnx", "prune_neurons"]

_ELEMENTWISE = (
    "ReLU",
    "ReLU6",
    "LeakyReLU",
    "GELU",
    "SiLU",
    "Tanh",
    "Sigmoid",
    "ELU",
    "SELU",
    "Mish",
    "Hardswish",
    "Hardtanh",
    "Softplus",
    "Dropout",
    "Identity",
)
DEFAULT_PRUNE_TOLERANCE = Tolerance(max_accuracy_drop=0.02, min_label_agreement=0.95)


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """The pruned module and what was removed: per first layer of a pair, hidden width before → after."""

    module: Any
    widths: dict[str, tuple[int, int]]
    params_before: int
    params_after: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "widths": {k: list(v) for k, v in self.widths.items()},
            "params_before": self.params_before,
            "params_after": self.params_after,
        }


def _params(module: Any) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _find_pairs(module: Any) -> list[tuple[str, str]]:
    import torch.nn as nn

    pairs: list[tuple[str, str]] = []
    for prefix, seq in module.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for i, (name, layer) in enumerate(children):
            if not isinstance(layer, nn.Linear):
                continue
            for later_name, later in children[i + 1 :]:
                if isinstance(later, nn.Linear):
                    pairs.append((f"{prefix}.{name}".lstrip("."), f"{prefix}.{later_name}".lstrip(".")))
                    break
                if type(later).__name__ not in _ELEMENTWISE:
                    break  # e.g. a BatchNorm or a reshape between them: not prunable as a pair
    return pairs


def prune_neurons(
    module: Any,
    amount: float | Mapping[str, float],
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    min_width: int = 1,
) -> PruneResult:
    """Remove ``amount`` (a fraction, or per first layer's name) of the hidden neurons of each pair.

    The module is changed in place (pass a copy to keep the original). Example::

        result = prune_neurons(copy.deepcopy(mlp), 0.5)       # every hidden layer halved
        result.params_after / result.params_before            # ~0.5

    Raises:
        ExportError: no prunable pairs, a named layer is missing or not ``nn.Linear``, the widths don't
            match, or ``amount`` is outside [0, 1).
    """
    import torch
    import torch.nn as nn

    found = list(pairs) if pairs is not None else _find_pairs(module)
    if not found:
        raise ExportError(
            f"{type(module).__name__}: no prunable pair of nn.Linear layers found (an nn.Sequential of "
            "Linear "
            "and elementwise layers); name them with pairs=[('fc1', 'fc2')]"
        )
    layers = dict(module.named_modules())
    before = _params(module)
    widths: dict[str, tuple[int, int]] = {}
    for first_name, second_name in found:
        first, second = layers.get(first_name), layers.get(second_name)
        for name, layer in ((first_name, first), (second_name, second)):
            if not isinstance(layer, nn.Linear):
                raise ExportError(
                    f"layer '{name}' of {type(module).__name__} is not an nn.Linear (or is missing)"
                )
        assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
        if first.out_features != second.in_features:
            raise ExportError(
                f"'{first_name}' gives {first.out_features} features but '{second_name}' takes "
                f"{second.in_features}: they are not a pair"
            )
        share = amount.get(first_name, 0.0) if isinstance(amount, Mapping) else amount
        if not 0.0 <= share < 1.0:
            raise ExportError(f"amount for '{first_name}' must be a fraction in [0, 1), not {share}")
        width = first.out_features
        keep = max(min_width, round(width * (1.0 - share)))
        with torch.no_grad():
            importance = first.weight.norm(dim=1) * second.weight.norm(dim=0)
            kept = torch.sort(torch.topk(importance, keep).indices).values
            new_first = nn.Linear(first.in_features, keep, bias=first.bias is not None)
            new_first.weight.copy_(first.weight[kept])
            if first.bias is not None:
                new_first.bias.copy_(first.bias[kept])
            new_second = nn.Linear(keep, second.out_features, bias=second.bias is not None)
            new_second.weight.copy_(second.weight[:, kept])
            if second.bias is not None:
                new_second.bias.copy_(second.bias)
        new_first.to(first.weight.device, first.weight.dtype)
        new_second.to(second.weight.device, second.weight.dtype)
        _replace(module, first_name, new_first)
        _replace(module, second_name, new_second)
        layers[first_name], layers[second_name] = new_first, new_second
        widths[first_name] = (width, keep)
    return PruneResult(module, widths, before, _params(module))


def _replace(root: Any, dotted: str, new: Any) -> None:
    parent = root
    *path, last = dotted.split(".")
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, last, new)


def export_pruned_onnx(
    module: Any,
    example: Any,
    path: str | os.PathLike[str],
    *,
    amount: float | Mapping[str, float],
    holdout: Any,
    input_names: Sequence[str],
    output_names: Sequence[str],
    labels: np.ndarray | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    finetune: Callable[[Any], None] | None = None,
    tolerance: Tolerance | None = None,
) -> Artifact:
    """Prune a copy of ``module``, fine-tune it (``finetune(pruned)``, optional), export it to ONNX and
    check the file against the unpruned ``module`` on ``holdout`` (a tensor, or a tuple for several
    inputs) with ``tolerance`` (default: accuracy drop <= 0.02 and label agreement >= 0.95, the figures
    needing ``labels`` for the accuracy).

    The artifact's stage is ``"pruning"``; its settings carry the widths, parameter counts and file sizes.

    Raises:
        ExportError: as :func:`prune_neurons` and :func:`~tritonforge.export.export_onnx`, or the ONNX
            file does not match the pruned torch module it came from.
    """
    import onnxruntime as ort
    import torch

    from tritonforge.export.pytorch import export_onnx

    source = module.eval()
    pruned = prune_neurons(copy.deepcopy(source), amount, pairs=pairs)
    if finetune is not None:
        finetune(pruned.module)
    pruned_module = pruned.module.eval()
    artifact = export_onnx(pruned_module, example, path, input_names=input_names, output_names=output_names)
    if not artifact.passed:
        raise ExportError(
            f"the pruned model's ONNX export does not match it: {'; '.join(artifact.failures())}"
        )
    inputs = holdout if isinstance(holdout, tuple) else (holdout,)
    with torch.no_grad():
        reference = source(*inputs)
    reference_t = reference if isinstance(reference, (tuple, list)) else (reference,)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(input_names, inputs, strict=True)}
    got = session.run(list(output_names), feeds)
    tol = tolerance or DEFAULT_PRUNE_TOLERANCE
    reports = {}
    for name, ref, out in zip(output_names, reference_t, got, strict=True):
        ref_np = ref.detach().cpu().numpy()
        use = labels if labels is not None and ref_np.ndim == 2 and len(labels) == len(ref_np) else None
        reports[name] = compare(ref_np, out, tolerance=tol, labels=use)
    settings = {
        **dict(artifact.settings),
        "amount": dict(amount) if isinstance(amount, Mapping) else amount,
        **pruned.as_dict(),
        "finetuned": finetune is not None,
        "file_bytes": Path(path).stat().st_size,
    }
    return Artifact(Path(path), "pruning", settings, reports, artifact.extra_files)
