"""BERT WordPiece tokenisation in the standard library and numpy: the ids Hugging Face ``tokenizers`` gives.

Reads a ``tokenizer.json`` of the BERT kind (``BertNormalizer``, ``BertPreTokenizer``, a ``WordPiece``
model, a ``[CLS] $A [SEP]`` template — MiniLM, BERT, most sentence-transformers encoders) and
reproduces ``Tokenizer.encode(text).ids`` with truncation to ``max_length``:

1. special tokens written in the text (``[MASK]``, ``[SEP]`` ...) are matched first, on the raw text,
   leftmost-longest, and kept whole;
2. the rest is normalised: control characters dropped, whitespace made a space, CJK ideographs padded with
   spaces, accents stripped (NFD, then every combining mark dropped), lowercased character by character
   (so no final sigma);
3. split on whitespace and around each punctuation character (ASCII punctuation and Unicode's P*);
4. each word becomes its longest-match-first WordPiece pieces (``##`` continuations), or ``[UNK]`` when
   it can't be covered or is longer than ``max_input_chars_per_word`` characters;
5. truncated to ``max_length - 2`` pieces and wrapped in ``[CLS] ... [SEP]``.

Words are looked up once and remembered (a bounded cache), so running text costs a dict hit per word.
Kept beside the tokenizer block's ``model.py`` so the model needs nothing NVIDIA's image lacks; the
tests compare it with ``tokenizers`` itself.
"""

import bisect
import json
import os
import re

#: words remembered with their pieces (a bounded cache: hostile input can't grow it without limit)
CACHE_WORDS = 65536

_CJK = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)
#: tokenizers' own character table (its Unicode version, not this Python's): see tools/wordpiece_unicode.py
TABLE_FILE = "wordpiece_unicode.json"
_ASCII_PUNCT = "!-/:-@\\[-`{-~"
# plain ASCII text: words and punctuation by one regex, after dropping the control characters
_ASCII_WORDS = re.compile(rf"[^ \t\n\r{_ASCII_PUNCT}]+|[{_ASCII_PUNCT}]")
_ASCII_CLEAN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class UnsupportedTokenizer(ValueError):
    """A tokenizer.json of another kind than BERT WordPiece (the message names what differs)."""


class WordPiece:
    """``encode(text) -> list[int]``: the ids of ``[CLS] text [SEP]``, at most ``max_length`` of them."""

    def __init__(self, path, max_length, table=None):
        with open(path, encoding="utf-8") as stream:
            spec = json.load(stream)
        table_path = table or os.path.join(os.path.dirname(os.path.abspath(__file__)), TABLE_FILE)
        with open(table_path, encoding="utf-8") as stream:
            self.table = _Table(json.load(stream))
        check(spec, path)
        model = spec["model"]
        self.vocab = model["vocab"]
        self.unk = self.vocab[model["unk_token"]]
        self.prefix = model["continuing_subword_prefix"]
        self.max_chars = int(model["max_input_chars_per_word"])
        self.lowercase = bool(spec["normalizer"].get("lowercase", True))
        accents = spec["normalizer"].get("strip_accents")
        self.strip_accents = self.lowercase if accents is None else bool(accents)
        self.chinese = bool(spec["normalizer"].get("handle_chinese_chars", True))
        self.clean = bool(spec["normalizer"].get("clean_text", True))
        single = spec["post_processor"]["single"]
        specials = spec["post_processor"]["special_tokens"]
        self.cls = specials[single[0]["SpecialToken"]["id"]]["ids"][0]
        self.sep = specials[single[2]["SpecialToken"]["id"]]["ids"][0]
        self.max_length = int(max_length)
        # special tokens written in the text are matched on the raw text; longest first = leftmost-longest
        added = {
            t["content"]: t["id"] for t in spec.get("added_tokens", ()) if not t.get("normalized", False)
        }
        self.added = added
        self.added_re = (
            re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
            if added
            else None
        )
        self.cache = {}
        self.chars = {}  # a character -> what the normaliser makes of it
        self.punct = {}  # a normalised character -> whether it is a word of its own

    def token_to_id(self, token):
        return self.vocab.get(token)

    def encode(self, text):
        """The ids of one text, like ``tokenizers``' ``encode(text).ids`` with truncation."""
        if self.clean and text.isascii() and (self.added_re is None or "[" not in text):
            ids = self._ascii(text)
        else:
            ids = []
            start = 0
            if self.added_re is not None:
                for match in self.added_re.finditer(text):
                    ids += self._text(text[start : match.start()])
                    ids.append(self.added[match.group()])
                    start = match.end()
            ids += self._text(text[start:])
        if self.max_length >= 2:  # below 2 (no room for the specials) tokenizers doesn't truncate at all
            ids = ids[: self.max_length - 2]
        return [self.cls, *ids, self.sep]

    def _ascii(self, text):
        if self.clean:
            text = _ASCII_CLEAN.sub("", text)
        if self.lowercase:
            text = text.lower()
        ids = []
        for word in _ASCII_WORDS.findall(text):
            ids += self._word(word)
        return ids

    def _text(self, text):
        """Normalise a stretch of text between special tokens, then split it into words and look them up."""
        chars = self.chars
        normalised = []
        for ch in text:
            out = chars.get(ch)
            if out is None:
                out = chars[ch] = self._normalise(ch)
            normalised.append(out)
        ids = []
        word = []
        punct = self.punct
        for ch in "".join(normalised):
            if ch == " ":
                if word:
                    ids += self._word("".join(word))
                    word = []
                continue
            alone = punct.get(ch)
            if alone is None:
                alone = punct[ch] = self.table.punct(ch)
            if alone:
                if word:
                    ids += self._word("".join(word))
                    word = []
                ids += self._word(ch)
            else:
                word.append(ch)
        if word:
            ids += self._word("".join(word))
        return ids

    def _normalise(self, ch):
        """What BertNormalizer makes of one character ("" when dropped; CJK padded with spaces)."""
        table = self.table
        code = ord(ch)
        if table.drop(code):
            return "" if self.clean else ch
        if table.space(code):
            return " "
        out = table.stripped(ch) if self.strip_accents else ch
        if self.lowercase:
            out = "".join(table.lower.get(c, c) for c in out)
        if self.chinese and any(low <= code <= high for low, high in _CJK):
            return f" {out} "
        return out

    def _word(self, word):
        found = self.cache.get(word)
        if found is not None:
            return found
        pieces = self._pieces(word)
        if len(self.cache) >= CACHE_WORDS:
            self.cache.clear()
        self.cache[word] = pieces
        return pieces

    def _pieces(self, word):
        if len(word) > self.max_chars:
            return [self.unk]
        vocab = self.vocab
        pieces = []
        start = 0
        end_of_word = len(word)
        while start < end_of_word:
            end = end_of_word
            piece = None
            while start < end:
                candidate = word[start:end] if start == 0 else self.prefix + word[start:end]
                piece = vocab.get(candidate)
                if piece is not None:
                    break
                end -= 1
            if piece is None:
                return [self.unk]
            pieces.append(piece)
            start = end
        return pieces


