"""The text pipeline as one ensemble request versus the client calling its three steps one by one.

Same server, same models, same sentences: ``text_embedding`` (tokenizer -> MiniLM encoder -> mean pooling,
compiled from ``ensembles/text_embedding.yaml``; the compiler fuses the encoder and the pooling into one ONNX
graph which the tokenizer runs on each batch it tokenises, so the ensemble runs one step) is called once per
sentence, against a client that calls the
original three models as a user would — the tokenizer, then the encoder, then the pooling model — carrying
the intermediate tensors (token ids, mask, 384-d token embeddings) back and forth. Each is driven twice:
through ``tritonforge.client.AsyncClient`` and through a chain written with raw ``tritonclient.grpc.aio``
(so the comparison does not rest on our client). Closed-loop workers, one sentence per request, at
concurrency 1 and 16; the four paths alternate round by round (ABBA...) and the tables give the median of
the rounds with their spread, and the CPU time per request of the server (tritonserver and its backend
stubs) and of the client process, which contention moves less than throughput.

First the layout (instances x intra-op threads, as the build measured them) of every model involved,
then a profile of the ensemble alone: Triton's per-step statistics (queue, compute input,
infer and output per composing model, per request) show where an ensemble request's time goes.
Figures are ratios within the same run: take them on a quiet machine.

    tritonforge build                      # the example repository, pipelines included
    python benchmarks/ensemble_vs_client_chain.py [--repo model_repository] [--duration-s 3] [--rounds 5]
        [--text-layout 2x1]     # the ensemble's models in the chain encoder's layout, not the built one
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import alternating, model_stats, spread, summary, tree_cpu_s, wide_console  # on sys.path
from rich.console import Console
from rich.table import Table

from tritonforge.client import AsyncClient
from tritonforge.config import InstanceGroup, InstanceKind, read_config, write_config
from tritonforge.ensemble import check_specs, ensemble_config
from tritonforge.examples import SPECS_DIR
from tritonforge.examples.pipelines_demo import CORPUS, QUERIES
from tritonforge.repository import onnxruntime_thread_parameters
from tritonforge.server import EmbeddedServer

PIPELINE = "text_embedding"


def steps_of(repo: Path) -> tuple[list[Any], list[Any]]:
    """The compiled ensemble's steps (as served), and the spec's three steps unfused (the client chain)."""
    config = read_config(repo / PIPELINE / "config.pbtxt")
    resolved, issues = check_specs([SPECS_DIR / f"{PIPELINE}.yaml"], repo)
    if issues or not resolved or not config.ensemble_steps:
        raise SystemExit(f"{repo / PIPELINE} is not the text pipeline; run `tritonforge build` first")
    chain = list(ensemble_config(resolved[0]).ensemble_steps or ())
    if len(chain) != 3:
        raise SystemExit(f"{PIPELINE}.yaml is not the 3-step text pipeline")
    return list(config.ensemble_steps), chain


def sentence_batches() -> list[np.ndarray]:
    return [np.array([[s.encode()]], dtype=np.object_) for s in CORPUS + QUERIES]


async def run(
    call: Callable[[np.ndarray], Awaitable[np.ndarray]],
    concurrency: int,
    duration_s: float,
    server_pid: int | None = None,
) -> tuple[list[float], dict[str, float]]:
    texts = sentence_batches()
    for text in texts:  # warm the channel and every model on every sentence length
        await call(text)
    latencies: list[float] = []
    cpu = _cpu_now(server_pid)
    stop_at = time.perf_counter() + duration_s

    async def worker(offset: int) -> None:
        i = offset
        while True:
            start = time.perf_counter()
            if start > stop_at:
                return
            await call(texts[i % len(texts)])
            latencies.append(time.perf_counter() - start)
            i += 1

    await asyncio.gather(*[worker(k) for k in range(concurrency)])
    server_s, client_s = (b - a for a, b in zip(cpu, _cpu_now(server_pid), strict=True))
    n = max(1, len(latencies))
    return latencies, {"server_cpu_us": server_s / n * 1e6, "client_cpu_us": client_s / n * 1e6}


def _cpu_now(server_pid: int | None) -> tuple[float, float]:
    """CPU seconds so far of the server's process tree (0 without one) and of this (client) process."""
    return (tree_cpu_s(server_pid) if server_pid else 0.0), time.process_time()


