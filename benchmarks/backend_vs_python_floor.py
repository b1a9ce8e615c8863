"""Our Python-based onnxruntime backend against the floor every Python-backend model pays, one server.

Three models in ONE embedded Triton: an identity ONNX model (``y = Identity(x)``, FP32 [16], served by our
Python-based ``onnxruntime`` backend with its generated config), an empty Python model that hands its
input back (the least a Python-backend model can do), and the least a Python-backend model running
onnxruntime can do: a few lines calling the same identity graph's session for each request (one thread,
spinning off, no tritonforge code). Same batching (max_batch_size 64, dynamic batcher), one instance each.
perf_analyzer drives each at concurrency 1 and 16 (gRPC, batch-1 requests), alternating round by round
(ABBA...); the gap between ours and the empty model is our backend's per-request work plus onnxruntime's
call, the gap between ours and the bare one our backend's alone.
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

ONNX, PYTHON, BARE = "identity_onnx", "empty_python", "bare_onnxruntime"
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


BARE_MODEL = """
import os

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = os.path.join(args["model_repository"], args["model_version"], "identity.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        get, run = pb_utils.get_input_tensor_by_name, self.session.run
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("y", run(["y"], {"x": get(r, "x").as_numpy()})[0])]
            )
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
    bare = root / "src" / "bare.py"
    bare.write_text(textwrap.dedent(BARE_MODEL).lstrip())
    add_model(repo, BARE, bare, config.replace(name=BARE), extra_files=[onnx_file])
    return repo


def check_answers(server: EmbeddedServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        x = np.arange(3 * WIDTH, dtype=np.float32).reshape(3, WIDTH)
        for model in (ONNX, PYTHON, BARE):
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
            for r, order in enumerate(alternating(args.rounds, [ONNX, PYTHON, BARE])):
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
                            f"round {r + 1} c={c:<3} {model:<16} {throughput:>9,.0f} infer/s", highlight=False
                        )
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = Table(
        title="identity ONNX (our backend; bare onnxruntime in a Python model) vs an empty Python model, "
        f"one server: median of {args.rounds} alternating rounds (min-max, ±half-range) — re-measure on a "
        "quiet machine"
    )
    for column in ("concurrency", "model", "infer/s", "/ Python floor", "ours / bare onnxruntime"):
        table.add_column(column, justify="left" if column == "model" else "right")
    summary = []
    for c in levels:
        by = {
            m: [x["throughput"] for x in rounds if x["concurrency"] == c and x["model"] == m]
            for m in (ONNX, PYTHON, BARE)
        }

        def per_round(a: str, b: str, by: dict[str, list[float]] = by) -> list[float]:
            return [x / y for x, y in zip(by[a], by[b], strict=True) if y]

        ratios, bare, ours_vs_bare = per_round(ONNX, PYTHON), per_round(BARE, PYTHON), per_round(ONNX, BARE)
        table.add_row(
            str(c),
            ONNX,
            spread(by[ONNX]),
            spread(ratios) + "x" if ratios else "",
            spread(ours_vs_bare) + "x" if ours_vs_bare else "",
        )
        table.add_row(str(c), BARE, spread(by[BARE]), spread(bare) + "x" if bare else "", "")
        table.add_row(str(c), PYTHON, spread(by[PYTHON]), "", "")
        summary.append(
            {
                "concurrency": c,
                "ratio_median": float(np.median(ratios)) if ratios else None,
                "bare_onnxruntime_ratio_median": float(np.median(bare)) if bare else None,
                "ours_vs_bare_median": float(np.median(ours_vs_bare)) if ours_vs_bare else None,
            }
        )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
