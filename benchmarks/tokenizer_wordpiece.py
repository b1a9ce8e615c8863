"""Tokenising cost: the standard-library WordPiece of the tokenizer block against Hugging Face ``tokenizers``.

Both tokenise the same texts with MiniLM's ``tokenizer.json`` (truncation at 256) the way the block's
``execute`` does: ``tokenizers`` through one ``encode_batch`` call per batch (single-threaded, as the block
sets it), ``wordpiece.WordPiece`` one ``encode`` per text. Batches of 1 (one sentence per request, the usual
case) and of 64 (a full dynamic batch). Three corpora: the load-test sentences repeated (warm word cache),
unseen English-like text (every word new to the cache: a fresh tokenizer per round), and mixed Unicode
(accents, CJK, emoji). Each round runs both tokenizers back to back, in alternating order; printed per
corpus and batch: microseconds per text of each (median and spread over rounds) and the ratio
wordpiece / tokenizers in the same rounds.

    python benchmarks/tokenizer_wordpiece.py                  # 7 rounds
    python benchmarks/tokenizer_wordpiece.py --rounds 3

Figures from a shared machine are noise; re-measure on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import alternating, load_wordpiece, machine_stamp, spread, wide_console

from tritonforge.ensemble.blocks import DEFAULT_TOKENIZER, block_model
from tritonforge.loadtest.payloads import SENTENCES

MAX_LENGTH = 256


def corpora(count: int) -> dict[str, list[str]]:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    english = [
        " ".join(
            "".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(rng.randint(6, 24))
        )
        + rng.choice(".!?")
        for _ in range(count)
    ]
    mixed_words = [
        "café",
        "naïve",
        "Σίσυφος",
        "日本語",
        "テキスト",
        "한국어",
        "😀",
        "👍🏽",
        "résumé",
        "Straße",
        "—",
        "“x”",
    ]
    mixed = [
        " ".join(rng.choice(mixed_words + english[i].split()) for _ in range(rng.randint(6, 24)))
        for i in range(count)
    ]
    return {
        "sentences": [SENTENCES[i % len(SENTENCES)] for i in range(count)],
        "unseen": english,
        "unicode": mixed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--texts", type=int, default=2048, help="texts per corpus and round")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    path = str(block_model("t", "tokenizer", {"tokenizer": DEFAULT_TOKENIZER}).extra_files[0])
    word_piece = load_wordpiece()
    texts = corpora(args.texts)
    results: dict[str, dict[str, list[float]]] = {}
    for corpus, items in texts.items():
        for batch in (1, 64):
            key = f"{corpus} batch {batch}"
            per = results[key] = {"tokenizers": [], "wordpiece": [], "ratio": []}
            for order in alternating(args.rounds, ("tokenizers", "wordpiece")):
                took = {}
                for name in order:
                    if name == "tokenizers":
                        ref = Tokenizer.from_file(path)
                        ref.enable_truncation(MAX_LENGTH)
                        ref.no_padding()
                        started = time.perf_counter()
                        for i in range(0, len(items), batch):
                            [e.ids for e in ref.encode_batch(items[i : i + batch])]
                    else:
                        mine = word_piece(path, MAX_LENGTH)  # fresh: "unseen" words are new to its cache
                        started = time.perf_counter()
                        for i in range(0, len(items), batch):
                            [mine.encode(text) for text in items[i : i + batch]]
                    took[name] = (time.perf_counter() - started) / len(items) * 1e6
                    per[name].append(took[name])
                per["ratio"].append(took["wordpiece"] / took["tokenizers"])
    console = wide_console()
    console.print(f"µs per text, {args.rounds} rounds x {args.texts} texts; {machine_stamp()}")
    for key, per in results.items():
        console.print(
            f"{key:22} tokenizers {spread(per['tokenizers']):32} wordpiece {spread(per['wordpiece']):32} "
            f"ratio {spread(per['ratio'])}",
            highlight=False,
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_stamp(), "results": results}, indent=2))
    print(f"median ratio over all: {statistics.median(r for p in results.values() for r in p['ratio']):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