ENSEMBLE_OURS, CHAIN_OURS = "ensemble, AsyncClient", "chain, AsyncClient"
ENSEMBLE_RAW, CHAIN_RAW = "ensemble, raw grpc.aio", "chain, raw grpc.aio"
PATHS = (ENSEMBLE_OURS, CHAIN_OURS, ENSEMBLE_RAW, CHAIN_RAW)


class Paths:
    """The four ways to embed a sentence, each an ``async (text) -> embedding`` call."""

    def __init__(self, url: str, steps: list[Any]) -> None:
        import tritonclient.grpc.aio as aioclient

        self.steps = steps
        # every call its own request, as the ensemble's steps are: this compares round trips, not batching
        self.ours = AsyncClient(url, coalesce=False, streams=True)  # as measured in docs/benchmarks.md
        self.raw = aioclient.InferenceServerClient(url)

    async def close(self) -> None:
        await self.ours.aclose()
        await self.raw.close()

    def calls(self) -> dict[str, Callable[[np.ndarray], Awaitable[np.ndarray]]]:
        return {
            ENSEMBLE_OURS: self.ensemble_ours,
            CHAIN_OURS: self.chain_ours,
            ENSEMBLE_RAW: self.ensemble_raw,
            CHAIN_RAW: self.chain_raw,
        }

    async def ensemble_ours(self, text: np.ndarray) -> np.ndarray:
        return (await self.ours.infer(PIPELINE, {"TEXT": text}))["EMBEDDING"]

    async def chain_ours(self, text: np.ndarray) -> np.ndarray:
        tensors: dict[str, np.ndarray] = {"TEXT": text}
        for step in self.steps:
            version = None if step.model_version == -1 else step.model_version
            out = await self.ours.infer(
                step.model_name,
                {name: tensors[source] for name, source in step.input_map.items()},
                version=version,
                outputs=list(step.output_map),
            )
            tensors.update({step.output_map[name]: value for name, value in out.items()})
        return tensors["EMBEDDING"]

    async def _raw_infer(
        self, model: str, inputs: dict[str, np.ndarray], outputs: list[str], version: str = ""
    ) -> dict[str, np.ndarray]:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import np_to_triton_dtype

        items = []
        for name, array in inputs.items():
            item = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            item.set_data_from_numpy(array)
            items.append(item)
        result = await self.raw.infer(
            model, items, model_version=version, outputs=[InferRequestedOutput(n) for n in outputs]
        )
        return {name: result.as_numpy(name) for name in outputs}

    async def ensemble_raw(self, text: np.ndarray) -> np.ndarray:
        return (await self._raw_infer(PIPELINE, {"TEXT": text}, ["EMBEDDING"]))["EMBEDDING"]

    async def chain_raw(self, text: np.ndarray) -> np.ndarray:
        tensors: dict[str, np.ndarray] = {"TEXT": text}
        for step in self.steps:
            version = "" if step.model_version == -1 else str(step.model_version)
            out = await self._raw_infer(
                step.model_name,
                {name: tensors[source] for name, source in step.input_map.items()},
                list(step.output_map),
                version,
            )
            tensors.update({step.output_map[name]: value for name, value in out.items()})
        return tensors["EMBEDDING"]


async def measure(
    url: str, steps: list[Any], concurrency: int, duration_s: float, order: list[str], server_pid: int | None
) -> dict[str, tuple[list[float], dict[str, float]]]:
    paths = Paths(url, steps)
    try:
        calls = paths.calls()
        first = sentence_batches()[0]
        reference = await calls[ENSEMBLE_RAW](first)
        for name, call in calls.items():
            same = np.abs(await call(first) - reference).max()
            assert same < 1e-5, f"{name} disagrees with the ensemble by {same}"
        return {name: await run(calls[name], concurrency, duration_s, server_pid) for name in order}
    finally:
        await paths.close()


