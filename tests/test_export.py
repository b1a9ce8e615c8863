"""Exporters: every artifact is checked against its source; bad input gets a clear ExportError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tritonforge.config import onnx_signature
from tritonforge.errors import ExportError
from tritonforge.export import export_onnx, export_sklearn, export_torchscript, to_onnx
from tritonforge.repository import add_model

torch = pytest.importorskip("torch")
sklearn = pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float32)[:600], d.target[:600]


class TokenModel(torch.nn.Module):
    """ids [N, T] -> per-token vectors [N, T, 8]: needs dynamic batch and sequence axes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 8)
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, ids, mask):
        return torch.tanh(self.lin(self.emb(ids))) * mask.unsqueeze(-1).float()


def _token_inputs(batch: int, seq: int):
    g = torch.Generator().manual_seed(batch * 100 + seq)
    return torch.randint(0, 50, (batch, seq), generator=g), torch.ones(batch, seq, dtype=torch.int64)


AXES = {
    "ids": {0: "batch", 1: "sequence"},
    "mask": {0: "batch", 1: "sequence"},
    "out": {0: "batch", 1: "sequence"},
}


def test_export_onnx_has_dynamic_batch_and_sequence_axes(tmp_path):
    artifact = export_onnx(
        TokenModel(),
        _token_inputs(2, 5),
        tmp_path / "m.onnx",
        input_names=["ids", "mask"],
        output_names=["out"],
        dynamic_axes=AXES,
        check_examples=[_token_inputs(3, 11)],
    )
    assert artifact.passed and artifact.reports["out"].max_abs < 1e-5
    assert artifact.settings["opset"] == 17
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    ids, mask = _token_inputs(7, 23)
    (out,) = session.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})
    assert out.shape == (7, 23, 8)
    signature = onnx_signature(artifact.path)
    assert signature.batched and [tuple(t.dims) for t in signature.inputs] == [(-1,), (-1,)]


