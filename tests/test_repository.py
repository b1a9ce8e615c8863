"""The repository writer (atomic add_model, manifests) and the offline / live checkers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import tiny_models
from tritonforge.config import DataType, ModelConfig, TensorSpec, read_config
from tritonforge.errors import ConfigError, RepositoryError, SignatureError
from tritonforge.repository import add_model, check_repository, file_sha256
from tritonforge.server.live import check_live


@pytest.fixture()
def mlp_file(tmp_path: Path) -> Path:
    return tiny_models.mlp_onnx(tmp_path / "src" / "mlp.onnx")


def test_add_model_infers_the_config_from_an_onnx_file(tmp_path, mlp_file):
    path = add_model(
        tmp_path / "repo", "mlp", mlp_file, max_batch_size=16, max_queue_delay_us=500, instances=2
    )
    assert path == tmp_path / "repo" / "mlp" / "1"
    config = read_config(tmp_path / "repo" / "mlp" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert [(t.name, t.dtype, t.dims) for t in config.inputs] == [("x", DataType.FP32, (8,))]
    assert [(t.name, t.dtype, t.dims) for t in config.outputs] == [("probs", DataType.FP32, (3,))]
    assert config.dynamic_batching is not None and config.dynamic_batching.max_queue_delay_us == 500
    assert config.instance_groups[0].count == 2


def test_add_model_picks_the_next_version_and_writes_a_manifest(tmp_path, mlp_file):
    add_model(tmp_path / "repo", "mlp", mlp_file)
    second = add_model(tmp_path / "repo", "mlp", mlp_file, manifest={"note": "retrained"})
    assert second.name == "2"
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["version"] == 2
    assert manifest["source"]["sha256"] == file_sha256(mlp_file)
    assert manifest["signature"]["inputs"] == [{"name": "x", "dtype": "FP32", "dims": [8]}]
    assert manifest["note"] == "retrained"


def test_add_model_raises_repository_error_when_the_file_is_missing(tmp_path):
    with pytest.raises(RepositoryError, match="does not exist"):
        add_model(tmp_path / "repo", "mlp", tmp_path / "nope.onnx")


def test_add_model_raises_repository_error_when_the_version_exists(tmp_path, mlp_file):
    add_model(tmp_path / "repo", "mlp", mlp_file)
    with pytest.raises(RepositoryError, match=r"already has version 1.*next one \(2\)"):
        add_model(tmp_path / "repo", "mlp", mlp_file, version=1)


def test_add_model_raises_config_error_when_the_config_names_another_model(tmp_path, mlp_file):
    config = ModelConfig(
        name="other",
        platform="onnxruntime_onnx",
        max_batch_size=8,
        inputs=(TensorSpec(name="x", dtype=DataType.FP32, dims=(8,)),),
        outputs=(TensorSpec(name="probs", dtype=DataType.FP32, dims=(3,)),),
    )
    with pytest.raises(ConfigError, match="'other', not 'mlp'"):
        add_model(tmp_path / "repo", "mlp", mlp_file, config)
    assert not (tmp_path / "repo" / "mlp").exists()


def test_add_model_raises_signature_error_for_torchscript_without_a_config(tmp_path):
    file = tmp_path / "model.pt"
    file.write_bytes(b"not read")
    with pytest.raises(SignatureError, match="only ONNX files describe their own inputs"):
        add_model(tmp_path / "repo", "ts", file)


def test_interrupted_add_model_leaves_the_previous_version_servable(tmp_path, mlp_file, monkeypatch):
    repo = tmp_path / "repo"
    add_model(repo, "mlp", mlp_file)
    before = (repo / "mlp" / "config.pbtxt").read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the user hit Ctrl-C halfway through the copy

    monkeypatch.setattr(shutil, "copy2", crash)
    with pytest.raises(KeyboardInterrupt):
        add_model(repo, "mlp", mlp_file)
    assert sorted(p.name for p in repo.iterdir()) == ["audit.jsonl", "mlp"]  # no staging folder left behind
    assert sorted(p.name for p in (repo / "mlp").iterdir()) == ["1", "config.pbtxt"]
    assert (repo / "mlp" / "config.pbtxt").read_text() == before
    assert check_repository(repo) == []


def test_check_repository_names_every_problem_at_once(tmp_path, mlp_file):
    repo = tmp_path / "repo"
    add_model(repo, "good", mlp_file)
    add_model(repo, "no_file", mlp_file)
    (repo / "no_file" / "1" / "model.onnx").unlink()
    add_model(repo, "renamed", mlp_file)
    text = (repo / "renamed" / "config.pbtxt").read_text().replace('name: "renamed"', 'name: "elsewhere"')
    (repo / "renamed" / "config.pbtxt").write_text(text)
    add_model(repo, "mismatch", mlp_file)
    text = (repo / "mismatch" / "config.pbtxt").read_text().replace('name: "x"', 'name: "pixels"')
    (repo / "mismatch" / "config.pbtxt").write_text(text)
    (repo / "no_config" / "1").mkdir(parents=True)

    problems: dict[tuple[str, str], str] = {}
    for p in check_repository(repo):
        problems[(p.model, p.severity)] = problems.get((p.model, p.severity), "") + p.message + "\n"
    assert "good" not in {model for model, _ in problems}
    assert "missing model file model.onnx" in problems[("no_file", "error")]
    assert "rename it to 'renamed'" in problems[("renamed", "error")]
    assert "'pixels'" in problems[("mismatch", "error")] and "'x'" in problems[("mismatch", "error")]
    assert "no config.pbtxt" in problems[("no_config", "error")]


def test_check_live_loads_each_model_and_reports_the_one_that_fails(tmp_path, mlp_file):
    repo = tmp_path / "repo"
    add_model(repo, "good", mlp_file)
    add_model(repo, "fixed", tiny_models.fixed_onnx(tmp_path / "src" / "fixed.onnx"))
    broken = add_model(repo, "broken", mlp_file)
    (broken / "model.onnx").write_bytes(b"garbage")
    results = {r.model: r for r in check_live(repo)}
    assert results["good"].ok and results["good"].outputs == {"probs": (1, 3)}
    assert results["fixed"].ok and results["fixed"].outputs == {"b": (3, 2)}
    assert not results["broken"].loaded
    assert "broken" in (results["broken"].error or "")
