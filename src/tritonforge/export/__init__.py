"""Exporters from training frameworks to servable artifacts, each checked against its source.

torch and scikit-learn are imported only when an exporter is called.
"""

from tritonforge.export.prune import PruneResult, export_pruned_onnx, prune_neurons
from tritonforge.export.pytorch import (
    DEFAULT_OPSET,
    choose_opset,
    export_onnx,
    export_torchscript,
    to_onnx,
    to_torchscript,
)
from tritonforge.export.result import Artifact
from tritonforge.export.sklearn import export_sklearn

__all__ = [
    "DEFAULT_OPSET",
    "Artifact",
    "PruneResult",
    "choose_opset",
    "export_onnx",
    "export_pruned_onnx",
    "export_sklearn",
    "export_torchscript",
    "prune_neurons",
    "to_onnx",
    "to_torchscript",
]
