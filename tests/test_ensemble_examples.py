"""The example pipelines in ensembles/ on the real example models, through the embedded Triton server.

The digits classifiers are built by tritonforge.examples.build_digits (seconds); the MiniLM encoder comes
from the session's ``example_repo`` (`tritonforge build`, built once per session), and the text pipeline's
answers are compared with sentence-transformers running the same weights in this process.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from tritonforge.config import read_config
from tritonforge.ensemble import check_specs, compile_specs, load_spec
from tritonforge.examples.pipelines_demo import run_pipelines_demo

pytest.importorskip("sklearn")
ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "ensembles"


def load_tool(name: str):
    return importlib.import_module(f"tritonforge.examples.{name}")


@pytest.fixture(scope="module")
def digits_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("examples") / "model_repository"
    load_tool("build_digits").build(repo)
    compile_specs([SPECS / "digits_vote.yaml", SPECS / "digits_routed.yaml"], repo)
    return repo


def test_every_example_spec_parses_cleanly() -> None:
    files = sorted(SPECS.glob("*.yaml"))
    assert {f.stem for f in files} >= {"text_embedding", "digits_vote", "digits_routed"}
    for file in files:
        spec, issues = load_spec(file)
        assert issues == [] and spec is not None and spec.name == file.stem


def test_text_example_is_refused_with_a_named_fix_until_its_encoder_is_built(digits_repo: Path) -> None:
    _, issues = check_specs([SPECS / "text_embedding.yaml"], digits_repo)
    assert [(i.pipeline, i.step) for i in issues] == [("text_embedding", "encode")]
    assert "model 'minilm_encoder' is not in the repository" in issues[0].message
    assert "tritonforge build" in issues[0].fix


def test_digits_examples_compile_to_an_ensemble_and_a_routed_model(digits_repo: Path) -> None:
    vote = read_config(digits_repo / "digits_vote" / "config.pbtxt")
    assert vote.is_ensemble and vote.max_batch_size == 64
    # three ONNX members side by side and their vote: the compiler fuses them into one plain ONNX model
    # (one step, no Python-backend hop), whose outputs are the vote's and the members' probabilities
    (step,) = vote.ensemble_steps
    assert step.model_name == "digits_vote__vote_fused" and step.model_version == 1
    assert step.output_map == {
        "LABEL": "LABEL",
        "PROBABILITIES": "VOTES",
        "PROBS_0": "p_logreg",
        "PROBS_1": "p_mlp",
        "PROBS_2": "p_random_forest",
    }
    fused = read_config(digits_repo / "digits_vote__vote_fused" / "config.pbtxt")
    assert fused.platform == "onnxruntime_onnx" and fused.max_batch_size == 64
    assert (digits_repo / "digits_vote" / "1" / "manifest.json").is_file()
    routed = read_config(digits_repo / "digits_routed" / "config.pbtxt")
    assert routed.backend == "python" and [t.name for t in routed.outputs] == ["probabilities", "ROUTE"]


def test_digits_vote_unfused_hands_the_members_probabilities_out_through_the_combiner(
    digits_repo: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(digits_repo, repo)
    compile_specs([SPECS / "digits_vote.yaml"], repo, fuse=False)
    vote = read_config(repo / "digits_vote" / "config.pbtxt")
    # the members' probabilities are outputs *and* feed the vote: the combiner hands them out (ECHO_<k>),
    # so Triton's per-request pruning never drops a member the vote still needs, and no passthrough hop
    assert [s.model_name for s in vote.ensemble_steps] == [
        "digits_logreg",
        "digits_mlp",
        "digits_random_forest",
        "digits_vote_combiner",
    ]
    combiner = vote.ensemble_steps[3]
    assert {k: v for k, v in combiner.output_map.items() if k.startswith("ECHO_")} == {
        "ECHO_0": "p_logreg",
        "ECHO_1": "p_mlp",
        "ECHO_2": "p_random_forest",
    }


@pytest.mark.slow
def test_pipelines_demo_votes_routes_and_falls_back_on_the_real_digits_models(digits_repo: Path) -> None:
    out = io.StringIO()
    result = run_pipelines_demo(Console(file=out, width=140), digits_repo)
    report = out.getvalue()
    accuracy = result.digits_accuracy
    assert set(accuracy) == {"logreg", "mlp", "random_forest", "vote"}
    assert accuracy["vote"] >= min(accuracy["logreg"], accuracy["mlp"], accuracy["random_forest"])
    assert min(accuracy.values()) > 0.9
    # the condition routes as declared: confident rows stay with logreg, the others go to the random forest
    assert set(result.routed_counts) == {"digits_logreg", "digits_random_forest"}
    assert sum(result.routed_counts.values()) == 450 and result.routed_accuracy > 0.9
    # the primary unloaded (a real failure on the server): the fallback answers every row it would have
    assert "digits_logreg" not in result.fallback_counts and result.fallback_counts["digits_mlp"] > 0
    assert sum(result.fallback_counts.values()) == 450 and result.fallback_accuracy > 0.9
    assert "majority vote" in report and "unloaded (forced failure)" in report
    assert result.text_cosine_min is None  # no text pipeline in this repository


def test_every_digits_pipeline_answers_every_non_empty_subset_of_its_outputs(digits_repo: Path) -> None:
    import itertools

    import numpy as np
    import tritonclient.grpc as grpcclient
    from sklearn.datasets import load_digits

    from conftest import triton_infer
    from tritonforge.server import EmbeddedServer

    x = load_digits().data[:5].astype(np.float32)
    failures: dict[tuple[str, ...], str] = {}
    with EmbeddedServer(digits_repo) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for pipeline in ("digits_vote", "digits_routed"):
                names = [t.name for t in read_config(digits_repo / pipeline / "config.pbtxt").outputs]
                full = triton_infer(client, pipeline, {"input": x})
                assert sorted(full) == sorted(names)
                for size in range(1, len(names) + 1):
                    for subset in itertools.combinations(names, size):
                        asked = [grpcclient.InferRequestedOutput(n) for n in subset]
                        try:
                            got = triton_infer(client, pipeline, {"input": x}, outputs=asked)
                        except Exception as exc:  # collect every failing subset, not only the first
                            failures[(pipeline, *subset)] = str(exc)
                            continue
                        assert sorted(got) == sorted(subset), (pipeline, subset)
                        for name in subset:
                            np.testing.assert_array_equal(got[name], full[name])
        finally:
            client.close()
    assert failures == {}


def test_compile_into_a_copy_leaves_no_staging_folders(digits_repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(digits_repo, copy)
    compile_specs([SPECS / "digits_vote.yaml"], copy)  # again: replaces the generated models in place
    assert sorted(p.name for p in copy.iterdir() if p.name.startswith(".")) == []
    assert read_config(copy / "digits_vote" / "config.pbtxt") == read_config(
        digits_repo / "digits_vote" / "config.pbtxt"
    )


@pytest.fixture(scope="module")
def text_repo(example_repo: Path) -> Path:
    """The session's example repository: the real MiniLM (FP32 v1, INT8 v2) and text_embedding compiled
    by `tritonforge build` (read-only here; built once for the whole session, not once more per module)."""
    assert (example_repo / "text_embedding" / "config.pbtxt").is_file()
    return example_repo


@pytest.mark.slow
def test_text_embedding_through_triton_matches_sentence_transformers_in_process(text_repo: Path) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from sentence_transformers import SentenceTransformer

    from conftest import triton_infer
    from tritonforge.server import EmbeddedServer

    minilm = load_tool("minilm")
    sentences = minilm.sentences(24, seed=4)  # includes odd and long (> 128 tokens) ones
    reference = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    reference.max_seq_length = 256
    expected = reference.encode(sentences, normalize_embeddings=True, convert_to_numpy=True)
    batch = np.array([[s.encode()] for s in sentences], dtype=np.object_)
    # only the pipeline (Triton loads the models it runs): the example repository holds many more
    with EmbeddedServer(text_repo, model_control="explicit", load_models=["text_embedding"]) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            got = triton_infer(client, "text_embedding", {"TEXT": batch})["EMBEDDING"]
            single = triton_infer(client, "text_embedding", {"TEXT": batch[:1]})["EMBEDDING"]
            asked = [grpcclient.InferRequestedOutput("EMBEDDING")]  # its one output, requested alone
            alone = triton_infer(client, "text_embedding", {"TEXT": batch[:2]}, outputs=asked)["EMBEDDING"]
        finally:
            client.close()
    assert got.shape == (24, 384)
    cosine = (got * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.999, cosine
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(single[0], got[0], atol=1e-4)  # padding to a longer neighbour changes nothing
    assert alone.shape == (2, 384)


@pytest.mark.slow
def test_text_embedding_fused_answers_as_the_chain_of_tokenizer_encoder_and_pooling(text_repo: Path) -> None:
    """The build fuses MiniLM and its mean pooling into one ONNX model (tritonforge.ensemble.fuse); the
    pipeline must answer as a client calling the original three models one by one, on the real server."""
    import json

    import numpy as np
    import tritonclient.grpc as grpcclient

    from conftest import triton_infer
    from tritonforge.config import read_config
    from tritonforge.server import EmbeddedServer

    fused, text = "minilm_encoder_v1__mean_pool_384", "text_embedding__tokenize_encode"
    steps = read_config(text_repo / "text_embedding" / "config.pbtxt").ensemble_steps or ()
    assert [s.model_name for s in steps] == [text]  # the tokenizer runs the fused graph itself
    assert read_config(text_repo / fused / "config.pbtxt").platform == "onnxruntime_onnx"
    record = json.loads((text_repo / fused / "1" / "manifest.json").read_text())["fused"]
    assert [m["model"] for m in record["from"]] == ["minilm_encoder", "mean_pool_384"]
    assert (text_repo / text / "1" / "model.onnx").read_bytes() == (
        text_repo / fused / "1" / "model.onnx"
    ).read_bytes()
    sentences = load_tool("minilm").sentences(6, seed=11)
    models = ["text_embedding", "minilm_tokenizer", "minilm_encoder", "mean_pool_384"]
    with EmbeddedServer(text_repo, model_control="explicit", load_models=models) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            for batch in ([sentences[0]], sentences):  # one sentence, and several padded to the longest
                text = np.array([[s.encode()] for s in batch], dtype=np.object_)
                got = triton_infer(client, "text_embedding", {"TEXT": text})["EMBEDDING"]
                tokens = triton_infer(client, "minilm_tokenizer", {"TEXT": text})
                hidden = triton_infer(client, "minilm_encoder", tokens, model_version="1")
                chain = triton_infer(
                    client,
                    "mean_pool_384",
                    {
                        "TOKEN_EMBEDDINGS": hidden["last_hidden_state"],
                        "ATTENTION_MASK": tokens["attention_mask"],
                    },
                )["EMBEDDING"]
                assert got.shape == chain.shape == (len(batch), 384)
                np.testing.assert_allclose(got, chain, atol=1e-5)
        finally:
            client.close()
