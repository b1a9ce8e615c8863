"""Specs for reading any config Triton serves: the whole model_config.proto, nothing lost on a round trip,
errors only where Triton refuses, and no input that makes the parser crash or hang."""

# mypy: disable-error-code="arg-type"

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from google.protobuf import text_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from tritonclient.grpc import model_config_pb2

from tritonforge.config import (
    ControlInput,
    DataType,
    DirectStrategy,
    DynamicBatching,
    InitialState,
    InstanceGroup,
    ModelConfig,
    OldestStrategy,
    Optimization,
    RepositoryAgent,
    SequenceBatching,
    SequenceControl,
    SequenceState,
    TensorSpec,
)
from tritonforge.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"

# Hypothesis caches what it reads of the source under ./.hypothesis; keep that in a temp dir removed at exit.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="tritonforge-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, True)


def tensor(name: str, dtype: str, dims: list[int], **kwargs: object) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, dims=dims, **kwargs)


# ---------------------------------------------------------------- golden configs, in the style of NVIDIA's
# python_backend examples (decoupled, sequence, auto-complete) plus one that sets the rarely used fields


def golden_decoupled() -> ModelConfig:
    return ModelConfig(
        name="repeat_words",
        backend="python",
        max_batch_size=0,
        decoupled=True,
        inputs=[tensor("IN", "INT32", [-1]), tensor("DELAY", "UINT32", [-1]), tensor("WAIT", "UINT32", [1])],
        outputs=[tensor("OUT", "INT32", [1]), tensor("IDX", "UINT32", [1])],
        instance_groups=[InstanceGroup(kind="CPU")],
    )


def golden_sequence() -> ModelConfig:
    return ModelConfig(
        name="running_sum",
        backend="python",
        max_batch_size=4,
        inputs=[tensor("VALUE", "INT32", [1])],
        outputs=[tensor("TOTAL", "INT32", [1])],
        sequence_batching=SequenceBatching(
            strategy=OldestStrategy(
                max_candidate_sequences=8, preferred_batch_sizes=[2, 4], max_queue_delay_us=1000
            ),
            max_sequence_idle_us=5_000_000,
            control_inputs=[
                ControlInput(name="START", controls=[SequenceControl(kind="START", int32_false_true=[0, 1])]),
                ControlInput(
                    name="END", controls=[SequenceControl(kind="END", bool_false_true=[False, True])]
                ),
                ControlInput(
                    name="READY", controls=[SequenceControl(kind="READY", fp32_false_true=[0.0, 1.0])]
                ),
                ControlInput(name="CORRID", controls=[SequenceControl(kind="CORRID", dtype="UINT64")]),
            ],
            states=[
                SequenceState(
                    input_name="SUM_IN",
                    output_name="SUM_OUT",
                    dtype="INT32",
                    dims=[1],
                    initial_states=[InitialState(name="zero", dtype="INT32", dims=[1], zero_data=True)],
                )
            ],
        ),
        instance_groups=[InstanceGroup(count=2, kind="CPU")],
    )


def golden_auto_complete() -> ModelConfig:
    return ModelConfig(name="auto_filled", backend="python")


def golden_everything() -> ModelConfig:
    return ModelConfig(
        name="everything",
        platform="tensorrt_plan",
        max_batch_size=8,
        inputs=[
            tensor("shape", "INT32", [2], is_shape_tensor=True),
            tensor("image", "FP32", [3, -1, -1], extra="format: FORMAT_NCHW"),
        ],
        outputs=[tensor("scores", "FP32", [1000], extra='label_filename: "labels.txt"')],
        dynamic_batching=DynamicBatching(max_queue_delay_us=100),
        instance_groups=[
            InstanceGroup(
                kind="GPU",
                gpus=[0],
                extra='rate_limiter { resources { name: "R1" count: 4 } priority: 2 } passive: true',
            )
        ],
        optimization=Optimization(cuda_graphs=True),
        repository_agents=[RepositoryAgent(name="checksum", parameters={"MD5:1/model.plan": "0123abcd"})],
        parameters={"key": "value"},
        extra=(
            'batch_input { kind: BATCH_ELEMENT_COUNT target_name: "count" data_type: TYPE_FP32 '
            'source_input: "image" } optimization { priority: PRIORITY_MAX cuda { busy_wait_events: true } } '
            'model_operations { op_library_filename: "libops.so" } '
            'cc_model_filenames { key: "8.6" value: "model_sm86.plan" } '
            'metric_tags { key: "team" value: "vision" }'
        ),
    )


