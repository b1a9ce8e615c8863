"""The registry: manifests, models listing, promote / rollback through the version policy, audit log."""

from __future__ import annotations

import json

import pytest

import tiny_models
from tritonforge.config import read_config
from tritonforge.errors import RepositoryError
from tritonforge.registry import audit_log, list_models, promote, read_manifest, register, rollback
from tritonforge.verify import Artifact, compare


def _artifact(path, stage="export"):
    import numpy as np

    report = compare(np.ones((4, 3)), np.ones((4, 3)))
    return Artifact(path, stage, {"format": "onnx", "opset": 17}, {"probs": report})


@pytest.fixture()
def repo(tmp_path):
    root = tmp_path / "repo"
    for _ in range(3):
        register(
            root,
            "clf",
            _artifact(tiny_models.mlp_onnx(tmp_path / "mlp.onnx")),
            source=tmp_path / "mlp.onnx",
            max_batch_size=8,
        )
    return root


def test_register_writes_the_full_manifest(repo, tmp_path):
    manifest = read_manifest(repo, "clf", 1)
    for key in (
        "source",
        "export",
        "verification",
        "libraries",
        "signature",
        "created_at",
        "built_by",
        "artifact",
    ):
        assert key in manifest, key
    assert manifest["source"]["path"] == str((tmp_path / "mlp.onnx").resolve())
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["verification"]["passed"] is True
    assert "onnxruntime" in manifest["libraries"]


def test_promote_sets_the_version_policy_and_appends_to_the_audit_log(repo):
    event = promote(repo, "clf", 2, reason="canary was fine")
    assert read_config(repo / "clf").version_policy.versions == (2,)
    assert event["from"] == [3] and event["to"] == [2]
    [logged] = [e for e in audit_log(repo) if e["action"] != "add-model"]
    assert logged["action"] == "promote" and logged["reason"] == "canary was fine"
    assert [r.version for r in list_models(repo) if r.served] == [2]


def test_rollback_returns_to_the_version_served_before(repo):
    promote(repo, "clf", 3)
    promote(repo, "clf", 1)
    event = rollback(repo, "clf")
    assert event["to"] == [3]
    assert [e["action"] for e in audit_log(repo) if e["action"] != "add-model"] == [
        "promote",
        "promote",
        "rollback",
    ]
    assert rollback(repo, "clf", to=2)["to"] == [2]


def test_rollback_walks_the_promotes_back_to_exactly_the_versions_served_before(repo):
    from tritonforge.config import VersionPolicy, write_config

    write_config(read_config(repo / "clf").replace(version_policy=VersionPolicy.specific(1, 2)), repo / "clf")
    promote(repo, "clf", 3)  # from [1, 2]
    promote(repo, "clf", 3)  # changes nothing: not a step to walk back
    promote(repo, "clf", 1)  # from [3]
    assert rollback(repo, "clf")["to"] == [3]
    assert rollback(repo, "clf")["to"] == [1, 2]
    assert read_config(repo / "clf").version_policy.versions == (1, 2)


def test_register_appends_an_add_model_event_with_the_artifact_to_the_audit_log(repo):
    events = audit_log(repo)
    assert [(e["action"], e["model"], e["version"]) for e in events] == [
        ("add-model", "clf", v) for v in (1, 2, 3)
    ]
    assert all(len(e["sha256"]) == 64 and e["passed"] and e["by"] and e["at"] for e in events)


def test_rollback_without_history_serves_the_next_lower_version(repo):
    assert rollback(repo, "clf")["to"] == [2]


def test_rollback_raises_repository_error_when_nothing_is_earlier(repo):
    promote(repo, "clf", 1)
    (repo / "audit.jsonl").unlink()
    with pytest.raises(RepositoryError, match="no earlier version"):
        rollback(repo, "clf")


def test_promote_raises_repository_error_for_an_unknown_model(repo):
    with pytest.raises(RepositoryError, match=r"no model 'nope'.*it has: clf"):
        promote(repo, "nope", 1)


def test_promote_raises_repository_error_for_an_unknown_version(repo):
    with pytest.raises(RepositoryError, match="no version 9; it has 1, 2, 3"):
        promote(repo, "clf", 9)
    assert [e["action"] for e in audit_log(repo)] == ["add-model"] * 3


def test_a_promoted_model_keeps_its_served_version_when_a_version_is_added(repo, tmp_path):
    promote(repo, "clf", 2)
    register(repo, "clf", _artifact(tmp_path / "mlp.onnx"), max_batch_size=8)
    assert [r.version for r in list_models(repo) if r.served] == [2]
    assert len(list_models(repo)) == 4


def test_register_raises_repository_error_for_a_missing_model_file(tmp_path):
    with pytest.raises(RepositoryError, match="does not exist"):
        register(tmp_path / "repo", "clf", _artifact(tmp_path / "missing.onnx"))


def test_models_promote_rollback_cli(repo):
    from typer.testing import CliRunner

    from tritonforge.cli import app

    runner = CliRunner()
    listed = runner.invoke(app, ["models", str(repo)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "clf" in listed.output and "3 versions" in listed.output
    promoted = runner.invoke(app, ["promote", str(repo), "clf", "1", "--reason", "test"])
    assert promoted.exit_code == 0, promoted.output
    assert "[3] -> [1]" in promoted.output
    unknown = runner.invoke(app, ["promote", str(repo), "clf", "7"])
    assert unknown.exit_code == 1
    rolled = runner.invoke(app, ["rollback", str(repo), "clf"])
    assert rolled.exit_code == 0 and "[1] -> [3]" in rolled.output
    assert json.loads((repo / "audit.jsonl").read_text().splitlines()[-1])["action"] == "rollback"


def _pinning_ensemble(repo, version):
    from tritonforge.config import DataType, EnsembleStep, ModelConfig, TensorSpec, write_config

    config = ModelConfig(
        name="pipe",
        platform="ensemble",
        max_batch_size=8,
        inputs=(TensorSpec(name="x", dtype=DataType.FP32, dims=(8,)),),
        outputs=(TensorSpec(name="probs", dtype=DataType.FP32, dims=(3,)),),
        ensemble_steps=(
            EnsembleStep(
                model_name="clf", model_version=version, input_map={"x": "x"}, output_map={"probs": "probs"}
            ),
        ),
    )
    (repo / "pipe" / "1").mkdir(parents=True)
    write_config(config, repo / "pipe")


def test_promote_raises_repository_error_when_an_ensemble_pins_another_version(repo):
    _pinning_ensemble(repo, 3)
    before = (repo / "clf" / "config.pbtxt").read_text()
    with pytest.raises(RepositoryError, match=r"'pipe' pins v3.*force"):
        promote(repo, "clf", 2)
    assert (repo / "clf" / "config.pbtxt").read_text() == before
    assert [e["action"] for e in audit_log(repo)] == ["add-model"] * 3
    promote(repo, "clf", 3)  # the pinned version itself is fine
    event = promote(repo, "clf", 2, force=True)
    assert event["to"] == [2]
