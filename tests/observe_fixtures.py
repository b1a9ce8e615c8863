"""A repository for the observe tests: models whose speed and failures the test controls.

knob    x[N, 2] FP32 -> y = x; a row's x[0] is a delay in ms, x[1] > 0 makes the request fail
        (a Python model: the test makes it slow or failing at will)
steady  the same code, only ever sent zeros by the tests (the healthy model that must stay quiet)
mlp     x[N, 8] FP32 -> probs[N, 3], dynamic batching with a queue delay (batch sizes > 1)
knob_routed  a routed pipeline (the compiler's BLS Python router) calling knob: a failing knob makes the
        router answer an error, the way a pipeline's Python step fails
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import tiny_models
from tiny_models import spec as _spec
from tritonforge.config import DataType, ModelConfig
from tritonforge.ensemble import compile_specs
from tritonforge.repository import add_model

KNOB_PY = """
import time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            delay_ms = float(x[:, 0].max()) if x.size else 0.0
            if delay_ms > 0:
                time.sleep(delay_ms / 1000.0)
            if x.size and float(x[:, 1].max()) > 0:
                # raised, not an error response: Triton 2.51 counts an error response as a success
                raise pb_utils.TritonModelException("failing on purpose")
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x.astype(np.float32))]))
        return responses
"""


def build_observe_repository(root: Path) -> Path:
    work, repo = root / "_src", root / "repo"
    code = work / "knob" / "model.py"
    code.parent.mkdir(parents=True, exist_ok=True)
    code.write_text(KNOB_PY)
    for name in ("knob", "steady"):
        config = ModelConfig(
            name=name,
            backend="python",
            max_batch_size=8,
            inputs=(_spec("x", DataType.FP32, (2,)),),
            outputs=(_spec("y", DataType.FP32, (2,)),),
        )
        add_model(repo, name, code, config)
    add_model(
        repo, "mlp", tiny_models.mlp_onnx(work / "mlp.onnx"), max_batch_size=32, max_queue_delay_us=20_000
    )
    spec = work / "knob_routed.yaml"
    spec.write_text(ROUTED_SPEC)
    compile_specs([spec], repo)
    return repo


ROUTED_SPEC = """
name: knob_routed
max_batch_size: 8
inputs:
  - {name: x, dtype: FP32, dims: [2]}
outputs: [y]
route:
  - model: knob
"""


def knob_input(*, delay_ms: float = 0.0, fail: bool = False, rows: int = 1) -> dict[str, np.ndarray]:
    x = np.zeros((rows, 2), np.float32)
    x[:, 0] = delay_ms
    x[:, 1] = 1.0 if fail else 0.0
    return {"x": x}
