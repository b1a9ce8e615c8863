"""`import tritonforge` must work on a machine without torch or scikit-learn."""

from __future__ import annotations

import subprocess
import sys

BLOCK_HEAVY = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "sklearn", "skl2onnx", "transformers"}:
            raise ImportError(f"{name} is blocked for this test")
sys.meta_path.insert(0, Block())
"""


def test_import_tritonforge_needs_neither_torch_nor_sklearn():
    code = (
        BLOCK_HEAVY
        + """
import tritonforge, tritonforge.config, tritonforge.repository, tritonforge.server
import tritonforge.export, tritonforge.cli
assert "torch" not in sys.modules and "sklearn" not in sys.modules
print("ok")
"""
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
