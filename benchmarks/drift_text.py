"""Text drift on real sentences: the MiniLM build's profile of the text pipeline against in-domain and
other-domain text.

The reference is what ``tritonforge build`` stores beside each ``minilm_encoder`` version
(``build_minilm.text_profile``: the build's 256 held-out sentences, their sentence embeddings). Each
trial sends ``--rows`` sentences through the same encoder in-process (mean-pooled, L2-normalised, as the
``text_embedding`` pipeline answers) and judges them with ``tritonforge.observe.drift.compare``:

- clean: in-domain sentences the build never saw (the same generator, other seeds): any flag is a false
  positive;
- other-domain: sentences from the standard library's docstrings (technical prose about files, sockets,
  numbers and dates; this project did not write them);
- mixed: half in-domain, half other-domain.

Printed per scenario: the share of trials flagged (detection rate; for "clean" the false-positive rate),
which tests fired (MMD on the embeddings, the share of unknown words, the per-row summaries), and the
median MMD p-value.

    python benchmarks/drift_text.py --repo model_repository           # 50 trials of 100 sentences
    python benchmarks/drift_text.py --repo model_repository --trials 20 --rows 200
"""

from __future__ import annotations

import argparse
import importlib
import random
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

#: modules whose docstrings give the other-domain sentences (their own and their public callables')
DOC_MODULES = (
    "argparse",
    "bisect",
    "calendar",
    "collections",
    "csv",
    "datetime",
    "decimal",
    "email.message",
    "fractions",
    "functools",
    "heapq",
    "http.client",
    "ipaddress",
    "itertools",
    "json",
    "logging",
    "os",
    "pathlib",
    "random",
    "shutil",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "urllib.request",
    "zipfile",
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def doc_sentences() -> list[str]:
    """Every prose sentence (5 to 40 words, mostly letters) of the DOC_MODULES docstrings, deduplicated."""
    found: dict[str, None] = {}
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        for attr in sorted(dir(module)):
            if not attr.startswith("_"):
                docs.append(getattr(getattr(module, attr, None), "__doc__", None) or "")
        for doc in docs:
            for sentence in _SENTENCE_END.split(" ".join(doc.split())):
                words = sentence.split()
                letters = sum(c.isalpha() for c in sentence)
                if 5 <= len(words) <= 40 and letters >= 0.7 * len(sentence) and sentence[0].isupper():
                    found.setdefault(sentence, None)
    return list(found)


def in_domain(n: int, seed: int) -> list[str]:
    """``n`` sentences drawn from a set made as the build's reference is (256 of the generator's, with its
    10 fixed odd ones) but with a seed the build did not use (it uses 1)."""
    from tritonforge.examples import minilm

    return random.Random(seed).sample(minilm.sentences(256, seed=1000 + seed), n)


def other_domain(n: int, seed: int, pool: list[str] | None = None) -> list[str]:
    pool = pool if pool is not None else doc_sentences()
    return random.Random(seed).sample(pool, n)


def scenario(name: str, n: int, seed: int, pool: list[str]) -> list[str]:
    if name == "clean":
        return in_domain(n, seed)
    if name == "other-domain":
        return other_domain(n, seed, pool)
    half = n // 2
    return in_domain(n - half, seed) + other_domain(half, seed, pool)


def judge(reference, model_file: Path, texts: list[str], alpha: float, min_psi: float):  # type: ignore[no-untyped-def]
    from tritonforge.examples.build_minilm import sentence_embeddings
    from tritonforge.observe.drift import compare

    traffic = {
        "TEXT": np.array([[t.encode()] for t in texts], dtype=object),
        "EMBEDDING": sentence_embeddings(model_file, texts),
    }
    return compare(reference, traffic, alpha=alpha, min_psi=min_psi)


def main() -> None:
    from tritonforge.observe.drift import read_profile

    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("model_repository"))
    parser.add_argument("--version", default="1")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--min-psi", type=float, default=0.1)
    args = parser.parse_args()
    reference = read_profile(args.repo, "minilm_encoder", args.version)
    model_file = args.repo / "minilm_encoder" / args.version / "model.onnx"
    pool = doc_sentences()
    started = time.perf_counter()
    print(
        f"text drift: minilm_encoder v{args.version} profile ({reference.rows} reference sentences), "
        f"{args.trials} trials of {args.rows} sentences, alpha {args.alpha}, min PSI {args.min_psi}, "
        f"{len(pool)} other-domain sentences to draw from"
    )
    print(f"{'scenario':<13} {'flagged':>10} {'rate':>7} {'MMD p (median)':>15}  tests that fired")
    for name in ("clean", "other-domain", "mixed"):
        flagged, fired, p_values = 0, Counter[str](), []
        for trial in range(args.trials):
            report = judge(
                reference, model_file, scenario(name, args.rows, trial, pool), args.alpha, args.min_psi
            )
            flagged += report.drifted
            fired.update({f.feature for f in report.moved})
            p_values += [f.p_value for f in report.features if f.test == "mmd"]
        label = "false pos." if name == "clean" else "detected"
        tests = ", ".join(f"{k} {v}" for k, v in fired.most_common(4)) or "-"
        print(
            f"{name:<13} {flagged:>4}/{args.trials:<5} {flagged / args.trials:>7.1%} "
            f"{np.median(p_values):>15.2g}  {tests}  ({label})"
        )
    print(f"{time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