class _Table:
    """tokenizers' character classes: ranges to drop, to make spaces, punctuation; strip and lower maps."""

    def __init__(self, data):
        self._drop = _Ranges(data["drop"])
        self._space = _Ranges(data["space"])
        self._punct = _Ranges(data["punct"])
        self.strip = {chr(int(k)): v for k, v in data["strip"].items()}
        self.lower = {chr(int(k)): v for k, v in data["lower"].items()}

    def drop(self, code):
        return self._drop.has(code)

    def space(self, code):
        return self._space.has(code)

    def punct(self, ch):
        return self._punct.has(ord(ch))

    def stripped(self, ch):
        code = ord(ch)
        if 0xAC00 <= code <= 0xD7A3:  # a Hangul syllable: its jamo (Unicode's algorithm)
            index = code - 0xAC00
            jamo = chr(0x1100 + index // 588) + chr(0x1161 + index % 588 // 28)
            return jamo + (chr(0x11A7 + index % 28) if index % 28 else "")
        return self.strip.get(ch, ch)


class _Ranges:
    def __init__(self, ranges):
        self.starts = [low for low, _ in ranges]
        self.ends = [high for _, high in ranges]

    def has(self, code):
        at = bisect.bisect_right(self.starts, code) - 1
        return at >= 0 and code <= self.ends[at]


def check(spec, path):
    """Refuse a tokenizer.json this module would not reproduce exactly, naming the part that differs."""
    wanted = {
        "model": "WordPiece",
        "normalizer": "BertNormalizer",
        "pre_tokenizer": "BertPreTokenizer",
        "post_processor": "TemplateProcessing",
    }
    try:
        parts = {part: (spec.get(part) or {}).get("type") for part in wanted}
        wrong = [
            f"{part} {parts[part]!r} (not {kind!r})" for part, kind in wanted.items() if parts[part] != kind
        ]
        if not wrong:
            model = spec["model"]
            single = spec["post_processor"]["single"]
            specials = spec["post_processor"]["special_tokens"]
            shape = len(single) == 3 and "Sequence" in single[1]
            for item in (single[0], single[2]) if shape else ():
                shape = shape and len(specials[item["SpecialToken"]["id"]]["ids"]) == 1
            if not shape:
                wrong.append("a post_processor template other than '[CLS] $A [SEP]'")
            if model["unk_token"] not in model["vocab"]:
                wrong.append(f"an unk_token {model['unk_token']!r} missing from its vocab")
            int(model["max_input_chars_per_word"])
            str(model["continuing_subword_prefix"])
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise UnsupportedTokenizer(
            f"{path}: not a whole BERT WordPiece tokenizer.json ({exc!r} missing or wrong)"
        ) from None
    if wrong:
        raise UnsupportedTokenizer(
            f"{path}: a BERT WordPiece tokenizer.json is needed; this one has {', '.join(wrong)}"
        )
