"""Serving layouts chosen by measurement (instances x intra-op threads), recorded with their figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tiny_models
from tritonforge.config import InstanceKind, read_config
from tritonforge.repository import add_model
from tritonforge.repository.layout import Layout, candidate_layouts, choose_layout


def test_candidates_are_the_latency_and_throughput_layouts_and_halves_between() -> None:
    assert candidate_layouts(1) == [Layout(1, 1)]
    assert candidate_layouts(2) == [Layout(1, 1), Layout(1, 2), Layout(2, 1)]
    assert candidate_layouts(8) == [Layout(1, 1), Layout(1, 8), Layout(8, 1), Layout(2, 4)]
    with pytest.raises(ValueError, match="positive integer"):
        candidate_layouts(0)


def test_choose_layout_measures_every_candidate_and_applies_the_winner_to_the_config(tmp_path: Path) -> None:
    source = tiny_models.mlp_onnx(tmp_path / "mlp.onnx")
    x = np.ones((1, 8), np.float32)
    choice = choose_layout(source, {"x": x}, cpus=2, rounds=2, duration_s=0.05)
    assert set(choice.rows_per_s) == {Layout(1, 1), Layout(1, 2), Layout(2, 1)}
    assert all(len(v) == 2 and min(v) > 0 for v in choice.rows_per_s.values())
    assert choice.chosen in choice.rows_per_s
    record = choice.as_manifest()
    assert record["instances"] == choice.chosen.instances and choice.chosen.label in record["why"]
    assert set(record["measured_rows_per_s"]) == {"1 x 1 thread", "1 x 2 threads", "2 x 1 thread"}

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


def test_the_leanest_layout_within_min_gain_of_the_fastest_is_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tritonforge.repository import layout as module

    source = tiny_models.mlp_onnx(tmp_path / "mlp.onnx")
    feeds = {"x": np.ones((1, 8), np.float32)}
    cases = [  # (rows/s per layout, the choice): fewer threads in all wins within MIN_GAIN (10 %), not beyond
        ({Layout(1, 1): 100.0, Layout(1, 2): 108.0, Layout(2, 1): 90.0}, Layout(1, 1)),
        ({Layout(1, 1): 100.0, Layout(1, 2): 101.0, Layout(2, 1): 150.0}, Layout(2, 1)),
        ({Layout(1, 1): 60.0, Layout(1, 2): 100.0, Layout(2, 1): 99.0}, Layout(1, 2)),
    ]
    for rates, expected in cases:

        def measured(sessions, feeds, rows, duration_s, rates=rates):  # the figures, not a clock
            threads = sessions[0].get_session_options().intra_op_num_threads
            return rates[Layout(len(sessions), threads)]

        monkeypatch.setattr(module, "_rows_per_s", measured)
        choice = choose_layout(source, feeds, cpus=2, rounds=1, duration_s=0.01)
        assert choice.chosen == expected, rates


def test_queued_requests_are_shared_by_a_layouts_instances_one_batch_per_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tritonforge.repository import layout as module

    source = tiny_models.mlp_onnx(tmp_path / "mlp.onnx")
    seen: dict[Layout, tuple[int, int]] = {}

    def measured(sessions, feeds, rows, duration_s):  # record what each call runs
        threads = sessions[0].get_session_options().intra_op_num_threads
        seen[Layout(len(sessions), threads)] = (feeds["x"].shape[0], rows)
        assert sessions[0].run(None, dict(feeds))[0].shape[0] == rows  # a real batch of that many
        return 1.0

    monkeypatch.setattr(module, "_rows_per_s", measured)
    choice = choose_layout(source, {"x": np.ones((1, 8), np.float32)}, cpus=2, rounds=1, queued=8)
    assert seen == {Layout(1, 1): (8, 8), Layout(1, 2): (8, 8), Layout(2, 1): (4, 4)}
    assert "8 waiting at once, shared by the instances" in choice.workload
    with pytest.raises(ValueError, match="queued"):
        choose_layout(source, {"x": np.ones((1, 8), np.float32)}, queued=0)
