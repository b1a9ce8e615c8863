"""Compile-time fusion of an ONNX encoder and the mean pooling after it (tritonforge.ensemble.fuse).

The tiny Gather "encoder" of test_ensemble stands in for MiniLM (the real one is covered in
test_ensemble_examples): the fused pipeline must answer exactly as the chain of its original models,
through the real server, and fusion must step aside whenever it could change an answer or a user's model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient

from conftest import triton_infer
from test_ensemble import GOOD_SPECS, build_models, tiny_encoder_onnx, write_specs
from tritonforge.config import read_config
from tritonforge.ensemble import check_specs, compile_specs
from tritonforge.ensemble.blocks import GENERATED_MARK
from tritonforge.ensemble.fuse import fuse_pipeline
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

FUSED = "tiny_encoder_v1__tiny_pool"
TEXT_SPEC = {"text_tiny.yaml": GOOD_SPECS["text_tiny.yaml"]}


@pytest.fixture(scope="module")
def models_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_models(tmp_path_factory.mktemp("fuse_models"))


@pytest.fixture()
def repo(models_repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(models_repo, copy)
    return copy


def steps_of(repo: Path, pipeline: str) -> list[str]:
    return [s.model_name for s in read_config(repo / pipeline / "config.pbtxt").ensemble_steps or ()]


def test_compile_fuses_the_encoder_and_its_mean_pooling_into_one_plain_onnx_model(
    repo: Path, tmp_path: Path
) -> None:
    compile_specs([write_specs(tmp_path / "specs", TEXT_SPEC)], repo)
    assert steps_of(repo, "text_tiny") == ["tiny_tokenizer", FUSED]
    config = read_config(repo / FUSED / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx"  # NVIDIA's C++ onnxruntime backend serves it as is
    assert [(t.name, t.dims) for t in config.inputs] == [("input_ids", (-1,)), ("attention_mask", (-1,))]
    assert [(t.name, t.dims) for t in config.outputs] == [("EMBEDDING", (4,))]
    assert config.parameters[GENERATED_MARK] == "fused:tiny_encoder:1+tiny_pool"
    model = onnx.load(str(repo / FUSED / "1" / "model.onnx"))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # no custom operators
    fused = json.loads((repo / FUSED / "1" / "manifest.json").read_text())["fused"]
    source = repo / "tiny_encoder" / "1" / "model.onnx"
    assert fused["from"][0] == {
        "model": "tiny_encoder",
        "version": 1,
        "sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    }
    assert fused["from"][1]["block"] == "mean_pooling" and fused["max_abs_diff_vs_unfused"] <= 1e-6
    # the models a client calls one by one stay in the repository
    assert (repo / "tiny_pool" / "config.pbtxt").is_file() and (repo / "tiny_encoder" / "1").is_dir()


def test_compile_without_fuse_keeps_the_three_steps_as_written(repo: Path, tmp_path: Path) -> None:
    compile_specs([write_specs(tmp_path / "specs", TEXT_SPEC)], repo, fuse=False)
    assert steps_of(repo, "text_tiny") == ["tiny_pool", "tiny_tokenizer", "tiny_encoder"]
    assert not (repo / FUSED).exists()


def test_fusion_steps_aside_when_the_token_embeddings_are_also_a_pipeline_output(
    repo: Path, tmp_path: Path
) -> None:
    spec = GOOD_SPECS["text_tiny.yaml"].replace("outputs: [EMBEDDING]\n", "outputs: [EMBEDDING, tokens]\n", 1)
    resolved, issues = check_specs([write_specs(tmp_path / "specs", {"t.yaml": spec})], repo)
    assert issues == []
    unchanged, fused = fuse_pipeline(resolved[0], repo, tmp_path / "scratch")
    assert fused == [] and unchanged is resolved[0]


def test_fusion_never_overwrites_a_model_of_the_fused_name_that_a_user_added(
    repo: Path, tmp_path: Path
) -> None:
    add_model(repo, FUSED, tiny_encoder_onnx(tmp_path / "mine.onnx"), max_batch_size=4)
    before = (repo / FUSED / "config.pbtxt").read_text()
    compile_specs([write_specs(tmp_path / "specs", TEXT_SPEC)], repo)
    assert (repo / FUSED / "config.pbtxt").read_text() == before
    assert steps_of(repo, "text_tiny") == ["tiny_pool", "tiny_tokenizer", "tiny_encoder"]


@pytest.fixture(scope="module")
def served(models_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    compile_specs([write_specs(tmp_path_factory.mktemp("fuse_specs"), TEXT_SPEC)], models_repo)
    assert steps_of(models_repo, "text_tiny") == ["tiny_tokenizer", FUSED]
    with EmbeddedServer(models_repo) as server:
        yield server


@pytest.mark.slow
def test_fused_pipeline_answers_as_the_chain_of_its_original_three_models(served: EmbeddedServer) -> None:
    client = grpcclient.InferenceServerClient(served.grpc_url)
    try:
        for sentences in (["hi"], ["a cat sat on the mat", "Triton serves many models at once, fast.", "x"]):
            text = np.array([[s.encode()] for s in sentences], dtype=np.object_)
            got = triton_infer(client, "text_tiny", {"TEXT": text})["EMBEDDING"]
            tokens = triton_infer(client, "tiny_tokenizer", {"TEXT": text})
            hidden = triton_infer(client, "tiny_encoder", tokens)["last_hidden_state"]
            chain = triton_infer(
                client,
                "tiny_pool",
                {"TOKEN_EMBEDDINGS": hidden, "ATTENTION_MASK": tokens["attention_mask"]},
            )["EMBEDDING"]
            assert got.shape == chain.shape == (len(sentences), 4)
            np.testing.assert_allclose(got, chain, atol=1e-6)
    finally:
        client.close()


def test_cli_compile_no_fuse_writes_the_steps_as_declared(repo: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tritonforge.cli import app

    specs = write_specs(tmp_path / "specs", TEXT_SPEC)
    result = CliRunner().invoke(app, ["ensemble", "compile", str(specs), "--repo", str(repo), "--no-fuse"])
    assert result.exit_code == 0, result.output
    assert steps_of(repo, "text_tiny") == ["tiny_pool", "tiny_tokenizer", "tiny_encoder"]
    result = CliRunner().invoke(app, ["ensemble", "compile", str(specs), "--repo", str(repo)])
    assert result.exit_code == 0, result.output
    assert steps_of(repo, "text_tiny") == ["tiny_tokenizer", FUSED]
    assert f"wrote {repo / FUSED}" in result.output.replace("\n", "")
