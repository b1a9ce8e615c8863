"""How a checked pipeline is laid out as a Triton ensemble so that any subset of its outputs can be asked for.

Triton prunes an ensemble per request (``EnsembleContext`` in ``ensemble_scheduler.cc``): from each output
not requested it walks back and drops the producing step once none of its outputs is wanted, without
asking whether the tensor also feeds another step; an input whose consumers were all dropped is taken for
an output of step 0. These tests pin the layout that keeps both traps shut; the example pipelines are
asked for every subset of their outputs on the real server in test_ensemble_examples.py.
"""

from __future__ import annotations

from tritonforge.config import DataType, TensorSpec
from tritonforge.ensemble.check import Resolved
from tritonforge.ensemble.compile import ensemble_plan
from tritonforge.ensemble.spec import BlockModelSpec, PipelineSpec, StepSpec, TensorDecl


def resolved(
    steps: list[StepSpec], inputs: list[str], outputs: list[str], models: tuple[BlockModelSpec, ...] = ()
) -> Resolved:
    spec = PipelineSpec(
        name="p",
        inputs=tuple(TensorDecl(n) for n in inputs),
        outputs=tuple(TensorDecl(n) for n in outputs),
        steps=tuple(steps),
        models=models,
    )
    tensor = lambda n: TensorSpec(name=n, dtype=DataType.FP32, dims=[4])  # noqa: E731
    return Resolved(spec, 8, tuple(map(tensor, inputs)), tuple(map(tensor, outputs)))


def test_a_chain_whose_outputs_feed_no_step_compiles_as_written() -> None:
    config, helpers = ensemble_plan(
        resolved(
            [
                StepSpec("a", "m1", {"x": "input"}, {"y": "mid"}),
                StepSpec("b", "m2", {"x": "mid"}, {"y": "out"}),
            ],
            ["input"],
            ["out"],
        )
    )
    assert helpers == [] and [s.model_name for s in config.ensemble_steps] == ["m1", "m2"]


def test_an_output_that_also_feeds_a_step_is_copied_out_by_a_passthrough() -> None:
    config, helpers = ensemble_plan(
        resolved(
            [
                StepSpec("a", "m1", {"x": "input"}, {"y": "probs"}),
                StepSpec("b", "m2", {"x": "probs"}, {"y": "label"}),
            ],
            ["input"],
            ["probs", "label"],
        )
    )
    steps = {s.model_name: s for s in config.ensemble_steps}
    copy = helpers[0].config.name
    assert [h.config.name for h in helpers] == ["tritonforge_passthrough_fp32_4_b8"]
    hidden = steps["m1"].output_map["y"]
    assert hidden != "probs" and steps["m2"].input_map["x"] == hidden
    assert steps[copy].input_map == {"IN_0": hidden} and steps[copy].output_map == {"OUT_0": "probs"}
    consumed = {t for s in config.ensemble_steps for t in s.input_map.values()}
    assert not consumed & {t.name for t in config.outputs}  # no output is read by any step


def test_an_output_that_only_a_combiner_reads_is_handed_out_by_the_combiner_without_a_passthrough() -> None:
    vote = BlockModelSpec("vote", "combiner", {"inputs": 2, "classes": 4})
    config, helpers = ensemble_plan(
        resolved(
            [
                StepSpec("a", "m1", {"x": "input"}, {"y": "pa"}),
                StepSpec("b", "m2", {"x": "input"}, {"y": "pb"}),
                StepSpec("v", "vote", {"PROBS_0": "pa", "PROBS_1": "pb"}, {"LABEL": "label"}),
            ],
            ["input"],
            ["pa", "pb", "label"],
            models=(vote,),
        )
    )
    assert helpers == []
    steps = {s.model_name: s for s in config.ensemble_steps}
    assert steps["vote"].output_map == {"LABEL": "label", "ECHO_0": "pa", "ECHO_1": "pb"}
    assert steps["vote"].input_map == {
        "PROBS_0": steps["m1"].output_map["y"],
        "PROBS_1": steps["m2"].output_map["y"],
    }
    consumed = {t for s in config.ensemble_steps for t in s.input_map.values()}
    assert not consumed & {t.name for t in config.outputs}  # no output is read by any step


def test_an_output_a_combiner_and_another_step_read_still_gets_the_passthrough() -> None:
    vote = BlockModelSpec("vote", "combiner", {"inputs": 2, "classes": 4})
    config, helpers = ensemble_plan(
        resolved(
            [
                StepSpec("a", "m1", {"x": "input"}, {"y": "pa"}),
                StepSpec("v", "vote", {"PROBS_0": "pa", "PROBS_1": "pa"}, {"LABEL": "label"}),
                StepSpec("c", "m3", {"x": "pa"}, {"y": "other"}),
            ],
            ["input"],
            ["pa", "label", "other"],
            models=(vote,),
        )
    )
    assert [h.config.name for h in helpers] == ["tritonforge_passthrough_fp32_4_b8"]
    assert not any(k.startswith("ECHO_") for s in config.ensemble_steps for k in s.output_map)


def test_an_output_that_needs_only_some_inputs_gets_a_passthrough_of_the_inputs_as_step_0() -> None:
    config, helpers = ensemble_plan(
        resolved(
            [
                StepSpec("a", "m1", {"x": "left"}, {"y": "one"}),
                StepSpec("b", "m2", {"x": "right"}, {"y": "two"}),
            ],
            ["left", "right"],
            ["one", "two"],
        )
    )
    first = config.ensemble_steps[0]
    assert first.model_name == helpers[0].config.name
    assert dict(first.input_map) == {"IN_0": "left", "IN_1": "right"}
    consumed_later = {t for s in config.ensemble_steps[1:] for t in s.input_map.values()}
    assert not consumed_later & {"left", "right"}  # only step 0 reads the ensemble's inputs
