"""Thread pools are never left at their defaults: generated configs name them, our backends honour them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import tiny_models
from tritonforge.config import read_config
from tritonforge.repository import (
    add_model,
    infer_config,
    onnxruntime_thread_parameters,
    pytorch_thread_parameters,
)
from tritonforge.server.runtime import ServedModel, available_cpus, onnxruntime_options


def test_inferred_onnx_config_names_its_thread_pools_and_turns_spinning_off(tmp_path: Path) -> None:
    source = tiny_models.mlp_onnx(tmp_path / "mlp.onnx")
    add_model(tmp_path / "repo", "mlp", source, max_batch_size=8)
    params = dict(read_config(tmp_path / "repo" / "mlp").parameters)
    assert params == {
        "intra_op_thread_count": "1",
        "inter_op_thread_count": "1",
        "session.intra_op.allow_spinning": "0",
        "session.inter_op.allow_spinning": "0",
    }
    wider = infer_config("mlp", source, intra_op_threads=3)
    assert wider.parameters["intra_op_thread_count"] == "3"


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_thread_parameters_raise_value_error_for_a_count_that_is_not_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        onnxruntime_thread_parameters(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive integer"):
        pytorch_thread_parameters(1, bad)  # type: ignore[arg-type]


def _served(tmp_path: Path, parameters: dict[str, str], instances: int = 1) -> ServedModel:
    """A ServedModel as the stub builds it, from Triton's JSON config of a real ONNX file."""
    tiny_models.mlp_onnx(tmp_path / "1" / "model.onnx")
    config = {
        "name": "mlp",
        "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [8]}],
        "output": [{"name": "probs", "data_type": "TYPE_FP32", "dims": [3]}],
        "instance_group": [{"count": instances, "kind": "KIND_CPU"}],
        "parameters": {k: {"string_value": v} for k, v in parameters.items()},
    }
    args = {
        "model_config": json.dumps(config),
        "model_name": "mlp",
        "model_version": "1",
        "model_repository": str(tmp_path),
    }
    return ServedModel(args, "model.onnx")


def test_onnxruntime_options_follow_the_configs_thread_and_session_parameters(tmp_path: Path) -> None:
    model = _served(tmp_path, {**onnxruntime_thread_parameters(2), "session.intra_op.allow_spinning": "1"})
    options = onnxruntime_options(model)
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    session = ort.InferenceSession(model.path, sess_options=options, providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": np.ones((2, 8), np.float32)})[0].shape == (2, 3)


def test_a_config_without_thread_counts_shares_the_cpus_among_its_instances_without_spinning(
    tmp_path: Path,
) -> None:
    options = onnxruntime_options(_served(tmp_path, {}, instances=2))
    assert options.intra_op_num_threads == max(1, available_cpus() // 2)
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_a_thread_count_of_zero_leaves_the_choice_to_onnxruntime_as_the_cpp_backend_does(
    tmp_path: Path,
) -> None:
    assert onnxruntime_options(_served(tmp_path, {"intra_op_thread_count": "0"})).intra_op_num_threads == 0


def test_a_spinning_value_other_than_0_or_1_raises_value_error_naming_the_model_and_key(
    tmp_path: Path,
) -> None:
    # onnxruntime itself takes any text for this key without a word
    model = _served(tmp_path, {"session.intra_op.allow_spinning": "maybe"})
    with pytest.raises(ValueError, match=r"'mlp'.*session\.intra_op\.allow_spinning='maybe'"):
        onnxruntime_options(model)