GOLDEN_CASES: dict[str, Callable[[], ModelConfig]] = {
    "decoupled": golden_decoupled,
    "sequence": golden_sequence,
    "auto_complete": golden_auto_complete,
    "everything": golden_everything,
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_to_pbtxt_matches_golden_file(case: str) -> None:
    assert GOLDEN_CASES[case]().to_pbtxt() == (GOLDEN / f"{case}.pbtxt").read_text(encoding="utf-8")


@pytest.mark.parametrize("case", [*sorted(GOLDEN_CASES), "ensemble"])
def test_golden_file_round_trips_through_protobuf_without_losing_a_field(case: str) -> None:
    text = (GOLDEN / f"{case}.pbtxt").read_text()
    pb = text_format.Parse(text, model_config_pb2.ModelConfig())
    config = ModelConfig.from_proto(pb)
    assert config.to_proto() == pb
    assert config.to_pbtxt() == text
    assert config.warnings == ()


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_from_pbtxt_of_golden_file_equals_built_config(case: str) -> None:
    parsed = ModelConfig.from_pbtxt((GOLDEN / f"{case}.pbtxt").read_text())
    assert parsed == GOLDEN_CASES[case]()
    assert hash(parsed) == hash(GOLDEN_CASES[case]())


def test_golden_sequence_names_every_control_kind_even_the_first_enum_value() -> None:
    # proto3 leaves out enum value 0 (CONTROL_SEQUENCE_START); a reader must still see which control it is.
    assert "kind: CONTROL_SEQUENCE_START" in golden_sequence().to_pbtxt()


def test_extra_raises_config_error_when_it_sets_a_modelled_field() -> None:
    with pytest.raises(ConfigError, match="extra sets max_batch_size"):
        ModelConfig(name="m", backend="python", extra="max_batch_size: 4")
    with pytest.raises(ConfigError, match="input 'x': extra sets dims"):
        ModelConfig(name="m", backend="python", inputs=[tensor("x", "FP32", [1], extra="dims: [2]")])


def test_extra_raises_config_error_naming_the_part_when_it_is_not_pbtxt() -> None:
    with pytest.raises(ConfigError, match="instance group 'g': extra is not valid"):
        ModelConfig(
            name="m", backend="python", instance_groups=[InstanceGroup(name="g", extra="passive: maybe")]
        )


# ---------------------------------------------------------------- errors exactly where Triton refuses


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('input [{ name: "x" data_type: 99 dims: [1] }]', r"input 'x': data_type 99 is not one Triton knows"),
        ("instance_group [{ kind: 7 }]", "instance group: kind 7 is not one Triton knows"),
        (
            "max_batch_size: 4 dynamic_batching { default_queue_policy { timeout_action: 5 } }",
            "queue policy: timeout_action 5 is not one Triton knows",
        ),
        (
            'sequence_batching { control_input [{ name: "S" control [{ kind: 9 }] }] }',
            "sequence control input 'S': kind 9 is not one Triton knows",
        ),
    ],
)
def test_from_pbtxt_raises_config_error_naming_the_field_when_an_enum_number_is_unknown(
    text: str, match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        ModelConfig.from_pbtxt('name: "m" backend: "python" ' + text)
    assert info.value.model == "m"


# Each of these was loaded into the real server (Triton 2.51) and refused with the reason quoted.
TRITON_REFUSES = [
    # "sequence batching control 'int32_false_true' must have exactly 2 entries"
    ('control_input [{ name: "S" control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [1] }] }]', "two"),
    # "sequence batching specifies multiple CONTROL_SEQUENCE_START tensors"
    (
        'control_input [{ name: "A" control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }] },'
        ' { name: "B" control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }] }]',
        "more than once",
    ),
    # "unexpected data type for control CONTROL_SEQUENCE_CORRID"
    (
        'control_input [{ name: "C" control [{ kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_FP32 }] }]',
        "data_type",
    ),
    ('control_input [{ name: "C" control [{ kind: CONTROL_SEQUENCE_CORRID }] }]', "data_type"),
    # "sequence batching preferred batch size must be <= max batch size"
    ("oldest { max_candidate_sequences: 4 preferred_batch_size: [16] }", "exceeds max_batch_size"),
    # "sequence batching minimum slot utilization must be in range (0.0, 1.0]"
    ("direct { minimum_slot_utilization: 2.0 }", "minimum_slot_utilization"),
    # "sequence batching control tensor must have a name"
    ("control_input [{ control [{ kind: CONTROL_SEQUENCE_START int32_false_true: [0, 1] }] }]", "name"),
]


@pytest.mark.parametrize(("body", "match"), TRITON_REFUSES)
def test_from_pbtxt_raises_config_error_where_triton_refuses_a_sequence_batcher(
    body: str, match: str
) -> None:
    text = f'name: "m" backend: "python" max_batch_size: 8 sequence_batching {{ {body} }}'
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_pbtxt(text)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("sequence_batching {} response_cache { enable: true }", "sequence batching"),
        ("model_transaction_policy { decoupled: true } response_cache { enable: true }", "decoupled"),
        ('input [{ name: "s" data_type: TYPE_INT32 dims: [1] is_shape_tensor: true }]', "TensorRT"),
        # Triton 2.51 loads these, but every request fails (duplicate names) or nothing is served
        (
            'input [{ name: "x" data_type: TYPE_FP32 dims: [1] },'
            ' { name: "x" data_type: TYPE_FP32 dims: [1] }]',
            "appears twice",
        ),
        ("version_policy { latest { } }", "serves no version"),
        ("version_policy { latest { num_versions: 0 } }", "serves no version"),
    ],
)
def test_from_pbtxt_raises_config_error_where_triton_refuses_the_combination(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_pbtxt('name: "m" backend: "python" max_batch_size: 8 ' + text)


# Each of these the real server loads; they read as warnings, and built in code they still raise.
TRITON_ACCEPTS = [
    ("max_batch_size: 0 dynamic_batching {}", "dynamic_batching needs a batching model"),
    ("max_batch_size: 4 dynamic_batching { default_priority_level: 1 }", "priority_levels is 0"),
    ('platform: "foo"', "unknown platform"),
    ("instance_group [{ count: -1 }]", "count must be an integer >= 1"),
    (
        'max_batch_size: 4 sequence_batching { control_input [{ name: "S" control [{ kind: '
        "CONTROL_SEQUENCE_START data_type: TYPE_INT32 int32_false_true: [0, 1] }] }] }",
        "only read for CONTROL_SEQUENCE_CORRID",
    ),
    ('max_batch_size: 4 sequence_batching { control_input [{ name: "S" }] }', "has no control"),
]


@pytest.mark.parametrize(("text", "match"), TRITON_ACCEPTS)
def test_from_pbtxt_reads_what_triton_accepts_and_lists_the_oddity_as_a_warning(
    text: str, match: str
) -> None:
    config = ModelConfig.from_pbtxt('name: "m" backend: "python" ' + text)
    assert any(match in warning for warning in config.warnings), config.warnings
    assert all(warning.startswith("model 'm': ") for warning in config.warnings)


def test_model_config_built_in_code_still_raises_for_what_triton_merely_accepts() -> None:
    with pytest.raises(ConfigError, match="dynamic_batching needs a batching model"):
        ModelConfig(name="m", backend="python", dynamic_batching=DynamicBatching())
    with pytest.raises(ConfigError, match="has no control"):
        ControlInput(name="S", controls=[])


def test_sequence_parts_raise_config_error_when_invalid() -> None:
    with pytest.raises(ConfigError, match="exactly one of zero_data"):
        InitialState(name="i", dtype="INT32", dims=[1])
    with pytest.raises(ConfigError, match="strategy must be"):
        SequenceBatching(strategy="oldest")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="one scheduler"):
        ModelConfig(
            name="m",
            backend="python",
            max_batch_size=4,
            dynamic_batching=DynamicBatching(),
            sequence_batching=SequenceBatching(strategy=DirectStrategy()),
        )
    assert SequenceControl(kind="CONTROL_SEQUENCE_CORRID", dtype="TYPE_STRING").dtype is DataType.STRING


