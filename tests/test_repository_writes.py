"""The one repository writer under stress: staged outside the repository, whole builds at once, models that
never vanish during a replace, writers killed at random moments, and a property test over sequences."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny_models
from tritonforge.config import read_config
from tritonforge.errors import RepositoryError, TritonForgeError
from tritonforge.repository import RepositoryWrite, add_model, check_repository, sample_inputs
from tritonforge.repository.writer import STAGING_ENV, STAGING_PREFIX, staging_leftovers
from tritonforge.server import EmbeddedServer


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.mlp_onnx(tmp_path_factory.mktemp("src") / "mlp.onnx")


def errors_of(repo: Path) -> list[str]:
    return [str(p) for p in check_repository(repo) if p.severity == "error"]


def test_add_model_stages_beside_the_repository_never_inside_it(tmp_path, mlp_file, monkeypatch):
    repo = tmp_path / "repo"
    add_model(repo, "mlp", mlp_file)
    seen: list[tuple[list[str], list[str]]] = []
    import shutil

    real_copy = shutil.copy2

    def spy(source, destination, **kwargs):
        seen.append(
            (
                sorted(p.name for p in repo.iterdir() if p.name != "audit.jsonl"),  # the add-model record
                sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)),
            )
        )
        return real_copy(source, destination, **kwargs)

    monkeypatch.setattr(shutil, "copy2", spy)
    add_model(repo, "mlp", mlp_file)
    assert seen and all(inside == ["mlp"] for inside, _ in seen)
    assert all(len(beside) == 1 and beside[0].startswith(f"{STAGING_PREFIX}repo-") for _, beside in seen)
    assert staging_leftovers(repo) == ([], [])


def test_repository_write_that_fails_part_way_writes_nothing(tmp_path, mlp_file):
    repo = tmp_path / "repo"
    add_model(repo, "kept", mlp_file)
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    with pytest.raises(RepositoryError, match="does not exist"), RepositoryWrite(repo) as write:
        write.add_model("first", mlp_file)
        write.add_model("kept", mlp_file, version=2)
        write.add_model("second", tmp_path / "missing.onnx")
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before
    assert staging_leftovers(repo) == ([], [])


def test_repository_write_moves_every_model_in_when_all_stage(tmp_path, mlp_file):
    repo = tmp_path / "repo"
    with RepositoryWrite(repo) as write:
        write.add_model("a", mlp_file)
        write.add_model("b", mlp_file, version=3)
    assert sorted(p.name for p in repo.iterdir()) == ["a", "b"]
    assert (repo / "b" / "3" / "model.onnx").is_file() and (repo / "b" / "3" / "manifest.json").is_file()


def test_an_ensemble_is_written_by_add_model_with_a_manifest(tmp_path, mlp_file):
    from tritonforge.config import EnsembleStep, ModelConfig

    repo = tmp_path / "repo"
    add_model(repo, "mlp", mlp_file)
    member = read_config(repo / "mlp" / "config.pbtxt")
    ensemble = ModelConfig(
        name="wrapped",
        platform="ensemble",
        max_batch_size=member.max_batch_size,
        inputs=member.inputs,
        outputs=member.outputs,
        ensemble_steps=[EnsembleStep(model_name="mlp", input_map={"x": "x"}, output_map={"probs": "probs"})],
    )
    version = add_model(repo, "wrapped", None, ensemble, 1, manifest={"pipeline": "wrapped"})
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["model"] == "wrapped" and manifest["pipeline"] == "wrapped" and manifest["source"] is None
    assert errors_of(repo) == []
    with pytest.raises(RepositoryError, match="ensemble: it has no model file"):
        add_model(repo, "wrapped", mlp_file, ensemble, 2)


def test_overwriting_a_version_never_leaves_a_moment_without_it(tmp_path, mlp_file):
    repo = tmp_path / "repo"
    add_model(repo, "mlp", mlp_file)
    model = repo / "mlp" / "1" / "model.onnx"
    stop = threading.Event()
    misses: list[int] = []

    def watch() -> None:
        while not stop.is_set():
            if not model.exists():
                misses.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(40):
            add_model(repo, "mlp", mlp_file, version=1, overwrite=True)
    finally:
        stop.set()
        watcher.join()
    assert misses == []
    assert errors_of(repo) == [] and staging_leftovers(repo) == ([], [])


def test_staging_inside_the_repository_is_refused_with_the_fix(tmp_path, mlp_file, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setenv(STAGING_ENV, str(repo / "stage"))
    (repo / "stage").mkdir()
    with pytest.raises(RepositoryError, match=rf"inside the repository.*{STAGING_ENV}"):
        add_model(repo, "mlp", mlp_file)
    monkeypatch.setenv(STAGING_ENV, str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    add_model(repo, "mlp", mlp_file)
    assert sorted(p.name for p in repo.iterdir()) == ["audit.jsonl", "mlp", "stage"]


def test_validate_flags_leftovers_inside_as_errors_and_beside_as_warnings(tmp_path, mlp_file):
    repo = tmp_path / "repo"
    add_model(repo, "mlp", mlp_file)
    (repo / f"{STAGING_PREFIX}abc" / "1").mkdir(parents=True)  # what older versions left when killed
    (tmp_path / f"{STAGING_PREFIX}repo-xyz" / "mlp").mkdir(parents=True)
    found = {(p.model, p.severity): p.message for p in check_repository(repo)}
    assert "Triton tries to load it" in found[(f"{STAGING_PREFIX}abc", "error")]
    assert "Triton never looks there" in found[(f"{STAGING_PREFIX}repo-xyz", "warning")]


WRITER = """
import itertools, sys
from tritonforge.repository import RepositoryWrite
repo, model, weights = sys.argv[1:4]
print("ready", flush=True)
for i in itertools.count():
    with RepositoryWrite(repo) as write:
        write.add_model("a", model, version=1 + i % 2, overwrite=True, extra_files=[weights])
        write.add_model(f"new_{i % 5}", model, version=1, overwrite=True, extra_files=[weights])
        write.add_model("b", model, version=1 + i % 3, overwrite=True)
