"""Token packing: the fused MiniLM graph with its token-wise layers on real tokens only, against the same
graph with the padding cut alone.

Both graphs are what ``ensemble compile`` writes for the text pipeline (``write_fused`` with ``pack`` on
and off, padding cut in both): MiniLM FP32 (``minilm_encoder`` version 1 of ``--repo``) with mean pooling
appended. They run in this process on onnxruntime, one thread each, on the load-test sentences tokenised
by the tokenizer block's WordPiece and padded to the longest of each batch, as the fused tokenizer+encoder
pads them. Each round runs both graphs back to back, in alternating order, for ``--seconds`` per batch
size; printed per batch size: ms per sentence of each (median and spread over rounds), the ratio
cut-alone / packed in the same rounds (above 1: packing pays), and the largest difference between the
two graphs' embeddings.

    python benchmarks/token_packing.py                       # 5 rounds, batches of 1, 4 and 8
    python benchmarks/token_packing.py --rounds 3 --batch 1 8

Figures from a shared machine are noise; re-measure on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternating, load_wordpiece, machine_stamp, spread, wide_console

from tritonforge.ensemble._onnx_surgery import write_fused
from tritonforge.ensemble.blocks import DEFAULT_TOKENIZER, block_model
from tritonforge.loadtest.payloads import SENTENCES

ENCODER = "minilm_encoder"
TOKENS, MASK, OUTPUT = "last_hidden_state", "attention_mask", "EMBEDDING"
MAX_LENGTH = 128  # the text pipeline's tokenizer truncates here
VARIANTS = ("cut alone", "packed")


def tokenised(batch: int) -> list[dict[str, np.ndarray]]:
    """The sentences in batches of ``batch``, each padded to its longest row."""
    path = str(block_model("t", "tokenizer", {"tokenizer": DEFAULT_TOKENIZER}).extra_files[0])
    pieces = load_wordpiece()(path, MAX_LENGTH)
    ids = [pieces.encode(text) for text in SENTENCES]
    feeds = []
    for start in range(0, len(ids), batch):
        rows = ids[start : start + batch]
        width = max(map(len, rows))
        input_ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        feeds.append({"input_ids": input_ids, MASK: mask})
    return feeds


def session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ms_per_sentence(run: Any, feeds: list[dict[str, np.ndarray]], seconds: float) -> float:
    sentences, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for feed in feeds:
            run(None, feed)
            sentences += len(feed[MASK])
    return (time.perf_counter() - started) / sentences * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0, help="per graph, batch size and round")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    source = args.repo / ENCODER / "1" / "model.onnx"
    if not source.is_file():
        print(f"error: {source} is missing: build the examples first (tritonforge build --repo {args.repo})")
        return 2
    with tempfile.TemporaryDirectory(prefix="token_packing_") as scratch:
        runs = {}
        for name, pack in zip(VARIANTS, (False, True), strict=True):
            target = Path(scratch) / f"{'packed' if pack else 'cut'}.onnx"
            written = write_fused(source, target, TOKENS, MASK, OUTPUT, True, trim=True, pack=pack)
            if written is None or written[1:] != (True, pack):
                print(f"error: {source} does not fuse {name} ({written})")
                return 1
            runs[name] = session(target).run
        results: dict[str, dict[str, Any]] = {}
        for batch in args.batch:
            feeds = tokenised(batch)
            difference = max(
                float(np.abs(runs["packed"](None, f)[0] - runs["cut alone"](None, f)[0]).max()) for f in feeds
            )
            per: dict[str, Any] = {name: [] for name in VARIANTS}
            per["ratio"], per["max_abs_diff"] = [], difference
            for order in alternating(args.rounds, VARIANTS):
                took = {name: ms_per_sentence(runs[name], feeds, args.seconds) for name in order}
                for name in VARIANTS:
                    per[name].append(took[name])
                per["ratio"].append(took["cut alone"] / took["packed"])
            results[f"batch {batch}"] = per
    console = wide_console()
    stamp = machine_stamp()
    console.print(f"ms per sentence, {args.rounds} rounds x {args.seconds} s; {stamp}", highlight=False)
    for key, per in results.items():
        console.print(
            f"{key:9} cut alone {spread(per['cut alone']):30} packed {spread(per['packed']):30} "
            f"cut/packed {spread(per['ratio']):28} max |diff| {per['max_abs_diff']:.2e}",
            highlight=False,
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": stamp, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