# ---------------------------------------------------------------- hostile text: ConfigError or a config


_FRAGMENTS = [
    'name: "m"',
    'backend: "python"',
    'platform: "ensemble"',
    'platform: "onnxruntime_onnx"',
    "max_batch_size: 8",
    "max_batch_size: -3",
    'input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]',
    'input [{ name: "x" data_type: 99 dims: [0] reshape { shape: [] } }]',
    'output [{ name: "y" data_type: TYPE_STRING dims: [-1] label_filename: "l.txt" }]',
    "dynamic_batching { preferred_batch_size: [4, 16] priority_levels: 2 default_priority_level: 3 }",
    "dynamic_batching { default_queue_policy { timeout_action: 5 } }",
    'sequence_batching { control_input [{ name: "S" control [{ kind: 7 int32_false_true: [0] }] }] }',
    "sequence_batching { oldest { preferred_batch_size: [0] } direct {} }",
    'sequence_batching { state [{ input_name: "a" dims: [-7] initial_state { name: "i" } }] }',
    "instance_group [{ kind: 7 count: -2 gpus: [-1] }]",
    'ensemble_scheduling { step [{ model_name: "a" input_map { key: "x" value: "y" } }] }',
    'model_warmup [{ name: "w" batch_size: 0 inputs { key: "q" value: { dims: [2] } } }]',
    "version_policy { specific {} }",
    "model_transaction_policy { decoupled: true } response_cache { enable: true }",
    'model_repository_agents { agents [{ name: "" }] }',
    'optimization { execution_accelerators { gpu_execution_accelerator [{ name: "tensorrt" '
    'parameters { key: "precision_mode" value: "FP8" } }] } }',
    'batch_input [{ kind: 42 target_name: "t" }]',
    "{{{",
    '"unterminated',
    "\x00\xff",
]


