"""The tokenizer block's standard-library WordPiece gives the ids of Hugging Face ``tokenizers``, exactly."""
# ruff: noqa: RUF001  (look-alike characters are what these texts test)

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tritonforge.ensemble.blocks import DEFAULT_TOKENIZER, WORDPIECE_TABLE, block_model, model_file

tokenizers = pytest.importorskip("tokenizers")
PROJECT = Path(__file__).resolve().parent.parent

SENTENCES = [
    "Hello, world!",
    "Triton serves many models at once, fast.",
    "The café's naïve résumé — “quoted” and ‘single’ … done",
    "ΟΔΟΣ Σίσυφος ΣΊΣΥΦΟΣ",  # capital sigma: lowered one character at a time, no final form
    "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji 😀🥰🫠 👍🏽 flags 🇫🇷",
    "tab\tnew\nline\x0bvt\x0cff\x85nel\r\n",
    "[CLS] hi [MASK] [mask] [SEP]x[UNK][PAD]",  # special tokens in the text: matched raw, whole
    "İstanbul ǅemal Straße ﬁne ẞ",
    "x\u00a0y\u2003z\u3000w zero\u200bwidth soft\u00adhyphen",
    "$100 + 5% = <tag> ^_^ `tick` |pipe| ~tilde \\back",
    "٣٤٥ مرحبا بالعالم — देवनागरी हिन्दी — ﾊﾝｶｸ ｶﾀｶﾅ — 𝐇𝐞𝐥𝐥𝐨",
    "\x00\ufffd\u0301 leading mark",
    "a" * 150 + " " + "b" * 100,  # over max_input_chars_per_word: [UNK]; at the limit: pieces
    "unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious",
    "",
    "   ",
]


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer_json() -> Path:
    return block_model("t", "tokenizer", {"tokenizer": DEFAULT_TOKENIZER}).extra_files[0]


@pytest.fixture(scope="module")
def wordpiece() -> ModuleType:
    return load(model_file("wordpiece"), "wordpiece")


def reference(path: Path, max_length: int) -> Any:
    ref = tokenizers.Tokenizer.from_file(str(path))
    ref.enable_truncation(max_length)
    ref.no_padding()
    return ref


def fuzz(count: int, seed: int) -> list[str]:
    """Random texts: ASCII, the BMP, all of Unicode (unassigned too) and emoji, mixed."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        chars = []
        for _ in range(rng.randint(0, 60)):
            pick = rng.randrange(5)
            low, high = [(32, 126), (0, 0x2FFF), (0, 0xFFFF), (0, 0x10FFFF), (0x1F300, 0x1FAFF)][pick]
            code = rng.randint(low, high)
            chars.append(chr(code) if not 0xD800 <= code <= 0xDFFF else "x")
        texts.append("".join(chars))
    return texts


def natural(count: int, seed: int, vocab: list[str]) -> list[str]:
    """Texts of real vocabulary words (cased, accented, glued to punctuation), long ones included."""
    rng = random.Random(seed)
    words = [w for w in vocab if w.isalpha()]
    marks = list(".,;:!?'\"()-–—…") + [" "] * 20
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.choice([3, 12, 40, 400])):
            word = rng.choice(words)
            word = word.capitalize() if rng.random() < 0.2 else word.upper() if rng.random() < 0.05 else word
            parts.append(word + rng.choice(marks))
        texts.append(" ".join(parts))
    return texts


@pytest.mark.parametrize("max_length", [256, 128, 16, 3, 2, 1])
def test_wordpiece_gives_the_ids_of_tokenizers(
    wordpiece: ModuleType, tokenizer_json: Path, max_length: int
) -> None:
    ref = reference(tokenizer_json, max_length)
    mine = wordpiece.WordPiece(str(tokenizer_json), max_length)
    vocab = list(json.loads(tokenizer_json.read_text())["model"]["vocab"])
    texts = SENTENCES + fuzz(1500, max_length) + natural(300, max_length, vocab)
    wrong = [(t, ref.encode(t).ids, mine.encode(t)) for t in texts if ref.encode(t).ids != mine.encode(t)]
    assert not wrong, wrong[:3]
    # a second pass answers from the word cache: the same ids
    assert all(mine.encode(t) == ref.encode(t).ids for t in texts[:200])


def test_the_character_table_is_tokenizers_own(wordpiece: ModuleType) -> None:
    """The table shipped beside wordpiece.py is what the installed tokenizers does, character by character
    (rerun tools/wordpiece_unicode.py after upgrading tokenizers)."""
    sys.path.insert(0, str(PROJECT / "tools"))
    try:
        fresh = load(PROJECT / "tools" / "wordpiece_unicode.py", "wordpiece_unicode").table()
    finally:
        sys.path.remove(str(PROJECT / "tools"))
    shipped = json.loads((model_file("wordpiece").parent / WORDPIECE_TABLE).read_text())
    assert shipped == json.loads(json.dumps(fresh))


def test_tokenizer_block_ships_wordpiece_beside_its_model(tokenizer_json: Path) -> None:
    built = block_model("t", "tokenizer", {})
    assert [p.name for p in built.extra_files] == ["tokenizer.json", "wordpiece.py", WORDPIECE_TABLE]
    assert "threads" not in built.config.parameters


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda s: s["model"].update(type="BPE"), "model 'BPE' (not 'WordPiece')"),
        (lambda s: s.update(normalizer=None), "normalizer None"),
        (lambda s: s["post_processor"].update(single=[]), "'[CLS] $A [SEP]'"),
        (lambda s: s.pop("model"), "model None"),
        (lambda s: s["model"].pop("vocab"), "not a whole BERT WordPiece tokenizer.json"),
    ],
)
def test_tokenizer_block_refuses_what_wordpiece_would_not_reproduce(
    tmp_path: Path, tokenizer_json: Path, change: Any, named: str
) -> None:
    spec = json.loads(tokenizer_json.read_text())
    change(spec)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="BERT WordPiece") as caught:
        block_model("t", "tokenizer", {"tokenizer": str(path)})
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)