_STAT_PARTS = ("queue", "compute_input", "compute_infer", "compute_output")


def step_profile(
    server: EmbeddedServer, served: list[Any], steps: list[Any], concurrency: int, duration_s: float
) -> list[dict]:
    """Where the ensemble's time goes: per composing model (``served``), microseconds per request."""
    models = [PIPELINE, *(s.model_name for s in served)]

    def snapshot() -> dict[str, dict[str, Any]]:
        return {m: model_stats(server.http_url, m) for m in models}

    async def ensemble_only() -> None:
        paths = Paths(server.grpc_url, steps)
        try:
            await run(paths.ensemble_raw, concurrency, duration_s)
        finally:
            await paths.close()

    before = snapshot()
    asyncio.run(ensemble_only())
    after = snapshot()
    rows = []
    for m in models:
        a, b = after[m]["inference_stats"], before[m]["inference_stats"]
        count = int(a["success"]["count"]) - int(b["success"]["count"])
        executions = int(after[m].get("execution_count", 0)) - int(before[m].get("execution_count", 0))
        row: dict[str, Any] = {"model": m, "requests": count, "executions": executions}
        for part in _STAT_PARTS:
            ns = int(a[part]["ns"]) - int(b[part]["ns"])
            row[f"{part}_us"] = ns / max(1, count) / 1e3
        rows.append(row)
    return rows


def _process_cpu(server_pid: int) -> dict[str, float]:
    """CPU seconds so far per server process: ``tritonserver`` and each backend stub, named by its model."""
    import psutil

    root = psutil.Process(server_pid)
    seconds: dict[str, float] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            times, argv = proc.cpu_times(), proc.cmdline()
        except psutil.Error:
            continue
        name = "tritonserver" if proc.pid == server_pid else _stub_model(argv, proc.pid)
        seconds[name] = seconds.get(name, 0.0) + times.user + times.system
    return seconds


def _stub_model(argv: list[str], pid: int) -> str:
    # a Python-backend stub's argv: <stub> <model file> <shm region> <sizes> <sizes> <parent pid>
    # <backend dir> <ipc size> <instance name> ...; the model folder is two levels above its file
    if len(argv) > 1 and "/" in argv[1]:
        path = Path(argv[1])
        return f"stub {path.parent.parent.name} v{path.parent.name}"
    return f"process {pid}"


def cpu_profile(server: EmbeddedServer, steps: list[Any], concurrency: int, duration_s: float) -> list[dict]:
    """CPU per request of each server process and of the client, ensemble vs chain (raw clients)."""
    assert server.pid is not None
    per_path: dict[str, dict[str, float]] = {}
    for path in (ENSEMBLE_RAW, CHAIN_RAW):

        async def one(name: str = path) -> int:
            paths = Paths(server.grpc_url, steps)
            try:
                return len((await run(paths.calls()[name], concurrency, duration_s))[0])
            finally:
                await paths.close()

        before, client0 = _process_cpu(server.pid), time.process_time()
        count = max(1, asyncio.run(one()))
        after, client1 = _process_cpu(server.pid), time.process_time()
        used = {k: (v - before.get(k, 0.0)) / count * 1e6 for k, v in after.items()}
        used = {k: v for k, v in used.items() if v >= 5}  # idle stubs left out
        used["client (this process)"] = (client1 - client0) / count * 1e6
        per_path[path] = used
    names = sorted({k for used in per_path.values() for k in used}, key=lambda k: (k.startswith("client"), k))
    return [{"process": k, **{p: per_path[p].get(k, 0.0) for p in per_path}} for k in names]


