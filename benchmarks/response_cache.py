"""Triton's response cache on a workload with repeats: the text pipeline with and without it.

Sentences are drawn from a Zipf distribution over a pool of distinct sentences (a few very frequent, a long
tail of rare ones, as real query traffic is), one sentence per request. Two embedded Tritons serve copies of
the same repository, both started with a local cache (``--cache-config local,size=...``): one with
``response_cache { enable: true }`` on the ``text_embedding`` ensemble (a hit skips tokenizer, encoder
and pooling alike), one without. Closed-loop ``tritonclient.grpc.aio`` workers send the same seeded
sentence sequence to each, the two alternating round by round (ABBA...). Figures per round: throughput,
p50, and the hit rate from Triton's own statistics (``cache_hit`` / ``cache_miss`` counts). The cached
answers are checked equal to the uncached ones first. The cache stays warm from round to round (the
steady state of a long-running server). Take the figures on a quiet machine.

    tritonforge build                      # the example repository, pipelines included
    python benchmarks/response_cache.py [--repo model_repository] [--rounds 5] [--duration-s 3]
        [--zipf-a 1.2] [--distinct 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import alternating, model_stats, spread, summary, wide_console  # benchmarks/ is on sys.path
from rich.table import Table

from tritonforge.config import read_config, write_config
from tritonforge.examples.pipelines_demo import CORPUS, QUERIES
from tritonforge.server import EmbeddedServer

PIPELINE = "text_embedding"
CACHED, UNCACHED = "response cache on", "response cache off"
CACHE_BYTES = 256 * 2**20


def sentence_pool(distinct: int, seed: int = 0) -> list[str]:
    """``distinct`` different sentences built from the demo's words (deterministic)."""
    rng = np.random.default_rng(seed)
    words = sorted({w.strip(".,?!").lower() for s in CORPUS + QUERIES for w in s.split()})
    pool: set[str] = set(CORPUS + QUERIES)
    while len(pool) < distinct:
        pool.add(" ".join(rng.choice(words, size=int(rng.integers(3, 16)))))
    return sorted(pool)[:distinct]


def zipf_sequence(pool: list[str], length: int, a: float, seed: int = 1) -> list[np.ndarray]:
    """``length`` requests whose sentences follow Zipf(a) over the pool's ranks (rank 1 the most often)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))  # which sentence gets which rank
    ranks = np.minimum(rng.zipf(a, size=length), len(pool)) - 1
    return [np.array([[pool[order[r]].encode()]], dtype=np.object_) for r in ranks]


def cache_args(size_bytes: int) -> list[str]:
    """tritonserver flags for a local response cache of ``size_bytes``.

    The wheel's server looks for its cache library under ``/opt/tritonserver/caches`` (the container's
    place); the wheel ships it under ``tritonserver/caches``, so point the server there when it exists.
    """
    from tritonforge.server import find_tritonserver

    args = ["--cache-config", f"local,size={size_bytes}"]
    install = find_tritonserver()
    for folder in (install.binary.parent.parent / "caches", Path("/opt/tritonserver/caches")):
        if (folder / "local").is_dir():
            args += ["--cache-directory", str(folder)]
            break
    return args


def cached_copy(repo: Path, root: Path) -> Path:
    """A copy of ``repo`` whose pipeline has Triton's response cache on."""
    copy = root / "cached_repo"
    shutil.copytree(repo, copy, symlinks=True)
    config = read_config(copy / PIPELINE / "config.pbtxt")
    write_config(config.replace(response_cache=True), copy / PIPELINE / "config.pbtxt")
    return copy


async def drive(url: str, texts: list[np.ndarray], concurrency: int, duration_s: float) -> list[float]:
    import tritonclient.grpc.aio as aioclient
    from tritonclient.grpc import InferInput, InferRequestedOutput

    client = aioclient.InferenceServerClient(url)
    latencies: list[float] = []
    cursor = 0
    try:
        stop_at = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal cursor
            while True:
                start = time.perf_counter()
                if start > stop_at:
                    return
                text = texts[cursor % len(texts)]
                cursor += 1
                item = InferInput("TEXT", [1, 1], "BYTES")
                item.set_data_from_numpy(text)
                await client.infer(PIPELINE, [item], outputs=[InferRequestedOutput("EMBEDDING")])
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    finally:
        await client.close()
    return latencies


