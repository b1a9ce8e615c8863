"""Python-based Triton backend named ``onnxruntime``: serves ``platform: "onnxruntime_onnx"`` models.

The embedded server places this file at ``<backend-dir>/onnxruntime/model.py``. On NVIDIA's Triton container
the C++ onnxruntime backend serves the same repository unchanged.
"""

from tritonforge.server.runtime import OnnxRuntimeModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
