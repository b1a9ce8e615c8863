"""Our Python-based onnxruntime backend against the floor every Python-backend model pays, one server.

Two models in ONE embedded Triton: an identity ONNX model (``y = Identity(x)``, FP32 [16], served by our
Python-based ``onnxruntime`` backend with its generated config) and an empty Python model that hands its
input back (the least a Python-backend model can do). Same batching (max_batch_size 64, dynamic batcher),
one instance each. perf_analyzer drives each at concurrency 1 and 16 (gRPC, batch-1 requests), the two
alternating round by round (ABBA...); the gap between them is our backend's own per-request work.
The table gives the median of the rounds with their spread, and the median of the per-round ratios.
Figures are comparable only within one run: take them on a quiet machine.

    python benchmarks/backend_vs_python_floor.py [--rounds 5] [--window-ms 3000] [--concurrency 1,16]
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    alternating,
    perf_analyzer_run_args,
    run_perf_analyzer,
    spread,
    wide_console,  # benchmarks/ on sys.path
)
from rich.table import Table

from tritonforge.config import DataType, DynamicBatching, InstanceGroup, InstanceKind, ModelConfig, TensorSpec
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

ONNX, PYTHON = "identity_onnx", "empty_python"
WIDTH = 16

EMPTY_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        get = pb_utils.get_input_tensor_by_name
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("y", get(r, "x").as_numpy())])
            for r in requests
        ]
"""


def build_repository(root: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (root / "src").mkdir(parents=True)
    onnx_file = root / "src" / "identity.onnx"
    onnx.save(model, onnx_file)
    repo = root / "repo"
    add_model(repo, ONNX, onnx_file, max_batch_size=64)  # the generated config, as users get it
    script = root / "src" / "model.py"
    script.write_text(textwrap.dedent(EMPTY_MODEL).lstrip())
    config = ModelConfig(
        name=PYTHON,
        backend="python",
        max_batch_size=64,
        inputs=(TensorSpec(name="x", dtype=DataType.FP32, dims=(WIDTH,)),),
        outputs=(TensorSpec(name="y", dtype=DataType.FP32, dims=(WIDTH,)),),
        dynamic_batching=DynamicBatching(),
        instance_groups=(InstanceGroup(count=1, kind=InstanceKind.CPU),),
    )
    add_model(repo, PYTHON, script, config)
    return repo


def check_answers(server: EmbeddedServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        x = np.arange(3 * WIDTH, dtype=np.float32).reshape(3, WIDTH)
        for model in (ONNX, PYTHON):
            item = grpcclient.InferInput("x", list(x.shape), "FP32")
            item.set_data_from_numpy(x)
            assert np.array_equal(client.infer(model, [item]).as_numpy("y"), x), f"{model} is not an identity"
    finally:
        client.close()


def main() -> None:
    args, exe, levels = perf_analyzer_run_args(__doc__, "1,16")
    console = wide_console()  # names unbroken when piped
    root = Path(tempfile.mkdtemp(prefix="tritonforge-bench-floor-"))
    rounds: list[dict[str, Any]] = []
    try:
        repo = build_repository(root)
        with console.status("starting Triton ..."):
            server = EmbeddedServer(repo).start()
        try:
            check_answers(server)
            for r, order in enumerate(alternating(args.rounds, [ONNX, PYTHON])):
                for c in levels:
                    for model in order:
                        with console.status(f"round {r + 1}/{args.rounds}: {model}, concurrency {c} ..."):
                            throughput = run_perf_analyzer(
                                exe, server.grpc_url, model, c, window_ms=args.window_ms
                            )
                        rounds.append(
                            {"round": r + 1, "model": model, "concurrency": c, "throughput": throughput}
                        )
                        console.print(
                            f"round {r + 1} c={c:<3} {model:<14} {throughput:>9,.0f} infer/s", highlight=False
                        )
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = Table(
        title=f"identity ONNX (our backend) vs empty Python model, one server: median of {args.rounds} "
        "alternating rounds (min-max, ±half-range) — re-measure on a quiet machine"
    )
    for column in ("concurrency", "model", "infer/s", "ONNX / Python floor"):
        table.add_column(column, justify="left" if column == "model" else "right")
    summary = []
    for c in levels:
        by = {
            m: [x["throughput"] for x in rounds if x["concurrency"] == c and x["model"] == m]
            for m in (ONNX, PYTHON)
        }
        ratios = [o / p for o, p in zip(by[ONNX], by[PYTHON], strict=True) if p]
        table.add_row(str(c), ONNX, spread(by[ONNX]), spread(ratios) + "x" if ratios else "")
        table.add_row(str(c), PYTHON, spread(by[PYTHON]), "")
        summary.append({"concurrency": c, "ratio_median": float(np.median(ratios)) if ratios else None})
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