def embeddings(url: str, texts: list[np.ndarray]) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        out = []
        for text in texts:
            item = grpcclient.InferInput("TEXT", [1, 1], "BYTES")
            item.set_data_from_numpy(text)
            out.append(client.infer(PIPELINE, [item]).as_numpy("EMBEDDING"))
        return np.concatenate(out)
    finally:
        client.close()


def cache_counts(server: EmbeddedServer) -> tuple[int, int]:
    stats = model_stats(server.http_url, PIPELINE)["inference_stats"]
    return int(stats.get("cache_hit", {}).get("count", 0)), int(stats.get("cache_miss", {}).get("count", 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median reported)")
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--zipf-a", type=float, default=1.2, help="Zipf exponent (higher: more repeats)")
    parser.add_argument("--distinct", type=int, default=2000, help="distinct sentences in the pool")
    parser.add_argument("--json", type=Path, help="also write the rounds here")
    args = parser.parse_args()
    if not (args.repo / PIPELINE / "config.pbtxt").is_file():
        raise SystemExit(f"{args.repo} has no {PIPELINE} pipeline; run `tritonforge build` first")
    console = wide_console()  # names unbroken when piped
    levels = [int(c) for c in args.concurrency.split(",")]
    texts = zipf_sequence(sentence_pool(args.distinct), 200_000, args.zipf_a)
    unique_share = len({t[0, 0] for t in texts[:10_000]}) / 10_000
    console.print(
        f"workload: Zipf(a={args.zipf_a}) over {args.distinct} sentences; "
        f"{unique_share:.0%} of the first 10,000 requests are distinct sentences",
        highlight=False,
    )
    root = Path(tempfile.mkdtemp(prefix="tritonforge-bench-cache-"))
    servers: dict[str, EmbeddedServer] = {}
    rounds: list[dict[str, Any]] = []
    # the flags the server needs for any model's cache; both sides get them, so only the config differs
    cache_flag = cache_args(CACHE_BYTES)
    try:
        with console.status("starting one Triton per side ..."):
            servers[UNCACHED] = EmbeddedServer(args.repo, extra_args=cache_flag).start()
            servers[CACHED] = EmbeddedServer(cached_copy(args.repo, root), extra_args=cache_flag).start()
        sample = texts[:20]
        same = np.abs(
            embeddings(servers[CACHED].grpc_url, sample) - embeddings(servers[UNCACHED].grpc_url, sample)
        )
        assert same.max() < 1e-5, f"cached answers differ from uncached ones by {same.max()}"
        for r, order in enumerate(alternating(args.rounds, [CACHED, UNCACHED])):
            for c in levels:
                for side in order:
                    server = servers[side]
                    hits0, misses0 = cache_counts(server)
                    with console.status(f"round {r + 1}/{args.rounds}: {side}, concurrency {c} ..."):
                        latencies = asyncio.run(drive(server.grpc_url, texts, c, args.duration_s))
                    hits1, misses1 = cache_counts(server)
                    lookups = (hits1 - hits0) + (misses1 - misses0)
                    hit_rate = (hits1 - hits0) / lookups if lookups else 0.0
                    figures = summary(latencies, args.duration_s)
                    rounds.append(
                        {"round": r + 1, "side": side, "concurrency": c, "hit_rate": hit_rate, **figures}
                    )
                    console.print(
                        f"round {r + 1} c={c:<3} {side:<18} {figures['throughput']:>8,.0f} req/s "
                        f"p50 {figures['p50_ms']:.2f} ms, hit rate {hit_rate:.0%}",
                        highlight=False,
                    )
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    table = Table(
        title=f"{PIPELINE}, Zipf(a={args.zipf_a}) sentences: median of {args.rounds} alternating rounds "
        "(min-max, ±half-range) — re-measure on a quiet machine"
    )
    for column in ("concurrency", "side", "req/s", "p50 ms", "hit rate", "throughput vs off"):
        table.add_column(column, justify="left" if column == "side" else "right")
    for c in levels:
        by = {s: [x for x in rounds if x["concurrency"] == c and x["side"] == s] for s in (CACHED, UNCACHED)}
        ratios = [
            a["throughput"] / b["throughput"]
            for a, b in zip(by[CACHED], by[UNCACHED], strict=True)
            if b["throughput"]
        ]
        for side in (CACHED, UNCACHED):
            table.add_row(
                str(c),
                side,
                spread([x["throughput"] for x in by[side]]),
                spread([x["p50_ms"] for x in by[side]]),
                f"{np.median([x['hit_rate'] for x in by[side]]):.0%}",
                spread(ratios) + "x" if side == CACHED and ratios else "",
            )
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
