"""The text pipeline as one ensemble request versus the client calling its three steps one by one.

Same server, same models, same sentences: ``text_embedding`` (tokenizer -> MiniLM encoder -> mean pooling,
compiled from ``ensembles/text_embedding.yaml``) is called once per sentence, against a client that calls
the tokenizer, then the encoder, then the pooling model itself, carrying the intermediate tensors (token ids,
mask, 384-d token embeddings) back and forth. Closed-loop ``tritonforge.client.AsyncClient`` workers, one
sentence per request, at concurrency 1 and 16. Figures are ratios within the same run (noisy machines).

    tritonforge build                      # the example repository, pipelines included
    python benchmarks/ensemble_vs_client_chain.py [--repo model_repository] [--duration-s 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from _common import summary  # benchmarks/ is on sys.path when a script runs
from rich.console import Console
from rich.table import Table

from tritonforge.client import AsyncClient
from tritonforge.config import read_config
from tritonforge.examples.pipelines_demo import CORPUS, QUERIES
from tritonforge.server import EmbeddedServer

PIPELINE = "text_embedding"


def steps_of(repo: Path) -> list[Any]:
    config = read_config(repo / PIPELINE / "config.pbtxt")
    if not config.ensemble_steps or len(config.ensemble_steps) != 3:
        raise SystemExit(f"{repo / PIPELINE} is not the 3-step text pipeline; run `tritonforge build` first")
    return list(config.ensemble_steps)


def sentence_batches() -> list[np.ndarray]:
    return [np.array([[s.encode()]], dtype=np.object_) for s in CORPUS + QUERIES]


async def run(
    call: Callable[[np.ndarray], Awaitable[np.ndarray]], concurrency: int, duration_s: float
) -> list[float]:
    texts = sentence_batches()
    for text in texts:  # warm the channel and every model on every sentence length
        await call(text)
    latencies: list[float] = []
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
    return latencies


async def measure(url: str, steps: list[Any], concurrency: int, duration_s: float) -> dict[str, list[float]]:
    # every call its own request, as the ensemble's steps are: this compares round trips, not batching
    async with AsyncClient(url, coalesce=False) as client:

        async def ensemble(text: np.ndarray) -> np.ndarray:
            return (await client.infer(PIPELINE, {"TEXT": text}))["EMBEDDING"]

        async def chain(text: np.ndarray) -> np.ndarray:
            tensors: dict[str, np.ndarray] = {"TEXT": text}
            for step in steps:
                version = None if step.model_version == -1 else step.model_version
                out = await client.infer(
                    step.model_name,
                    {name: tensors[source] for name, source in step.input_map.items()},
                    version=version,
                    outputs=list(step.output_map),
                )
                tensors.update({step.output_map[name]: value for name, value in out.items()})
            return tensors["EMBEDDING"]

        same = np.abs(await ensemble(sentence_batches()[0]) - await chain(sentence_batches()[0])).max()
        assert same < 1e-5, f"the two paths disagree by {same}"
        return {
            "ensemble (1 request)": await run(ensemble, concurrency, duration_s),
            "client chain (3 requests)": await run(chain, concurrency, duration_s),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    args = parser.parse_args()
    console = Console()
    steps = steps_of(args.repo)
    models = [PIPELINE, *(s.model_name for s in steps)]
    rows: list[dict[str, Any]] = []
    with console.status("starting Triton ..."):
        server = EmbeddedServer(args.repo, model_control="explicit", load_models=models).start()
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            with console.status(f"concurrency {concurrency} ..."):
                results = asyncio.run(measure(server.grpc_url, steps, concurrency, args.duration_s))
            base = None
            for path, latencies in results.items():
                figures = summary(latencies, args.duration_s)
                base = base or figures
                rows.append(
                    {
                        "path": path,
                        "concurrency": concurrency,
                        **figures,
                        "vs_ensemble": figures["throughput"] / base["throughput"],
                    }
                )
    finally:
        server.stop()
    table = Table(
        title=f"text_embedding: one ensemble request vs the client chaining 3 steps ({args.duration_s:g} s)"
    )
    for column in ("path", "concurrency", "req/s", "p50 ms", "p99 ms", "throughput vs ensemble"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for r in rows:
        table.add_row(
            r["path"],
            str(r["concurrency"]),
            f"{r['throughput']:,.0f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['vs_ensemble']:.3f}x",
        )
    console.print(table)
    for concurrency in sorted({r["concurrency"] for r in rows}):
        ens, chain = (r for r in rows if r["concurrency"] == concurrency)
        console.print(
            f"concurrency {concurrency}: the ensemble gives {ens['throughput'] / chain['throughput']:.2f}x "
            f"the chain's throughput; p50 {chain['p50_ms'] / ens['p50_ms']:.2f}x lower, "
            f"p99 {chain['p99_ms'] / ens['p99_ms']:.2f}x lower",
            highlight=False,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