def test_export_onnx_raises_export_error_for_unsupported_operator(tmp_path):
    class Spectral(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svd(x)[1]  # no ONNX op for an SVD

    with pytest.raises(ExportError, match=r"layer/operator .*aten::linalg_svd"):
        export_onnx(Spectral(), torch.randn(3, 3), tmp_path / "m.onnx", input_names=["x"], output_names=["y"])


def test_export_onnx_writes_external_data_above_the_threshold(tmp_path):
    model = torch.nn.Linear(64, 32)
    artifact = export_onnx(
        model,
        torch.zeros(2, 64),
        tmp_path / "big.onnx",
        input_names=["x"],
        output_names=["y"],
        external_data_threshold_bytes=0,
    )
    assert artifact.passed and artifact.settings["external_data"]
    assert [p.name for p in artifact.extra_files] == ["big.onnx.data"]
    version = add_model(tmp_path / "repo", "big", artifact.path, extra_files=artifact.extra_files)
    served = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.ones((3, 64), np.float32)
    assert np.allclose(served.run(None, {"x": x})[0], model(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_to_onnx_raises_export_error_when_artifact_differs_from_source(tmp_path):
    class Drifting(torch.nn.Module):
        """Differs between tracing and running: a stand-in for a broken export."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x * self.calls

    with pytest.raises(ExportError, match="differs from the source"):
        to_onnx(Drifting(), torch.ones(2, 3), tmp_path / "m.onnx", input_names=["x"], output_names=["y"])


def test_export_torchscript_is_checked_against_the_module(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU())
    artifact = export_torchscript(model, torch.randn(3, 6), tmp_path / "m.pt")
    assert artifact.passed and artifact.reports["OUTPUT__0"].max_abs < 1e-6


def test_export_sklearn_pipeline_has_tensor_outputs_equal_to_predict(tmp_path, digits):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = digits
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x[:400], y[:400])
    artifact = export_sklearn(clf, x[400:], tmp_path / "clf.onnx", labels=y[400:])
    assert artifact.passed, artifact.failures()
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]  # no ZipMap
    label, probs = session.run(None, {"input": x[400:]})
    assert np.array_equal(label, clf.predict(x[400:]))
    assert probs.dtype == np.float32 and probs.shape == (200, 10)
    assert artifact.reports["label"].accuracy == pytest.approx(
        float(np.mean(clf.predict(x[400:]) == y[400:]))
    )


def test_export_sklearn_raises_export_error_for_an_estimator_without_converter(tmp_path, digits):
    from sklearn.base import BaseEstimator, ClassifierMixin

    class Majority(ClassifierMixin, BaseEstimator):
        def fit(self, x, y):
            self.classes_ = np.unique(y)
            return self

        def predict(self, x):
            return np.full(len(x), self.classes_[0])

        def predict_proba(self, x):
            return np.ones((len(x), len(self.classes_))) / len(self.classes_)

    x, y = digits
    with pytest.raises(ExportError, match=r"Majority.*no converter"):
        export_sklearn(Majority().fit(x, y), x[:5], tmp_path / "m.onnx")


def test_export_sklearn_raises_export_error_for_a_sample_that_is_not_2d(tmp_path, digits):
    from sklearn.linear_model import LogisticRegression

    x, y = digits
    with pytest.raises(ExportError, match="2-D"):
        export_sklearn(LogisticRegression(max_iter=200).fit(x, y), x[0], Path(tmp_path) / "m.onnx")


def test_export_cli_checks_and_registers_a_pickled_estimator(tmp_path, digits):
    import json
    import pickle

    from sklearn.linear_model import LogisticRegression
    from typer.testing import CliRunner

    from tritonforge.cli import app

    x, y = digits
    (tmp_path / "clf.pkl").write_bytes(pickle.dumps(LogisticRegression(max_iter=500).fit(x[:400], y[:400])))
    np.save(tmp_path / "x.npy", x[400:])
    np.save(tmp_path / "y.npy", y[400:])
    repo = tmp_path / "repo"
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(tmp_path / "clf.pkl"),
            "--out",
            str(tmp_path / "clf.onnx"),
            "--sample",
            str(tmp_path / "x.npy"),
            "--labels",
            str(tmp_path / "y.npy"),
            "--repo",
            str(repo),
            "--name",
            "clf",
            "--max-batch-size",
            "32",
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert "probabilities" in result.output and "registered clf version 1" in result.output
    manifest = json.loads((repo / "clf" / "1" / "manifest.json").read_text())
    assert manifest["source"]["path"] == str((tmp_path / "clf.pkl").resolve())
    assert manifest["verification"]["outputs"]["label"]["accuracy"] > 0.8


def test_export_cli_fails_clearly_for_a_missing_model_file(tmp_path):
    from typer.testing import CliRunner

    from tritonforge.cli import app

    np.save(tmp_path / "x.npy", np.zeros((2, 4), np.float32))
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(tmp_path / "nope.pkl"),
            "--out",
            str(tmp_path / "m.onnx"),
            "--sample",
            str(tmp_path / "x.npy"),
        ],
    )
    assert result.exit_code == 1 and "nope.pkl does not exist" in " ".join(result.output.split())


def test_export_cli_exports_a_saved_torch_module_with_a_sequence_axis(tmp_path):
    from typer.testing import CliRunner

    from tritonforge.cli import app

    torch.save(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Tanh()), tmp_path / "m.pt")
    np.savez(
        tmp_path / "x.npz", tokens=np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32)
    )
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(tmp_path / "m.pt"),
            "--out",
            str(tmp_path / "m.onnx"),
            "--sample",
            str(tmp_path / "x.npz"),
            "--output-name",
            "y",
            "--dynamic-axis",
            "tokens:1:sequence",
            "--dynamic-axis",
            "y:1:sequence",
        ],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"tokens": np.zeros((3, 11, 8), np.float32)})[0].shape == (3, 11, 4)
