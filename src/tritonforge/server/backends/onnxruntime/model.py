"""Python-based Triton backend named ``onnxruntime``: serves ``platform: "onnxruntime_onnx"`` models.

The embedded server places this file at ``<backend-dir>/onnxruntime/model.py``. On NVIDIA's Triton container
the C++ onnxruntime backend serves the same repository unchanged.
"""

import os
import sys

# In a reduced stub interpreter (EmbeddedServer(python=...)) these stand-ins alone reach what they need.
sys.path += [
    p for p in os.environ.get("TRITONFORGE_BACKEND_PATH", "").split(os.pathsep) if p not in ("", *sys.path)
]

# numpy (which our runtime and Triton's utilities import next) starts OpenBLAS with a thread per CPU, up to
# 64, and nothing in this stub calls BLAS: onnxruntime runs its own kernels in its own pools. One thread,
# unless the server was started with another count.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# what numpy imports and serving never uses loads on first use (~4.7 MiB and ~20 ms a stub), which only
# works before numpy's first import: Triton's utilities and our runtime import it next.
from tritonforge.server.stub_modules import defer_numpy_extras

defer_numpy_extras()

from tritonforge.server.runtime import OnnxRuntimeModel as TritonPythonModel  # noqa: E402 (after defer_numpy_extras)

__all__ = ["TritonPythonModel"]
