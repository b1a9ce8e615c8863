"""Served with only what NVIDIA's image has: the Python backend's interpreter reduced to the image's Python,
the standard library, numpy and the repository's declared requirements (its ``requirements.txt`` files).

The stubs run in a clean venv (tests/reduced_python.py); our Python-based onnxruntime backend, a stand-in
for NVIDIA's C++ one, reaches onnxruntime through a path only it adds. A model importing a package nobody
declared fails to load here, as it would in the pod.
"""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from rich.console import Console
from tritonclient.utils import InferenceServerException

import tiny_models
from cli_runner import run_tritonforge
from conftest import triton_infer
from reduced_python import TARGET_VERSION, backend_site, reduced_python, target_interpreter
from tritonforge.config import DataType, ModelConfig, TensorSpec
from tritonforge.repository import add_model, python_requirements
from tritonforge.repository.requirements import DEFAULT_TARGET, REQUIREMENTS_FILE
from tritonforge.server import EmbeddedServer

pytestmark = pytest.mark.slow

PROBE = """
import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


NAMES = ("tokenizers", "onnxruntime", "tritonforge", "packaging")


def importable(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return True


class TritonPythonModel:
    def execute(self, requests):
        report = {
            "python": "%d.%d" % sys.version_info[:2],
            "numpy": np.__version__,
            "importable": [n for n in NAMES if importable(n)],
        }
        out = np.array([[json.dumps(report).encode()]], dtype=np.object_)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("REPORT", out)]) for _ in requests]
"""

IMPORTS = """
import numpy as np
import triton_python_backend_utils as pb_utils
import {module}


class TritonPythonModel:
    def execute(self, requests):
        out = pb_utils.Tensor("OUT", np.ones((1, 1), np.float32))
        return [pb_utils.InferenceResponse([out]) for _ in requests]
"""


IN = TensorSpec(name="IN", dtype=DataType.FP32, dims=[1])
ONE = {"IN": np.ones(1, np.float32)}


def python_model(repo: Path, name: str, source: str, output: TensorSpec) -> Path:
    work = repo.parent / f"_{name}"
    work.mkdir(parents=True, exist_ok=True)
    (work / "model.py").write_text(textwrap.dedent(source))
    config = ModelConfig(name=name, backend="python", max_batch_size=0, inputs=[IN], outputs=[output])
    return add_model(repo, name, work / "model.py", config)


def declared_lines(repo: Path) -> list[str]:
    """The requirement lines the repository's requirements.txt files declare (what deploy installs)."""
    lines = set()
    for path in repo.glob(f"*/*/{REQUIREMENTS_FILE}"):
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if line:
                lines.add(line)
    return sorted(lines)


def reduced(repo: Path) -> dict[str, object]:
    """EmbeddedServer options: the stubs in the reduced interpreter with ``repo``'s declared packages."""
    return {"python": reduced_python(declared_lines(repo)), "backend_path": [backend_site()]}


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A probe, an ONNX model for the stand-in backend, a model with a declared import and one without."""
    repo = tmp_path_factory.mktemp("reduced") / "repo"
    python_model(repo, "probe", PROBE, TensorSpec(name="REPORT", dtype=DataType.STRING, dims=[1, 1]))
    out = TensorSpec(name="OUT", dtype=DataType.FP32, dims=[1, 1])
    python_model(repo, "declared", IMPORTS.format(module="packaging.version"), out)
    undeclared = python_model(repo, "undeclared", IMPORTS.format(module="tokenizers"), out)
    # dropped in by hand after the build: its code imports tokenizers, nothing declares it
    (undeclared / REQUIREMENTS_FILE).unlink()
    add_model(repo, "mlp", tiny_models.mlp_onnx(repo.parent / "mlp.onnx"), max_batch_size=8)
    return repo


@pytest.fixture(scope="module")
def small_server(small_repo: Path) -> Iterator[EmbeddedServer]:
    options = reduced(small_repo)
    with EmbeddedServer(small_repo, model_control="explicit", **options) as server:  # type: ignore[arg-type]
        yield server


def test_the_stub_runs_the_images_python_with_numpy_and_the_declared_packages_only(
    small_repo: Path, small_server: EmbeddedServer
) -> None:
    _, note = target_interpreter()
    client = grpcclient.InferenceServerClient(small_server.grpc_url)
    try:
        client.load_model("probe")
        report = json.loads(triton_infer(client, "probe", ONE)["REPORT"][0, 0])
        client.load_model("declared")
        assert triton_infer(client, "declared", ONE)["OUT"].shape == (1, 1)
        # the stand-in for NVIDIA's C++ onnxruntime backend still serves ONNX models
        client.load_model("mlp")
        x = np.random.default_rng(0).random((2, 8), dtype=np.float32)
        assert triton_infer(client, "mlp", {"x": x})["probs"].shape == (2, 3)
    finally:
        client.close()
    if "pyenv" in note or "(/" in note:
        assert report["python"] == TARGET_VERSION, note
    assert report["numpy"].startswith("1."), report
    # a user model sees numpy and what is declared (packaging, by `declared`'s requirements.txt), nothing
    # of this venv: not tokenizers, not the stand-in backends' onnxruntime, not tritonforge
    assert report["importable"] == ["packaging"], report
    assert declared_lines(small_repo) == [f"packaging=={_version('packaging')}"]


def test_a_model_importing_an_undeclared_package_fails_to_load_in_the_reduced_interpreter(
    small_repo: Path, small_server: EmbeddedServer
) -> None:
    client = grpcclient.InferenceServerClient(small_server.grpc_url)
    try:
        with pytest.raises(InferenceServerException, match="No module named 'tokenizers'"):
            client.load_model("undeclared")
        assert not client.is_model_ready("undeclared")
    finally:
        client.close()
    # the same model loads with this venv's interpreter: the failure is the reduction's, as in the pod
    with EmbeddedServer(small_repo, model_control="explicit", load_models=["undeclared"]) as full:
        assert full.repository_index()  # loaded (start() raises when a model to load fails)
    # and the offline check says so before any server runs
    strict = run_tritonforge("validate", str(small_repo), "--target", DEFAULT_TARGET, "--strict")
    assert strict.returncode == 1 and "undeclared: tokenizers" in strict.stderr, strict.stderr


def test_the_example_repository_needs_nothing_beyond_nvidias_image(example_repo: Path) -> None:
    needs = python_requirements(example_repo)
    assert needs, "the example repository has Python models"
    required = {model: [line for line in lines if not line.startswith("#")] for model, lines in needs.items()}
    assert all(not lines for lines in required.values()), required
    # the tokenizer with its encoder runs onnxruntime in-process where it can, else BLS: optional only
    assert any(line.startswith("# onnxruntime==") for line in needs["text_embedding__tokenize_encode"])


def test_the_example_pipelines_answer_with_only_what_nvidias_image_has(example_repo: Path) -> None:
    from tritonforge.examples.pipelines_demo import run_pipelines_demo

    out = io.StringIO()
    result = run_pipelines_demo(
        Console(file=out, width=140), example_repo, server_options=reduced(example_repo)
    )
    assert min(result.digits_accuracy.values()) > 0.9, out.getvalue()
    assert sum(result.routed_counts.values()) == 450 and result.routed_accuracy > 0.9
    assert sum(result.fallback_counts.values()) == 450 and result.fallback_accuracy > 0.9
    # the text pipeline: the tokenizer without tokenizers, its encoder through BLS (no onnxruntime in the
    # stub's Python), answering as sentence-transformers does in this process
    assert result.text_cosine_min is not None and result.text_cosine_min >= 0.999, out.getvalue()


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)
