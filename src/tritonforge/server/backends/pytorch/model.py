"""Python-based Triton backend named ``pytorch``: serves ``platform: "pytorch_libtorch"`` TorchScript models.

The embedded server places this file at ``<backend-dir>/pytorch/model.py``. On NVIDIA's Triton container the
C++ libtorch backend serves the same repository unchanged.
"""

import os
import sys

# In a reduced stub interpreter (EmbeddedServer(python=...)) these stand-ins alone reach what they need.
sys.path += [
    p for p in os.environ.get("TRITONFORGE_BACKEND_PATH", "").split(os.pathsep) if p not in ("", *sys.path)
]

from tritonforge.server.runtime import PyTorchModel as TritonPythonModel

__all__ = ["TritonPythonModel"]
