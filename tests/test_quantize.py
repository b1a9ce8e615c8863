"""Quantization: INT8 dynamic/static and FP16, verified against FP32; failures are refused with figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tritonforge.errors import QuantizationError
from tritonforge.quantize import (
    Tolerance,
    compare,
    quantize_dynamic,
    quantize_static,
    to_fp16,
)
from tritonforge.registry import register

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def digits_mlp(tmp_path_factory):
    """A small real classifier (digits, torch MLP) as FP32 ONNX, with held-out samples and labels."""
    from sklearn.datasets import load_digits

    from tritonforge.export import to_onnx

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x[:1200]), torch.from_numpy(y[:1200])
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    path = to_onnx(
        model, xt[:4], tmp_path_factory.mktemp("q") / "fp32.onnx", input_names=["x"], output_names=["logits"]
    )
    holdout = [{"x": x[i : i + 100]} for i in range(1200, 1700, 100)]
    calibration = [{"x": x[i : i + 100]} for i in range(0, 400, 100)]
    return path, holdout, calibration, y[1200:1700]


LOOSE = Tolerance(min_cosine_mean=0.99, min_cosine_min=0.9, max_accuracy_drop=0.02)


def test_quantize_dynamic_int8_is_verified_on_held_out_samples(tmp_path, digits_mlp):
    source, holdout, _, labels = digits_mlp
    artifact = quantize_dynamic(
        source, tmp_path / "int8.onnx", holdout=holdout, labels=labels, tolerance=LOOSE
    )
    report = artifact.reports["logits"]
    assert artifact.passed, artifact.failures()
    assert report.samples == 500 and report.cosine_mean > 0.99 and report.accuracy is not None
    assert report.accuracy_reference - report.accuracy <= 0.02
    assert artifact.settings["mode"] == "int8-dynamic" and artifact.settings["per_channel"]


def test_quantize_static_int8_calibrates_on_user_samples(tmp_path, digits_mlp):
    source, holdout, calibration, labels = digits_mlp
    artifact = quantize_static(
        source,
        tmp_path / "static.onnx",
        calibration=calibration,
        holdout=holdout,
        labels=labels,
        tolerance=LOOSE,
    )
    assert artifact.passed, artifact.failures()
    assert artifact.settings["calibration_rows"] == 400 and artifact.settings["format"] == "QDQ"
    assert artifact.path.stat().st_size < source.stat().st_size


def test_quantize_static_raises_quantization_error_when_calibration_has_wrong_shape(tmp_path, digits_mlp):
    source, holdout, _, _ = digits_mlp
    bad = [{"x": np.zeros((8, 63), np.float32)}]
    with pytest.raises(
        QuantizationError, match=r"calibration sample 0: input 'x' has shape \[8, 63\].*\[batch, 64\]"
    ):
        quantize_static(source, tmp_path / "s.onnx", calibration=bad, holdout=holdout)


def test_quantize_raises_quantization_error_when_calibration_names_another_input(tmp_path, digits_mlp):
    source, holdout, _, _ = digits_mlp
    with pytest.raises(QuantizationError, match="missing \\['x'\\], unknown \\['pixels'\\]"):
        quantize_static(
            source,
            tmp_path / "s.onnx",
            calibration=[{"pixels": np.zeros((2, 64), np.float32)}],
            holdout=holdout,
        )


def test_to_fp16_keeps_fp32_inputs_and_outputs_when_asked(tmp_path, digits_mlp):
    import onnxruntime as ort

    source, holdout, _, labels = digits_mlp
    artifact = to_fp16(source, tmp_path / "fp16.onnx", holdout=holdout, labels=labels, tolerance=LOOSE)
    assert artifact.passed and artifact.reports["logits"].max_abs < 0.05
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    assert (
        session.get_inputs()[0].type == "tensor(float)" and session.get_outputs()[0].type == "tensor(float)"
    )


def test_to_fp16_with_fp16_inputs_is_verified_too(tmp_path, digits_mlp):
    source, holdout, _, _ = digits_mlp
    artifact = to_fp16(
        source, tmp_path / "fp16io.onnx", holdout=holdout, keep_io_types=False, tolerance=LOOSE
    )
    assert artifact.passed and artifact.settings["keep_io_types"] is False


def test_register_raises_quantization_error_with_figures_when_tolerance_fails(tmp_path, digits_mlp):
    source, holdout, _, labels = digits_mlp
    strict = Tolerance(max_abs=0.0, min_cosine_min=1.0)
    artifact = quantize_dynamic(
        source, tmp_path / "int8.onnx", holdout=holdout, labels=labels, tolerance=strict
    )
    assert not artifact.passed
    repo = tmp_path / "repo"
    with pytest.raises(
        QuantizationError, match=r"failed its verification.*max abs error .* > 0.*cosine mean="
    ):
        register(repo, "clf", artifact, max_batch_size=16)
    assert not (repo / "clf").exists()  # never written unless forced
    version = register(repo, "clf", artifact, force=True, max_batch_size=16)
    manifest = json.loads((version / "manifest.json").read_text())
    assert manifest["forced"] is True and manifest["verification"]["passed"] is False
    assert manifest["quantization"]["mode"] == "int8-dynamic"


def test_compare_reports_accuracy_cosine_and_relative_error():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    got = np.array([[0.9, 0.1], [0.0, 2.0]])
    report = compare(ref, got, labels=np.array([0, 0]), tolerance=Tolerance(max_abs=0.05))
    assert report.max_abs == pytest.approx(0.1)
    assert report.accuracy == report.accuracy_reference == 0.5
    assert 0.99 < report.cosine_mean < 1.0 and not report.passed
    assert "max abs error 0.1 > 0.05" in report.failures[0]


def test_quantize_cli_prints_the_verification_table_and_fails_on_tolerance(tmp_path, digits_mlp):
    from typer.testing import CliRunner

    from tritonforge.cli import app

    source, holdout, _, labels = digits_mlp
    np.savez(tmp_path / "hold.npz", x=np.concatenate([h["x"] for h in holdout]))
    np.save(tmp_path / "y.npy", labels)
    runner = CliRunner()
    args = [
        "quantize",
        str(source),
        "--out",
        str(tmp_path / "int8.onnx"),
        "--holdout",
        str(tmp_path / "hold.npz"),
        "--labels",
        str(tmp_path / "y.npy"),
        "--min-cosine-min",
        "0.9",
        "--max-accuracy-drop",
        "0.02",
    ]
    ok = runner.invoke(
        app, [*args, "--repo", str(tmp_path / "repo"), "--name", "clf"], env={"COLUMNS": "200"}
    )
    assert ok.exit_code == 0, ok.output
    assert "cosine mean" in ok.output and "registered clf version 1" in ok.output
    strict = runner.invoke(
        app,
        [*args[:-4], "--min-cosine-min", "1.0", "--repo", str(tmp_path / "repo"), "--name", "clf"],
        env={"COLUMNS": "200"},
    )
    assert strict.exit_code == 1 and "failed its verification" in strict.output and "--force" in strict.output
    assert sorted(p.name for p in (tmp_path / "repo" / "clf").iterdir()) == ["1", "config.pbtxt"]


def test_quantize_cli_fails_clearly_for_a_missing_model_file(tmp_path):
    from typer.testing import CliRunner

    from tritonforge.cli import app

    np.savez(tmp_path / "hold.npz", x=np.zeros((2, 64), np.float32))
    result = CliRunner().invoke(
        app,
        [
            "quantize",
            str(tmp_path / "nope.onnx"),
            "--out",
            str(tmp_path / "q.onnx"),
            "--holdout",
            str(tmp_path / "hold.npz"),
        ],
    )
    assert result.exit_code == 1 and "nope.onnx does not exist" in " ".join(result.output.split())
