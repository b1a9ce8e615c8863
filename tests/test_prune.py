"""Structured pruning: whole neurons leave the digits MLP, the ONNX file shrinks, the tolerance gate
judges it against the unpruned model, and the pruned model serves through the real server."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn.datasets")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from pruning import digits_mlp, train  # noqa: E402

from tritonforge.errors import ExportError  # noqa: E402
from tritonforge.export import export_onnx, export_pruned_onnx, prune_neurons  # noqa: E402
from tritonforge.verify import Tolerance  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matrices: one thread is fastest, and on a busy 2-core runner many threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits(one_thread):
    model, x, y, train_rows, test_rows = digits_mlp()  # the benchmark's model, trained the same way
    return model, x[train_rows], y[train_rows], x[test_rows], y[test_rows]


def _hidden_widths(path: Path) -> list[int]:
    graph = onnx.load(str(path)).graph
    return sorted(int(t.dims[0]) for t in graph.initializer if len(t.dims) == 1)


def test_prune_neurons_removes_whole_rows_and_columns_and_keeps_the_function_shape(digits):
    model = digits[0]
    result = prune_neurons(copy.deepcopy(model), 0.5)
    assert result.widths == {"0": (256, 128), "2": (128, 64)}
    assert result.module[0].weight.shape == (128, 64) and result.module[2].weight.shape == (64, 128)
    assert result.module[4].weight.shape == (10, 64)
    assert result.params_after < 0.55 * result.params_before
    assert result.module(torch.zeros(3, 64)).shape == (3, 10)


def test_pruned_onnx_is_smaller_and_passes_the_gate_after_finetuning(digits, tmp_path):
    model, x_train, y_train, x_test, y_test = digits
    full = export_onnx(model, x_test[:4], tmp_path / "full.onnx", input_names=["x"], output_names=["logits"])
    artifact = export_pruned_onnx(
        model,
        x_test[:4],
        tmp_path / "pruned.onnx",
        amount=0.75,
        holdout=x_test,
        labels=y_test.numpy(),
        input_names=["x"],
        output_names=["logits"],
        finetune=lambda m: train(m, x_train, y_train, 150),
    )
    report = artifact.reports["logits"]
    assert artifact.passed, report.summary()
    assert report.accuracy >= report.accuracy_reference - 0.02
    assert artifact.path.stat().st_size < 0.35 * full.path.stat().st_size
    assert _hidden_widths(artifact.path) == [10, 32, 64]
    assert artifact.manifest()["pruning"]["widths"] == {"0": [256, 64], "2": [128, 32]}


def test_pruning_too_far_without_finetuning_fails_the_tolerance_gate_and_the_registry_refuses_it(
    digits, tmp_path
):
    from tritonforge.registry import register

    model, _, _, x_test, y_test = digits
    artifact = export_pruned_onnx(
        model,
        x_test[:4],
        tmp_path / "over.onnx",
        amount=0.97,
        holdout=x_test,
        labels=y_test.numpy(),
        input_names=["x"],
        output_names=["logits"],
        tolerance=Tolerance(max_accuracy_drop=0.01),
    )
    assert not artifact.passed and "accuracy" in artifact.failures()[0]
    with pytest.raises(ExportError, match="failed its verification"):
        register(tmp_path / "repo", "digits", artifact)


def test_prune_neurons_raises_export_error_when_nothing_is_prunable():
    class Plain(torch.nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(ExportError, match="no prunable pair"):
        prune_neurons(Plain(), 0.5)
    with pytest.raises(ExportError, match="fraction"):
        prune_neurons(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 2)), 1.0)


def test_pruned_model_serves_through_the_real_server_with_the_gate_s_accuracy(digits, tmp_path):
    import tritonclient.grpc as grpcclient

    from tritonforge.registry import register
    from tritonforge.server import EmbeddedServer

    model, x_train, y_train, x_test, y_test = digits
    artifact = export_pruned_onnx(
        model,
        x_test[:4],
        tmp_path / "served.onnx",
        amount=0.5,
        holdout=x_test,
        labels=y_test.numpy(),
        input_names=["x"],
        output_names=["logits"],
        finetune=lambda m: train(m, x_train, y_train, 100),
    )
    repo = tmp_path / "repo"
    register(repo, "digits_pruned", artifact, max_batch_size=512)
    with EmbeddedServer(repo) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        try:
            x = x_test.numpy()
            inp = grpcclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            logits = client.infer("digits_pruned", [inp]).as_numpy("logits")
        finally:
            client.close()
    served_accuracy = float((logits.argmax(1) == y_test.numpy()).mean())
    assert served_accuracy == pytest.approx(artifact.reports["logits"].accuracy, abs=1e-9)
