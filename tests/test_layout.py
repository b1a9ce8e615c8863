"""Serving layouts chosen by measurement (instances x intra-op threads), recorded with their figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tiny_models
from tritonforge.config import InstanceKind, read_config
from tritonforge.repository import add_model
from tritonforge.server.layout import Layout, candidate_layouts, choose_layout


def test_candidates_are_the_latency_and_throughput_layouts_and_halves_between() -> None:
    assert candidate_layouts(1) == [Layout(1, 1)]
    assert candidate_layouts(2) == [Layout(1, 2), Layout(2, 1)]
    assert candidate_layouts(8) == [Layout(1, 8), Layout(8, 1), Layout(2, 4)]
    with pytest.raises(ValueError, match="positive integer"):
        candidate_layouts(0)


def test_choose_layout_measures_every_candidate_and_applies_the_winner_to_the_config(tmp_path: Path) -> None:
    source = tiny_models.mlp_onnx(tmp_path / "mlp.onnx")
    x = np.ones((1, 8), np.float32)
    choice = choose_layout(source, {"x": x}, cpus=2, rounds=2, duration_s=0.05)
    assert set(choice.rows_per_s) == {Layout(1, 2), Layout(2, 1)}
    assert all(len(v) == 2 and min(v) > 0 for v in choice.rows_per_s.values())
    assert choice.chosen in choice.rows_per_s
    record = choice.as_manifest()
    assert record["instances"] == choice.chosen.instances and choice.chosen.label in record["why"]
    assert set(record["measured_rows_per_s"]) == {"1 x 2 threads", "2 x 1 thread"}

    add_model(tmp_path / "repo", "mlp", source, max_batch_size=8)
    config = choice.apply(read_config(tmp_path / "repo" / "mlp"))
    assert [(g.count, g.kind) for g in config.instance_groups] == [
        (choice.chosen.instances, InstanceKind.CPU)
    ]
    assert config.parameters["intra_op_thread_count"] == str(choice.chosen.intra_op_threads)
    assert config.parameters["session.intra_op.allow_spinning"] == "0"


def test_choose_layout_raises_value_error_without_feeds(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="feeds"):
        choose_layout(tiny_models.mlp_onnx(tmp_path / "mlp.onnx"), {})


def test_with_layout_raises_value_error_for_a_model_our_backends_do_not_thread(tmp_path: Path) -> None:
    from tritonforge.config import ModelConfig
    from tritonforge.repository import with_layout

    with pytest.raises(ValueError, match=r"'py' \(python\) has no intra-op threads"):
        with_layout(ModelConfig(name="py", backend="python", max_batch_size=8), 2, 1)
