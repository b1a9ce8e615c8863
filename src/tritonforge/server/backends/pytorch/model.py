"""Python-based Triton backend named ``pytorch``: serves ``platform: "pytorch_libtorch"`` TorchScript models.

The embedded server places this file at ``<backend-dir>/pytorch/model.py``. On NVIDIA's Triton container the
C++ libtorch backend serves the same repository unchanged.
"""

from tritonforge.server.runtime import PyTorchModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