def print_cpu_profile(console: Console, rows: list[dict], concurrency: int) -> None:
    table = Table(title=f"CPU us per request by process, concurrency {concurrency} (raw grpc.aio clients)")
    for column in ("process", ENSEMBLE_RAW, CHAIN_RAW):
        table.add_column(column, justify="left" if column == "process" else "right")
    for r in rows:
        table.add_row(r["process"], f"{r[ENSEMBLE_RAW]:,.0f}", f"{r[CHAIN_RAW]:,.0f}")
    table.add_row(
        "total", *(f"{sum(r[p] for r in rows):,.0f}" for p in (ENSEMBLE_RAW, CHAIN_RAW)), style="bold"
    )
    console.print(table)


def print_profile(console: Console, rows: list[dict], concurrency: int) -> None:
    table = Table(title=f"ensemble alone, concurrency {concurrency}: Triton's statistics, us per request")
    for column in ("model", "requests", "executions", *_STAT_PARTS):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        table.add_row(
            r["model"],
            str(r["requests"]),
            str(r["executions"]),
            *(f"{r[f'{p}_us']:.0f}" for p in _STAT_PARTS),
        )
    console.print(table)


def layouts_of(repo: Path, models: list[str]) -> list[dict[str, Any]]:
    """Each model's instances and intra-op threads as its config has them (threads "-" when it names none)."""
    rows = []
    for model in models:
        config = read_config(repo / model / "config.pbtxt")
        rows.append(
            {
                "model": model,
                "backend": config.platform or config.backend,
                "instances": sum(g.count for g in config.instance_groups) or 1,
                "intra_op_threads": config.parameters.get("intra_op_thread_count", "-"),
            }
        )
    return rows


def print_layouts(console: Console, rows: list[dict[str, Any]]) -> None:
    table = Table(title="the models involved, as served: instances x intra-op threads")
    for column in ("model", "backend", "instances", "intra-op threads"):
        table.add_column(column, justify="left" if column in ("model", "backend") else "right")
    for row in rows:
        table.add_row(row["model"], row["backend"], str(row["instances"]), str(row["intra_op_threads"]))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--duration-s", type=float, default=3.0, help="closed-loop window per path and round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument(
        "--text-layout",
        metavar="INSTANCESxTHREADS",
        help="serve the ensemble's own models in this layout instead of the built one (e.g. 2x1, the chain "
        "encoder's): a copy of the repository, hard links but for the configs",
    )
    args = parser.parse_args()
    console = wide_console()  # names unbroken when piped
    with tempfile.TemporaryDirectory(prefix="tritonforge-bench-") as scratch:
        if args.text_layout:
            args.repo = relaid(args.repo, Path(scratch) / "repo", args.text_layout)
        bench(args, console)


