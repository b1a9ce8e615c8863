"""The built ``digits_vote`` pipeline against the same pipeline hand-built for Triton the usual way.

Both sides serve the same three digits classifiers (the ONNX files ``tritonforge.examples.build_digits``
trains and exports) from their own embedded Triton (the same server binary, the same Python-based
onnxruntime backend):

- **built**: the repository ``tritonforge build`` lays out: the ensemble compiled from
  ``ensembles/digits_vote.yaml``, whose three ONNX members and their vote the compiler fuses into one plain
  ONNX model (``tritonforge.ensemble.fuse``: one step, no Python-backend hop);
- **built, unfused**: the same compiled with ``fuse=False``: the generated member configs and the
  ``combiner`` building block as four steps (the pipeline as written, what the compiler does when it
  cannot fuse, e.g. with a member that is not an ONNX model);
- **hand-built**: configs written here by hand as a Triton user would (``onnxruntime_onnx`` members with
  ``max_batch_size: 64``, a dynamic batcher and ``intra_op_thread_count: 1``), a hand-written batched vote
  Python model (the whole batch averaged at once), and a hand-written ensemble wiring them.

perf_analyzer drives each at concurrency 1, 8 and 32 (gRPC, batch-1 requests, all outputs), the two sides
alternating round by round (ABBA...). Figures per round: throughput, and the server's CPU per request
(CPU seconds of the server and its backend stubs over the run / requests the ensemble answered). The
tables give the median of the rounds with their spread; each side's idle memory is printed too (each
server loads only its pipeline and the models it runs).
Figures are comparable only within one run: take them on a quiet machine.

    python benchmarks/digits_vote_vs_handbuilt.py [--rounds 5] [--window-ms 3000] [--concurrency 1,8,32]
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
    success_count,
    tree_cpu_s,
    tree_memory_mib,
    wide_console,  # benchmarks/ is on sys.path when a script runs
)
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import model_config_pb2 as pb2

from tritonforge.config.pbtxt import proto_to_pbtxt
from tritonforge.server import EmbeddedServer

MEMBERS = ("logreg", "mlp", "random_forest")
BUILT, UNFUSED, HAND = "built digits_vote", "built, unfused", "hand-built"
SIDES = (BUILT, UNFUSED, HAND)
ENSEMBLE = {BUILT: "digits_vote", UNFUSED: "digits_vote", HAND: "hand_vote"}

HAND_VOTE_MODEL = '''
"""Hand-written majority vote over three members' probabilities: the whole batch at once."""
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        get = pb_utils.get_input_tensor_by_name
        parts = [[get(r, f"P{k}").as_numpy() for r in requests] for k in range(3)]
        sizes = [p.shape[0] for p in parts[0]]
        probs = np.stack([np.concatenate(p) for p in parts])  # [3, N, 10]
        classes = probs.shape[2]
        votes = (probs.argmax(axis=2)[..., None] == np.arange(classes)).sum(axis=0).astype(np.float32)
        mean = probs.mean(axis=0)
        label = np.where(votes == votes.max(axis=1, keepdims=True), mean, -1.0).argmax(axis=1)[:, None]
        votes /= 3
        out, start = [], 0
        for n in sizes:
            out.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("LABEL", label[start:start + n].astype(np.int64)),
                pb_utils.Tensor("VOTES", votes[start:start + n]),
            ]))
            start += n
        return out
