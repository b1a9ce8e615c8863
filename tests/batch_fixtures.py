"""Models and data for the batch tests: the real digits logistic regression (tools/build_digits.py) and
small Python models, served by two embedded Triton servers (the client balances over both).

    digits_logreg   input[N, 64] FP32 -> label[N] INT64, probabilities[N, 10] FP32 (scikit-learn, ONNX)
    double          x[N, 4] FP32 -> y = 2x; a request holding a negative value fails (a model error)
    double_slow     the same, 10 ms per execution (so a run can be killed mid-way)
    textlen         text[N, 1] BYTES -> chars[N, 1] INT64 (UTF-8 characters of each string)
    double_twice    an ensemble: x -> double -> double -> y = 4x
    lookup          ids[N, -1] INT64 -> vec[N, -1, 4] FP32 (rows of a table, ONNX); an id >= 10 fails
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from tiny_models import add_lookup, python_model
from tiny_models import spec as _spec
from tritonforge.config import DataType, DynamicBatching, EnsembleStep, ModelConfig, write_config

DOUBLE_PY = """
import time
import numpy as np
import triton_python_backend_utils as pb_utils

SLEEP_S = {sleep}

class TritonPythonModel:
    def execute(self, requests):
        if SLEEP_S:
            time.sleep(SLEEP_S)
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            if (x < 0).any():
                bad = np.flatnonzero((x < 0).any(axis=1)).tolist()
                error = pb_utils.TritonError(f"negative input at row(s) {{bad}}")
                out.append(pb_utils.InferenceResponse(error=error))
                continue
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", (x * 2).astype(np.float32))]))
        return out
"""

TEXTLEN_PY = textwrap.dedent("""
    import numpy as np
    import triton_python_backend_utils as pb_utils

    class TritonPythonModel:
        def execute(self, requests):
            out = []
            for request in requests:
                t = pb_utils.get_input_tensor_by_name(request, "text").as_numpy()
                n = np.array([[len(v.decode("utf-8"))] for v in t[:, 0]], dtype=np.int64)
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor("chars", n)]))
            return out
""")


def build_batch_repository(root: Path, digits_tool: object) -> Path:
    work, repo = root / "_src", root / "repo"
    steps = digits_tool.build(repo, kinds=("logreg",))  # type: ignore[attr-defined]
    assert [s.status for s in steps] == ["OK"], steps
    for name, sleep in (("double", 0), ("double_slow", 0.01)):
        config = ModelConfig(
            name=name,
            backend="python",
            max_batch_size=16,
            inputs=(_spec("x", DataType.FP32, (4,)),),
            outputs=(_spec("y", DataType.FP32, (4,)),),
            dynamic_batching=DynamicBatching(),
        )
        python_model(repo, work, config, DOUBLE_PY.format(sleep=sleep))
    textlen = ModelConfig(
        name="textlen",
        backend="python",
        max_batch_size=32,
        inputs=(_spec("text", DataType.STRING, (1,)),),
        outputs=(_spec("chars", DataType.INT64, (1,)),),
        dynamic_batching=DynamicBatching(),
    )
    python_model(repo, work, textlen, TEXTLEN_PY)
    twice = ModelConfig(
        name="double_twice",
        platform="ensemble",
        max_batch_size=16,
        inputs=(_spec("x", DataType.FP32, (4,)),),
        outputs=(_spec("y", DataType.FP32, (4,)),),
        ensemble_steps=(
            EnsembleStep(model_name="double", input_map={"x": "x"}, output_map={"y": "mid"}),
            EnsembleStep(model_name="double", input_map={"x": "mid"}, output_map={"y": "y"}),
        ),
    )
    (repo / "double_twice" / "1").mkdir(parents=True)
    write_config(twice, repo / "double_twice" / "config.pbtxt")
    add_lookup(repo, work)
    return repo
