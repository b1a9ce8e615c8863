"""Python-based Triton backend named ``pytorch``: serves ``platform: "pytorch_libtorch"`` TorchScript models.

The embedded server places this file at ``<backend-dir>/pytorch/model.py``. On NVIDIA's Triton container the
C++ libtorch backend serves the same repository unchanged.

The engine (tritonforge's runtime, numpy's batching, the framework) loads in ``initialize``, not when this
file is imported: a stub that Triton starts only to ask the model for ``auto_complete_config`` then pays
for none of it.
"""

import os
import sys

# In a reduced stub interpreter (EmbeddedServer(python=...)) these stand-ins alone reach what they need.
sys.path += [
    p for p in os.environ.get("TRITONFORGE_BACKEND_PATH", "").split(os.pathsep) if p not in ("", *sys.path)
]


class TritonPythonModel:
    def initialize(self, args):
        from tritonforge.server.runtime import PyTorchModel

        self.model = PyTorchModel()
        self.model.initialize(args)
        self.execute = self.model.execute  # the stub calls the engine's execute with no hop

    def execute(self, requests):
        return self.model.execute(requests)

    def finalize(self):
        self.model.finalize()


__all__ = ["TritonPythonModel"]
