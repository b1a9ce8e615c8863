"""The example pipelines end to end on the embedded Triton server, with a short readable report.

``run_pipelines_demo(console, repo)`` serves ``repo`` (built by ``tritonforge build``: the example models and
the pipelines compiled from ``ensembles/``) and runs:

- ``text_embedding``: embeds a few sentences and queries in one request each, prints each query's nearest
  sentences, and checks the server's embeddings against the same pipeline computed in-process (tokenizer,
  the FP32 encoder with onnxruntime, mean pooling) by cosine similarity;
- ``digits_vote``: the digits test split through three classifiers in parallel and their majority vote;
  prints the accuracy of each member and of the vote;
- ``digits_routed``: the same split through the routed pipeline (how many rows were escalated, accuracy),
  then again with the primary model unloaded, so the fallback answers every row.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PipelinesDemoResult", "run_pipelines_demo"]

CORPUS = [
    "A man is playing a guitar on stage.",
    "The orchestra performed a symphony last night.",
    "The stock market fell sharply after the announcement.",
    "Investors worry about rising interest rates.",
    "A cat is sleeping on the windowsill.",
    "The dog chased the ball across the park.",
    "Triton serves many models at once on one GPU.",
    "Batching requests raises an inference server's throughput.",
    "Heavy rain is expected over the weekend.",
    "The forecast says it will be sunny tomorrow.",
]
QUERIES = [
    "live music concert",
    "will it rain on Saturday?",
    "deploying machine learning models",
    "pets at home",
]

TEXT_PIPELINE, VOTE_PIPELINE, ROUTED_PIPELINE = "text_embedding", "digits_vote", "digits_routed"
ROUTED_PRIMARY = "digits_logreg"
VOTE_MEMBERS = ("logreg", "mlp", "random_forest")


@dataclasses.dataclass
class PipelinesDemoResult:
    """What the demo measured (None where a pipeline was not in the repository)."""

    nearest: dict[str, list[tuple[str, float]]] = dataclasses.field(default_factory=dict)
    text_cosine_min: float | None = None
    digits_accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    routed_accuracy: float | None = None
    routed_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    fallback_accuracy: float | None = None
    fallback_counts: dict[str, int] = dataclasses.field(default_factory=dict)


def run_pipelines_demo(
    console: Any, repo: Path, server_options: Mapping[str, Any] | None = None
) -> PipelinesDemoResult:
    """Serve ``repo`` and run each example pipeline it holds; print a short report to ``console`` (rich).

    ``server_options`` go to :class:`~tritonforge.server.EmbeddedServer` (e.g. ``python``: the stubs in a
    reduced interpreter).

    Raises:
        ServerError / ModelLoadError: the server did not start or a model did not load.
        ClientError: a request failed.
    """
    from tritonforge.client import Client
    from tritonforge.server import EmbeddedServer

    repo = Path(repo)
    result = PipelinesDemoResult()
    present = {p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file()}
    with console.status("starting Triton with the pipelines ..."):
        server = EmbeddedServer(
            repo, model_control="explicit", load_models=["*"], **dict(server_options or {})
        ).start()
    try:
        with Client(server.grpc_url) as client:
            if TEXT_PIPELINE in present:
                _text(console, client, repo, result)
            if VOTE_PIPELINE in present or ROUTED_PIPELINE in present:
                x, y = _digits_test_split()
                if VOTE_PIPELINE in present:
                    _vote(console, client, x, y, result)
                if ROUTED_PIPELINE in present:
                    _routed(console, client, server, x, y, result)
    finally:
        server.stop()
    return result


def _infer_batches(
    client: Any, model: str, name: str, x: np.ndarray, size: int = 64
) -> dict[str, np.ndarray]:
    parts = [client.infer(model, {name: x[i : i + size]}) for i in range(0, len(x), size)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _text(console: Any, client: Any, repo: Path, result: PipelinesDemoResult) -> None:
    from rich.table import Table

    def embed(texts: list[str]) -> np.ndarray:
        batch = np.array([[t.encode()] for t in texts], dtype=np.object_)
        return np.asarray(client.infer(TEXT_PIPELINE, {"TEXT": batch})["EMBEDDING"])

    corpus, queries = embed(CORPUS), embed(QUERIES)
    table = Table(title="text_embedding: nearest sentences (cosine), strings in -> 384-d embeddings out")
    for column in ("query", "nearest", "cos", "second", "cos "):
        table.add_column(column)
    for query, vector in zip(QUERIES, queries, strict=True):
        scores = corpus @ vector
        best = np.argsort(-scores)[:2]
        result.nearest[query] = [(CORPUS[i], float(scores[i])) for i in best]
        table.add_row(
            query, CORPUS[best[0]], f"{scores[best[0]]:.3f}", CORPUS[best[1]], f"{scores[best[1]]:.3f}"
        )
    console.print(table)
    local = _text_in_process(repo, CORPUS + QUERIES)
    if local is not None:
        served = np.concatenate([corpus, queries])
        result.text_cosine_min = float((served * local).sum(axis=1).min())
        console.print(
            f"server vs the same pipeline in-process (FP32 encoder, onnxruntime): min cosine "
            f"{result.text_cosine_min:.6f} over {len(local)} sentences",
            highlight=False,
        )


def _text_in_process(repo: Path, texts: list[str]) -> np.ndarray | None:
    """The text pipeline computed here from the repository's own files, or None if it can't be."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from tritonforge.config import read_config

    ensemble = read_config(repo / TEXT_PIPELINE / "config.pbtxt")
    steps = {s.model_name: s for s in ensemble.ensemble_steps or ()}
    tokenizer_dir = next((repo / m for m in steps if (repo / m / "1" / "tokenizer.json").is_file()), None)
    encoder = next(
        (
            (repo / m, s.model_version)
            for m, s in steps.items()
            if (repo / m).is_dir() and any((repo / m).glob("*/model.onnx"))
        ),
        None,
    )
    if tokenizer_dir is None or encoder is None:
        return None
    encoder_dir, version = encoder
    record = encoder_dir / str(version) / "manifest.json"
    made = json.loads(record.read_text()) if version != -1 and record.is_file() else {}
    if made.get("variant") == "tokenize_encode":
        # the tokenizer running the fused graph (tritonforge.ensemble.fuse): the fused model it runs
        encoder_dir, version = repo / made["from"]["encoder"], 1
        record = encoder_dir / "1" / "manifest.json"
        made = json.loads(record.read_text()) if record.is_file() else {}
    fused = made.get("fused")
    if fused:
        # a fused encoder+pooling: compare against the model it was made from
        encoder_dir, version = repo / fused["from"][0]["model"], int(fused["from"][0]["version"])
    if version == -1:
        version = max(int(p.name) for p in encoder_dir.iterdir() if p.name.isdigit())
    tokenizer_config = read_config(tokenizer_dir / "config.pbtxt")
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "1" / "tokenizer.json"))
    tokenizer.enable_truncation(int(tokenizer_config.parameters.get("max_length", "256")))
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    session = ort.InferenceSession(
        str(encoder_dir / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    feeds = {
        i.name: {"input_ids": ids, "attention_mask": mask}.get(i.name, np.zeros_like(ids))
        for i in session.get_inputs()
    }
    tokens = session.run(None, feeds)[0]
    pooled = (tokens * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def _digits_test_split() -> tuple[np.ndarray, np.ndarray]:
    """The test split every digits tool uses (75/25, stratified, seed 0); float32 pixels 0-16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    _, x_test, _, y_test = train_test_split(
        digits.data.astype(np.float32), digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    return x_test, y_test


def _vote(console: Any, client: Any, x: np.ndarray, y: np.ndarray, result: PipelinesDemoResult) -> None:
    from rich.table import Table

    out = _infer_batches(client, VOTE_PIPELINE, "input", x)
    for member in VOTE_MEMBERS:
        result.digits_accuracy[member] = float((out[f"p_{member}"].argmax(axis=1) == y).mean())
    result.digits_accuracy["vote"] = float((out["LABEL"].reshape(-1) == y).mean())
    table = Table(title=f"digits_vote ({len(y)} test digits)")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for name, accuracy in result.digits_accuracy.items():
        table.add_row(name if name != "vote" else "[bold]majority vote[/]", f"{accuracy:.4f}")
    console.print(table)


def _routed(
    console: Any, client: Any, server: Any, x: np.ndarray, y: np.ndarray, result: PipelinesDemoResult
) -> None:
    out = _infer_batches(client, ROUTED_PIPELINE, "input", x)
    result.routed_accuracy = float((out["probabilities"].argmax(axis=1) == y).mean())
    result.routed_counts = dict(Counter(r.decode() for r in out["ROUTE"].reshape(-1)))
    console.print(
        f"digits_routed: accuracy {result.routed_accuracy:.4f}; answered by "
        + ", ".join(f"{m} {n}" for m, n in sorted(result.routed_counts.items()))
        + " (rows with top probability < 0.9 escalated)",
        highlight=False,
    )
    server.unload_model(ROUTED_PRIMARY)
    try:
        started = time.perf_counter()
        out = _infer_batches(client, ROUTED_PIPELINE, "input", x)
        elapsed = time.perf_counter() - started
    finally:
        server.load_model(ROUTED_PRIMARY)
    result.fallback_accuracy = float((out["probabilities"].argmax(axis=1) == y).mean())
    result.fallback_counts = dict(Counter(r.decode() for r in out["ROUTE"].reshape(-1)))
    console.print(
        f"digits_routed with {ROUTED_PRIMARY} unloaded (forced failure): "
        f"accuracy {result.fallback_accuracy:.4f}; "
        "answered by "
        + ", ".join(f"{m} {n}" for m, n in sorted(result.fallback_counts.items()))
        + f" in {elapsed:.2f} s",
        highlight=False,
    )