'''


def build_built(root: Path) -> tuple[Path, Path]:
    """The repository as ``tritonforge build`` lays it out (the digits members and the vote pipeline,
    fused), and a copy with the pipeline compiled unfused."""
    from tritonforge.ensemble import compile_specs
    from tritonforge.examples import build_digits

    repo, unfused = root / "built", root / "unfused"
    steps = build_digits.build(repo)
    failed = [s for s in steps if s.status == "FAILED"]
    if failed:
        raise SystemExit(f"building the digits models failed: {failed}")
    shutil.copytree(repo, unfused)
    spec = Path(build_digits.__file__).resolve().parent / "ensembles" / "digits_vote.yaml"
    compile_specs([spec], repo)
    compile_specs([spec], unfused, fuse=False)
    return repo, unfused


def _tensor(name: str, dtype: int, dims: list[int]) -> Any:
    return {"name": name, "data_type": dtype, "dims": dims}


def _write(repo: Path, config: Any, files: dict[str, Path | str] | None = None) -> None:
    folder = repo / config.name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(proto_to_pbtxt(config))
    for name, content in (files or {}).items():
        target = folder / "1" / name
        if isinstance(content, Path):
            shutil.copy2(content, target)
        else:
            target.write_text(content)


def build_hand(root: Path, built: Path) -> Path:
    """The same pipeline written by hand: member configs, a batched vote model and an ensemble."""
    repo = root / "hand"
    fp32, int64 = pb2.TYPE_FP32, pb2.TYPE_INT64
    for kind in MEMBERS:
        member = pb2.ModelConfig(
            name=f"hand_{kind}",
            platform="onnxruntime_onnx",
            max_batch_size=64,
            input=[pb2.ModelInput(name="input", data_type=fp32, dims=[64])],
            output=[pb2.ModelOutput(name="probabilities", data_type=fp32, dims=[10])],
            dynamic_batching=pb2.ModelDynamicBatching(),
            instance_group=[pb2.ModelInstanceGroup(count=1, kind=pb2.ModelInstanceGroup.KIND_CPU)],
        )
        member.parameters["intra_op_thread_count"].string_value = "1"
        _write(repo, member, {"model.onnx": built / f"digits_{kind}" / "1" / "model.onnx"})
    vote = pb2.ModelConfig(
        name="hand_vote_model",
        backend="python",
        max_batch_size=64,
        input=[pb2.ModelInput(name=f"P{k}", data_type=fp32, dims=[10]) for k in range(3)],
        output=[
            pb2.ModelOutput(name="LABEL", data_type=int64, dims=[1]),
            pb2.ModelOutput(name="VOTES", data_type=fp32, dims=[10]),
        ],
        dynamic_batching=pb2.ModelDynamicBatching(),
        instance_group=[pb2.ModelInstanceGroup(count=1, kind=pb2.ModelInstanceGroup.KIND_CPU)],
    )
    _write(repo, vote, {"model.py": textwrap.dedent(HAND_VOTE_MODEL).lstrip()})
    steps = [
        pb2.ModelEnsembling.Step(
            model_name=f"hand_{kind}",
            model_version=-1,
            input_map={"input": "input"},
            output_map={"probabilities": f"p_{kind}"},
        )
        for kind in MEMBERS
    ]
    steps.append(
        pb2.ModelEnsembling.Step(
            model_name="hand_vote_model",
            model_version=-1,
            input_map={f"P{k}": f"p_{kind}" for k, kind in enumerate(MEMBERS)},
            output_map={"LABEL": "LABEL", "VOTES": "VOTES"},
        )
    )
    ensemble = pb2.ModelConfig(
        name="hand_vote",
        platform="ensemble",
        max_batch_size=64,
        input=[pb2.ModelInput(name="input", data_type=fp32, dims=[64])],
        output=[
            pb2.ModelOutput(name="LABEL", data_type=int64, dims=[1]),
            pb2.ModelOutput(name="VOTES", data_type=fp32, dims=[10]),
            *(pb2.ModelOutput(name=f"p_{kind}", data_type=fp32, dims=[10]) for kind in MEMBERS),
        ],
        ensemble_scheduling=pb2.ModelEnsembling(step=steps),
    )
    _write(repo, ensemble)
    return repo


def same_answers(servers: dict[str, EmbeddedServer]) -> None:
    """Both pipelines give the same votes on the digits test split (else the comparison is moot)."""
    import tritonclient.grpc as grpcclient

    from tritonforge.examples.build_digits import digits_split

    x = digits_split()[1][:64]
    answers = {}
    for side, server in servers.items():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            item = grpcclient.InferInput("input", list(x.shape), "FP32")
            item.set_data_from_numpy(x)
            result = client.infer(ENSEMBLE[side], [item])
            answers[side] = (result.as_numpy("LABEL"), result.as_numpy("VOTES"))
        finally:
            client.close()
    for side in (BUILT, UNFUSED):
        assert np.array_equal(answers[side][0], answers[HAND][0]), f"{side} and {HAND} labels differ"
        assert np.allclose(answers[side][1], answers[HAND][1], atol=1e-6), f"{side} and {HAND} votes differ"


def measure(
    exe: str, server: EmbeddedServer, model: str, concurrency: int, window_ms: int
) -> dict[str, float]:
    pid = server.pid
    assert pid is not None
    cpu0, done0 = tree_cpu_s(pid), success_count(server.http_url, model)
    throughput = run_perf_analyzer(
        exe, server.grpc_url, model, concurrency, window_ms=window_ms, extra=["--shape", "input:64"]
    )
    cpu1, done1 = tree_cpu_s(pid), success_count(server.http_url, model)
    return {"throughput": throughput, "cpu_us_per_request": (cpu1 - cpu0) / max(1, done1 - done0) * 1e6}


def main() -> None:
    args, exe, levels = perf_analyzer_run_args(__doc__, "1,8,32")
    console = wide_console()  # names unbroken when piped
    root = Path(tempfile.mkdtemp(prefix="tritonforge-bench-vote-"))
    rounds: list[dict[str, Any]] = []
    idle_mib: dict[str, dict[str, float]] = {}
    servers: dict[str, EmbeddedServer] = {}
    try:
        with console.status("training the digits models and compiling digits_vote ..."):
            built, unfused = build_built(root)
            hand = build_hand(root, built)
        with console.status("starting one Triton per side ..."):
            for side, repo in ((BUILT, built), (UNFUSED, unfused), (HAND, hand)):
                # each server loads its pipeline and the models that pipeline runs, nothing else
                servers[side] = EmbeddedServer(
                    repo, model_control="explicit", load_models=[ENSEMBLE[side]]
                ).start()
        same_answers(servers)
        for side, server in servers.items():
            assert server.pid is not None
            idle_mib[side] = tree_memory_mib(server.pid)
        for r, order in enumerate(alternating(args.rounds, list(SIDES))):
            for concurrency in levels:
                for side in order:
                    with console.status(
                        f"round {r + 1}/{args.rounds}: {side}, concurrency {concurrency} ..."
                    ):
                        figures = measure(exe, servers[side], ENSEMBLE[side], concurrency, args.window_ms)
                    rounds.append({"round": r + 1, "side": side, "concurrency": concurrency, **figures})
                    console.print(
                        f"round {r + 1} c={concurrency:<3} {side:<18} {figures['throughput']:>9,.0f} infer/s "
                        f"{figures['cpu_us_per_request']:>8,.0f} us CPU/request",
                        highlight=False,
                    )
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    summary = report(console, rounds, levels, idle_mib, args)
    if args.json:
        args.json.write_text(
            json.dumps({"rounds": rounds, "summary": summary, "idle_mib": idle_mib}, indent=2)
        )


def report(
    console: Console,
    rounds: list[dict[str, Any]],
    levels: list[int],
    idle_mib: dict[str, dict[str, float]],
    args: Any,
) -> list[dict[str, Any]]:
    table = Table(
        title=f"digits_vote built vs hand-built: median of {args.rounds} alternating rounds "
        f"(min-max, ±half-range) — re-measure on a quiet machine"
    )
    columns = ("concurrency", "side", "infer/s", "server CPU us/request", "throughput vs hand", "CPU vs hand")
    for column in columns:
        table.add_column(column, justify="left" if column == "side" else "right")
    summary = []
    for c in levels:
        by = {s: [x for x in rounds if x["concurrency"] == c and x["side"] == s] for s in SIDES}
        for side in SIDES:
            ratios, cpu_ratios = _ratios(by[side], by[HAND], "throughput"), []
            if side != HAND:
                cpu_ratios = _ratios(by[side], by[HAND], "cpu_us_per_request")
                summary.append(
                    {
                        "concurrency": c,
                        "side": side,
                        "throughput_ratio_median": float(np.median(ratios)) if ratios else None,
                        "cpu_per_request_ratio_median": float(np.median(cpu_ratios)) if cpu_ratios else None,
                    }
                )
            table.add_row(
                str(c),
                side,
                spread([x["throughput"] for x in by[side]]),
                spread([x["cpu_us_per_request"] for x in by[side]]),
                spread(ratios) + "x" if side != HAND and ratios else "",
                spread(cpu_ratios) + "x" if side != HAND and cpu_ratios else "",
            )
    console.print(table)
    for row in summary:
        console.print(
            f"concurrency {row['concurrency']}: {row['side']}/hand-built throughput "
            f"{row['throughput_ratio_median']:.2f}x (median of per-round ratios), "
            f"server CPU per request {row['cpu_per_request_ratio_median']:.2f}x",
            highlight=False,
        )
    console.print(
        "idle memory (server + stubs; PSS splits shared pages, RSS counts them in every process; "
        "benchmarks/model_cost.py repeats it with time to ready): "
        + ", ".join(
            f"{side} {m['pss']:,.0f} MiB PSS / {m['rss']:,.0f} MiB RSS in {m['processes']:.0f} processes"
            for side, m in idle_mib.items()
        ),
        highlight=False,
    )
    return summary


def _ratios(side: list[dict[str, Any]], hand: list[dict[str, Any]], key: str) -> list[float]:
    """Per-round ratios ``side / hand`` of ``key`` (the rounds alternate, so each pair ran back to back)."""
    return [s[key] / h[key] for s, h in zip(side, hand, strict=True) if h[key]]


if __name__ == "__main__":
    main()