def _parse_or_refuse(text: str) -> None:
    try:
        config = ModelConfig.from_pbtxt(text)
    except ConfigError as exc:
        assert exc.message  # our own error, with something to say
        return
    # A config that parses survives its own round trip unchanged.
    assert ModelConfig.from_pbtxt(config.to_pbtxt()) == config


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=8))
def test_from_pbtxt_of_any_mix_of_fragments_gives_a_config_or_a_config_error(parts: list[str]) -> None:
    _parse_or_refuse("\n".join(parts))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.text(max_size=200))
def test_from_pbtxt_of_any_text_gives_a_config_or_a_config_error(text: str) -> None:
    _parse_or_refuse(text)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=200))
def test_from_proto_of_any_wire_bytes_gives_a_config_or_a_config_error(data: bytes) -> None:
    pb = model_config_pb2.ModelConfig()
    try:
        pb.ParseFromString(data)
    except Exception:
        return
    with contextlib.suppress(ConfigError):
        ModelConfig.from_proto(pb)


def test_config_package_exports_every_public_class_of_its_modules() -> None:
    import inspect

    import tritonforge.config as package
    from tritonforge.config import enums, parts, sequence

    for module in (enums, parts, sequence):
        defined = {
            name
            for name, obj in vars(module).items()
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and not name.startswith("_")
        }
        assert defined <= set(package.__all__), defined - set(package.__all__)
    assert all(hasattr(package, name) for name in package.__all__)
