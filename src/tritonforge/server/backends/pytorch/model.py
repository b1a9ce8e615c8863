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

# what numpy imports and serving never uses loads on first use (~4.7 MiB and ~20 ms a stub), which only
# works before numpy's first import: Triton's utilities and our runtime import it next.
from tritonforge.server.stub_modules import defer_numpy_extras

defer_numpy_extras()

from tritonforge.server.runtime import PyTorchModel as TritonPythonModel  # noqa: E402 (after defer_numpy_extras)

__all__ = ["TritonPythonModel"]