"""


@pytest.mark.slow
def test_a_server_starts_and_serves_after_writers_killed_at_random_moments(tmp_path, mlp_file):
    repo = tmp_path / "repo"
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(8 << 20))  # makes each write long enough to be cut in the middle
    add_model(repo, "a", mlp_file)
    for seed in range(6):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(repo), str(mlp_file), str(weights)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
            time.sleep(random.Random(seed).uniform(0.0, 1.5))
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait(timeout=30)
            writer.stdout.close()  # type: ignore[union-attr]
        assert errors_of(repo) == [], f"after kill {seed}"
        assert not [p for p in repo.iterdir() if p.name.startswith(".")]
    beside, inside = staging_leftovers(repo)
    assert inside == []
    assert beside, "no kill landed in the middle of a write: the test did not test anything"
    with EmbeddedServer(repo) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            models = sorted(p.name for p in repo.iterdir() if p.is_dir())
            for name in models:
                assert client.is_model_ready(name), name
                config = read_config(repo / name / "config.pbtxt")
                arrays = sample_inputs(config)
                inputs = []
                for tensor in config.inputs:
                    item = grpcclient.InferInput(tensor.name, list(arrays[tensor.name].shape), "FP32")
                    item.set_data_from_numpy(arrays[tensor.name])
                    inputs.append(item)
                probs = client.infer(name, inputs).as_numpy("probs")
                assert probs.shape == (1, 3) and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        finally:
            client.close()
    assert {leftover.parent for leftover in beside} == {tmp_path}  # beside the repository, never in it
    problems = check_repository(repo)
    assert {p.severity for p in problems} == {"warning"}  # validate reports the leftovers, harmless


NAMES = st.sampled_from(["a", "b", "", ".hidden", "x/y", " pad"])


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[list[tuple[str, int | None, bool]], bool]]:
    ops = []
    for _ in range(draw(st.integers(1, 4))):
        models = draw(
            st.lists(
                st.tuples(NAMES, st.one_of(st.none(), st.integers(-1, 3)), st.booleans()),
                min_size=1,
                max_size=3,
            )
        )
        ops.append((models, draw(st.booleans())))
    return ops


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations())
def test_any_sequence_of_writes_leaves_a_whole_repository_or_changes_nothing(mlp_file, ops):
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        expected: dict[str, set[int]] = {}
        for models, fail_after_staging in ops:
            planned = {name: set(found) for name, found in expected.items()}
            try:
                with RepositoryWrite(repo) as write:
                    for name, version, overwrite in models:
                        path = write.add_model(name, mlp_file, version=version, overwrite=overwrite)
                        planned.setdefault(name, set()).add(int(path.name))
                    if fail_after_staging:
                        raise KeyboardInterrupt
            except (TritonForgeError, ValueError, TypeError, KeyboardInterrupt):
                pass  # our own error (or the interruption): nothing of this write may have landed
            else:
                expected = planned
            actual = {
                p.name: {int(v.name) for v in p.iterdir() if v.is_dir()}
                for p in (repo.iterdir() if repo.is_dir() else [])
            }
            assert actual == expected
            assert staging_leftovers(repo) == ([], [])
            if expected:
                assert errors_of(repo) == []


@pytest.mark.slow
def test_a_staging_folder_inside_a_repository_stops_triton_which_is_why_validate_calls_it_an_error(
    tmp_path, mlp_file
):
    from tritonforge.errors import ServerError

    repo = tmp_path / "repo"
    add_model(repo, "mlp", mlp_file)
    (repo / f"{STAGING_PREFIX}left" / "1").mkdir(parents=True)  # what a killed older writer left
    assert [p.model for p in check_repository(repo) if p.severity == "error"] == [f"{STAGING_PREFIX}left"]
    with pytest.raises(ServerError), EmbeddedServer(repo, startup_timeout_s=60):
        pass


def test_amend_version_rewrites_manifest_and_config_together_keeping_the_model_file(tmp_path, mlp_file):
    from tritonforge.repository import amend_version, with_layout

    repo = tmp_path / "repo"
    version = add_model(repo, "mlp", mlp_file, max_batch_size=8, manifest={"metrics": {"accuracy": 0.9}})
    model_bytes = (version / "model.onnx").read_bytes()
    before = json.loads((version / "manifest.json").read_text())
    tuned = with_layout(read_config(repo / "mlp"), 2, 1)
    amend_version(repo, "mlp", 1, config=tuned, manifest={"layout": {"instances": 2, "intra_op_threads": 1}})
    after = json.loads((version / "manifest.json").read_text())
    assert after == {**before, "layout": {"instances": 2, "intra_op_threads": 1}}
    assert (version / "model.onnx").read_bytes() == model_bytes
    assert read_config(repo / "mlp") == tuned
    assert not staging_leftovers(repo)[0] and not staging_leftovers(repo)[1]


def test_amend_version_raises_repository_error_naming_the_versions_there(tmp_path, mlp_file):
    from tritonforge.repository import amend_version

    add_model(tmp_path / "repo", "mlp", mlp_file, max_batch_size=8)
    with pytest.raises(RepositoryError, match=r"no version 3 .*\(versions: 1\)"):
        amend_version(tmp_path / "repo", "mlp", 3, manifest={"x": 1})
