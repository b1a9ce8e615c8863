"""Write the character table of the standard-library WordPiece tokenizer from Hugging Face ``tokenizers``.

``tokenizers`` normalises text with Unicode tables of its own (older than any Python's ``unicodedata``):
which characters it drops, makes a space, strips of accents, lowercases and splits off as punctuation.
The tokenizer block's ``wordpiece.py`` reads that behaviour from ``wordpiece_unicode.json`` instead of
Python's tables, so it gives ``tokenizers``' ids on every Python. Rerun after upgrading ``tokenizers``:

    python tools/wordpiece_unicode.py    # rewrites src/tritonforge/ensemble/models/wordpiece_unicode.json

``tests/test_wordpiece.py`` fails when the table and the installed ``tokenizers`` disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TABLE = Path(__file__).resolve().parent.parent / "src/tritonforge/ensemble/models/wordpiece_unicode.json"
HANGUL = range(0xAC00, 0xD7A4)  # decomposed by the algorithm in wordpiece.py, not listed


def _ranges(codes: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for code in codes:
        if out and out[-1][1] == code - 1:
            out[-1][1] = code
        else:
            out.append([code, code])
    return out


def table() -> dict[str, object]:
    """The table as ``tokenizers`` (installed here) behaves."""
    import tokenizers
    from tokenizers import normalizers, pre_tokenizers

    def bert(**kw: bool) -> normalizers.Normalizer:
        return normalizers.BertNormalizer(
            **{
                "clean_text": False,
                "handle_chinese_chars": False,
                "strip_accents": False,
                "lowercase": False,
                **kw,
            }
        )

    clean, strip, lower = bert(clean_text=True), bert(strip_accents=True), bert(lowercase=True)
    split = pre_tokenizers.BertPreTokenizer()
    drop, space, punct = [], [], []
    stripped: dict[str, str] = {}
    lowered: dict[str, str] = {}
    for code in range(0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        ch = chr(code)
        cleaned = clean.normalize_str(ch)
        if cleaned == "":
            drop.append(code)
        elif cleaned == " " and ch != " ":
            space.append(code)
        if code not in HANGUL and (out := strip.normalize_str(ch)) != ch:
            stripped[str(code)] = out
        if (out := lower.normalize_str(ch)) != ch:
            lowered[str(code)] = out
        if len(split.pre_tokenize_str(f"a{ch}a")) == 3:
            punct.append(code)
    return {
        "tokenizers": tokenizers.__version__,
        "drop": _ranges(drop),
        "space": _ranges(space),
        "punct": _ranges(punct),
        "strip": stripped,
        "lower": lowered,
    }


def main() -> int:
    TABLE.write_text(json.dumps(table(), separators=(",", ":"), ensure_ascii=True, sort_keys=True) + "\n")
    print(f"wrote {TABLE} ({TABLE.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
