"""Real request data for the example models: digits images and sentences, shaped by a model's config.

Each function takes the config the server reports (``model_config_pb2.ModelConfig``) and returns a list of
one-request payloads, so the same data fits a model, an ensemble, or a model without a batch dim.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb2

__all__ = ["SENTENCES", "digits_payloads", "text_payloads"]

SENTENCES = (
    "Triton serves many models at once.",
    "The quick brown fox jumps over the lazy dog.",
    "Dynamic batching groups requests that arrive close together.",
    "A sentence encoder maps text to a vector of 384 numbers.",
    "Load tests show where the latency goes.",
    "Ensembles chain a tokenizer, an encoder and a pooling step.",
    "How many requests per second can one core generate?",
    "The p99 latency is what the slowest users see.",
)


def _shape(config: pb2.ModelConfig, rows: int, dims: tuple[int, ...]) -> tuple[int, ...]:
    return (rows, *dims) if config.max_batch_size > 0 else dims


def digits_payloads(
    config: pb2.ModelConfig, *, count: int = 450, batch: int = 1
) -> list[dict[str, np.ndarray]]:
    """scikit-learn's digits (the last ``count`` images, float32 pixels 0-16) for the model's first input.

    Raises:
        ImportError: scikit-learn is not installed (``pip install 'tritonforge[sklearn]'``).
    """
    from sklearn.datasets import load_digits

    name = config.input[0].name
    images = load_digits().data.astype(np.float32)[-count:]
    return [
        {name: images[i : i + batch].reshape(_shape(config, batch, (64,)))}
        for i in range(0, len(images) - batch + 1, batch)
    ]


def text_payloads(
    config: pb2.ModelConfig, *, sentences: tuple[str, ...] = SENTENCES
) -> list[dict[str, np.ndarray]]:
    """One sentence per request, as Triton BYTES, for the model's first input."""
    name = config.input[0].name
    dims = tuple(int(d) if d > 0 else 1 for d in config.input[0].dims) or (1,)
    return [
        {name: np.array([s.encode()], dtype=np.object_).reshape(_shape(config, 1, dims))} for s in sentences
    ]
