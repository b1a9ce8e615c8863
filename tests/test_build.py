"""The example repository's build scripts, end to end through the real embedded Triton server."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from conftest import triton_infer
from tritonforge.repository import check_repository
from tritonforge.server import EmbeddedServer
from tritonforge.server.live import check_live

pytest.importorskip("sklearn")


def load_tool(name: str):
    """An example builder (shipped in the package; tools/ holds thin entry points to them)."""
    return importlib.import_module(f"tritonforge.examples.{name}")


@pytest.fixture(scope="module")
def digits_tool():
    return load_tool("build_digits")


@pytest.fixture(scope="module")
def digits_repo(tmp_path_factory, digits_tool):
    repo = tmp_path_factory.mktemp("build") / "model_repository"
    steps = digits_tool.build(repo)
    assert [s.status for s in steps] == ["OK"] * 3, steps
    return repo


@pytest.fixture(scope="module")
def digits_server(digits_repo):
    with EmbeddedServer(digits_repo) as running:
        yield running


KINDS = ["logreg", "mlp", "random_forest"]


@pytest.mark.parametrize("kind", KINDS)
def test_digits_classifier_through_triton_matches_sklearn_exactly(
    digits_repo, digits_server, digits_tool, kind
):
    _, x_test, _, y_test = digits_tool.digits_split()
    estimator = digits_tool.estimators()[kind]
    x_train, _, y_train, _ = digits_tool.digits_split()
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        estimator.fit(x_train, y_train)
    client = grpcclient.InferenceServerClient(digits_server.grpc_url)
    try:
        labels, probs = [], []
        for i in range(0, len(x_test), 64):
            out = triton_infer(client, f"digits_{kind}", {"input": x_test[i : i + 64]})
            labels.append(out["label"].reshape(-1))
            probs.append(out["probabilities"])
    finally:
        client.close()
    labels_all = np.concatenate(labels)
    assert np.array_equal(labels_all, estimator.predict(x_test))
    manifest = json.loads((digits_repo / f"digits_{kind}" / "1" / "manifest.json").read_text())
    tolerance = manifest["verification"]["outputs"]["probabilities"]["tolerance"]["max_abs"]
    assert np.max(np.abs(np.concatenate(probs) - estimator.predict_proba(x_test))) <= tolerance
    assert manifest["metrics"]["test_accuracy"] == pytest.approx(float(np.mean(labels_all == y_test)))
    assert manifest["export"]["zipmap"] is False and manifest["source"]["sha256"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_digits_model_is_served_in_the_layout_measured_at_build_and_its_manifest_says_why(
    digits_repo, digits_server, kind
):
    from tritonforge.repository import available_cpus

    name = f"digits_{kind}"
    layout = json.loads((digits_repo / name / "1" / "manifest.json").read_text())["layout"]
    assert layout["cpus"] == available_cpus() and f"{available_cpus()} CPUs" in layout["why"]
    assert len(layout["measured_rows_per_s"]) >= min(2, available_cpus())
    assert all(min(rounds) > 0 for rounds in layout["measured_rows_per_s"].values())
    assert layout["instances"] * layout["intra_op_threads"] <= available_cpus()
    client = grpcclient.InferenceServerClient(digits_server.grpc_url)
    try:
        served = client.get_model_config(name).config
    finally:
        client.close()
    assert [g.count for g in served.instance_group] == [layout["instances"]]
    assert served.parameters["intra_op_thread_count"].string_value == str(layout["intra_op_threads"])
    assert served.parameters["session.intra_op.allow_spinning"].string_value == "0"


def test_built_repository_validates_offline_and_live(digits_repo, digits_server):
    assert [p for p in check_repository(digits_repo) if p.severity == "error"] == []
    results = check_live(digits_repo)
    assert all(r.ok for r in results), results


def test_rebuilding_an_unchanged_model_is_skipped_and_keeps_its_measured_layout(digits_repo, digits_tool):
    def records():
        return [(digits_repo / f"digits_{k}" / "1" / "manifest.json").read_text() for k in KINDS]

    before = records()
    steps = digits_tool.build(digits_repo)
    assert [(s.status, s.version) for s in steps] == [("SKIPPED", 1)] * 3
    assert records() == before  # not measured again


def test_an_interrupted_build_leaves_the_previous_repository_servable(
    tmp_path, digits_repo, digits_tool, monkeypatch
):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(digits_repo, repo)
    from tritonforge.repository import writer

    real_copy = writer._copy
    calls = {"n": 0}

    def dying_copy(source, destination):
        calls["n"] += 1
        if calls["n"] == 2:  # the second model dies half-way through its write
            raise KeyboardInterrupt
        real_copy(source, destination)

    monkeypatch.setattr(writer, "_copy", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        digits_tool.build(repo, force=True)
    monkeypatch.undo()
    assert [p for p in check_repository(repo) if p.severity == "error"] == []
    assert not list(repo.glob(".tritonforge-staging-*"))
    assert sorted(p.name for p in (repo / "digits_mlp").iterdir()) == ["1", "config.pbtxt"]
    assert all(r.ok for r in check_live(repo))


def test_build_cli_runs_the_tools_and_lists_the_models(tmp_path):
    import subprocess

    repo = tmp_path / "model_repository"
    done = subprocess.run(
        [sys.executable, "-m", "tritonforge", "build", "--repo", str(repo), "--only", "digits"],
        cwd=tmp_path,  # any folder: the builders ship in the package
        capture_output=True,
        text=True,
        timeout=600,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "digits_random_forest" in done.stdout and "3 models, 3 versions" in done.stdout