def relaid(repo: Path, copy: Path, layout: str) -> Path:
    """``repo`` copied to ``copy`` (files hard-linked, configs written anew) with the compiled ensemble's
    step models laid out as ``layout`` ("2x1": two instances of one intra-op thread each)."""
    try:
        instances, threads = (int(n) for n in layout.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--text-layout takes INSTANCESxTHREADS, e.g. 2x1; got {layout!r}") from None
    served, _ = steps_of(repo)
    shutil.copytree(repo, copy, copy_function=os.link)
    for model in {s.model_name for s in served}:
        path = copy / model / "config.pbtxt"
        config = read_config(path)
        config = config.replace(
            instance_groups=(InstanceGroup(count=instances, kind=InstanceKind.CPU),),
            parameters={**config.parameters, **onnxruntime_thread_parameters(threads)},
        )
        path.unlink()  # a hard link to the original: written anew, not through
        write_config(config, path)
    return copy


def bench(args: argparse.Namespace, console: Console) -> None:
    served, steps = steps_of(args.repo)
    models = list(dict.fromkeys([PIPELINE, *(s.model_name for s in served), *(s.model_name for s in steps)]))
    levels = [int(c) for c in args.concurrency.split(",")]
    layouts = layouts_of(args.repo, models[1:])
    print_layouts(console, layouts)
    rounds: list[dict[str, Any]] = []
    profiles: dict[int, list[dict]] = {}
    cpu_profiles: dict[int, list[dict]] = {}
    with console.status("starting Triton ..."):
        server = EmbeddedServer(args.repo, model_control="explicit", load_models=models).start()
    try:
        for concurrency in levels:
            with console.status(f"profiling the ensemble at concurrency {concurrency} ..."):
                profiles[concurrency] = step_profile(server, served, steps, concurrency, args.duration_s)
            print_profile(console, profiles[concurrency], concurrency)
            with console.status(f"CPU per process at concurrency {concurrency} ..."):
                cpu_profiles[concurrency] = cpu_profile(server, steps, concurrency, args.duration_s)
            print_cpu_profile(console, cpu_profiles[concurrency], concurrency)
        for r, order in enumerate(alternating(args.rounds, list(PATHS))):
            for concurrency in levels:
                with console.status(f"round {r + 1}/{args.rounds}, concurrency {concurrency} ..."):
                    results = asyncio.run(
                        measure(server.grpc_url, steps, concurrency, args.duration_s, order, server.pid)
                    )
                for path, (latencies, cpu) in results.items():
                    figures = {**summary(latencies, args.duration_s), **cpu}
                    rounds.append({"round": r + 1, "path": path, "concurrency": concurrency, **figures})
                    console.print(
                        f"round {r + 1} c={concurrency:<3} {path:<24} {figures['throughput']:>8,.0f} req/s "
                        f"p50 {figures['p50_ms']:.2f} ms  CPU/request server {cpu['server_cpu_us']:,.0f} us "
                        f"client {cpu['client_cpu_us']:,.0f} us",
                        highlight=False,
                    )
    finally:
        server.stop()
    table = Table(
        title=f"text_embedding: one ensemble request vs a client chaining 3 steps — median of {args.rounds} "
        f"alternating rounds of {args.duration_s:g} s (min-max, ±half-range); re-measure on a quiet machine"
    )
    columns = ("concurrency", "path", "req/s", "p50 ms", "p99 ms", "server CPU us/req", "client CPU us/req")
    for column in columns:
        table.add_column(column, justify="left" if column == "path" else "right")
    summaries = []
    for c in levels:
        by = {p: [x for x in rounds if x["concurrency"] == c and x["path"] == p] for p in PATHS}
        for path in PATHS:
            table.add_row(
                str(c),
                path,
                spread([x["throughput"] for x in by[path]]),
                spread([x["p50_ms"] for x in by[path]]),
                spread([x["p99_ms"] for x in by[path]]),
                spread([x["server_cpu_us"] for x in by[path]]),
                spread([x["client_cpu_us"] for x in by[path]]),
            )
        for ens, chain in ((ENSEMBLE_OURS, CHAIN_OURS), (ENSEMBLE_RAW, CHAIN_RAW)):
            ratios = [
                e["throughput"] / h["throughput"]
                for e, h in zip(by[ens], by[chain], strict=True)
                if h["throughput"]
            ]
            cpu_ratios = [
                (h["server_cpu_us"] + h["client_cpu_us"]) / (e["server_cpu_us"] + e["client_cpu_us"])
                for e, h in zip(by[ens], by[chain], strict=True)
                if e["server_cpu_us"] + e["client_cpu_us"]
            ]
            summaries.append(
                {
                    "concurrency": c,
                    "ensemble": ens,
                    "chain": chain,
                    "ratios": ratios,
                    "cpu_ratios": cpu_ratios,
                }
            )
    console.print(table)
    for s in summaries:
        console.print(
            f"concurrency {s['concurrency']}: {s['ensemble']} / {s['chain']} throughput "
            f"{spread(s['ratios'])}x (per-round ratios); chain / ensemble CPU per request (server + client) "
            f"{spread(s['cpu_ratios'])}x",
            highlight=False,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rounds": rounds,
                    "ratios": summaries,
                    "profiles": profiles,
                    "cpu_profiles": cpu_profiles,
                    "layouts": layouts,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
