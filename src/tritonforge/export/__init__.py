"""Exporters from training frameworks to servable artifacts (torch is imported only when used)."""

from tritonforge.export.pytorch import to_onnx, to_torchscript

__all__ = ["to_onnx", "to_torchscript"]
