"""Hostile pipeline specs: whatever a spec holds, the loader and the checks answer with a spec or issues.

Never a raw exception, a hang or a memory blow-up. The first half are the reproducers a fuzz run found
(each a regression test); the second half are property-based tests (hypothesis, bounded and derandomized
so CI runs the same examples every time) over the loader and the checks. No server: all offline.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from tritonforge.config import DataType, TensorSpec
from tritonforge.ensemble import (
    Issue,
    ModelInfo,
    PipelineSpec,
    block_model,
    check_pipeline,
    known_models,
    load_spec,
    parse_spec,
)
from tritonforge.ensemble._limits import (
    MAX_COMBINER_INPUTS,
    MAX_ISSUES,
    MAX_NESTING,
    MAX_NODES,
    MAX_SPEC_CHARS,
)

# Hypothesis caches on disk (constants of the code under test, unicode tables) even without an example
# database: a per-process temp folder, removed at exit, instead of a .hypothesis/ in the working directory.
_HYPOTHESIS_HOME = Path(tempfile.gettempdir()) / f"tritonforge-hypothesis-{os.getpid()}"
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)

# Every issue is one line of readable size: the CLI prints one a line, and a hostile value must not
# turn into megabytes of text.
MAX_ISSUE_CHARS = 10_000
FUZZ = settings(
    max_examples=150,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    database=None,  # no .hypothesis/ folder left behind
    deadline=None,  # a shared CI box is slow now and then; hangs are caught by the timeout instead
    suppress_health_check=[HealthCheck.too_slow],
)

VALID_HEAD = "name: p\ninputs: [{name: x, dtype: FP32, dims: [8]}]\noutputs: [probs]\n"

CLF = ModelInfo(
    "clf",
    {"x": TensorSpec(name="x", dtype=DataType.FP32, dims=[8])},
    {"probs": TensorSpec(name="probs", dtype=DataType.FP32, dims=[3])},
    16,
    versions=(1,),
)
IDENT = ModelInfo(
    "ident",
    {"a": TensorSpec(name="a", dtype=DataType.FP32, dims=[4])},
    {"b": TensorSpec(name="b", dtype=DataType.FP32, dims=[4])},
    8,
    versions=(1, 2),
)
REPO_MODELS = {"clf": CLF, "ident": IDENT}


def assert_readable(issues: list[Issue]) -> None:
    assert all(isinstance(i, Issue) for i in issues)
    for issue in issues:
        text = str(issue)
        assert "\n" not in text and len(text) <= MAX_ISSUE_CHARS, text[:300]


def parse_and_check(text: str) -> tuple[PipelineSpec | None, list[Issue]]:
    """The whole offline path: parse, resolve building blocks, check against the repository's models."""
    spec, issues = parse_spec(text, default_name="fuzzed")
    assert_readable(issues)
    if spec is None:
        assert issues, "no spec must come with a reason"
        return None, issues
    models, found = known_models(None, [spec])
    assert_readable(found)
    resolved, checked = check_pipeline(spec, {**REPO_MODELS, **models})
    assert_readable(checked)
    assert (resolved is None) == bool(checked)
    return spec, [*issues, *found, *checked]


def peak_mib(fn: Callable[[], Any]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------ the fuzz run's finds


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("{1: a, b: c}", "key 1"),
        ("name: p\nnull: 1\ntrue: 2\n", "key None"),
        (VALID_HEAD + "steps: [{name: a, model: clf, inputs: {1: x}, outputs: [probs]}]", "steps[0].inputs"),
        (VALID_HEAD.replace("dims: [8]", "dims: [8], 3: 4, z: 5"), "inputs[0]"),
        (
            VALID_HEAD
            + "models: [{name: c, block: combiner, options: {1: a, inputs: 2, classes: 3}}]\n"
            + "steps: [{model: clf, inputs: [x], outputs: [probs]}]",
            "models[0].options",
        ),
    ],
    ids=["top-level", "null-and-bool", "input-map", "tensor-keys", "block-options"],
)
def test_parse_spec_reports_a_non_string_key_instead_of_raising_type_error(text: str, named: str) -> None:
    spec, issues = parse_and_check(text)
    assert spec is None
    assert any("not a string" in i.message and named in str(i) for i in issues), issues


@pytest.mark.parametrize(
    "text",
    [
        "name: []",
        "name: {a: 1}",
        VALID_HEAD + "steps: [{name: 1, model: clf, inputs: [x], outputs: [probs]}]",
        VALID_HEAD + "steps: [{name: [], model: clf, inputs: [x], outputs: [probs]}]",
        VALID_HEAD + "steps: [{name: {a: b}, model: clf, inputs: [x], outputs: [probs]}]",
        VALID_HEAD + "steps: [{model: [clf], inputs: [x], outputs: [probs]}]",
        VALID_HEAD + "route: [{model: clf, when: {tensor: [x], below: 1}}]",
        VALID_HEAD.replace("dtype: FP32", "dtype: {a: 1}")
        + "steps: [{model: clf, inputs: [x], outputs: [probs]}]",
        VALID_HEAD.replace("dtype: FP32", "dtype: [FP32]")
        + "steps: [{model: clf, inputs: [x], outputs: [probs]}]",
    ],
    ids=[
        "name-list",
        "name-map",
        "step-name-int",
        "step-name-list",
        "step-name-map",
        "model-list",
        "when-tensor",
        "dtype-map",
        "dtype-list",
    ],
)
def test_parse_spec_reports_an_unhashable_or_mistyped_name_instead_of_raising(text: str) -> None:
    _, issues = parse_and_check(text)
    assert issues


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 500, 5000])
def test_parse_spec_refuses_deep_nesting_instead_of_raising_recursion_error(depth: int) -> None:
    spec, issues = parse_and_check("[" * depth + "]" * depth)
    assert spec is None
    assert "nest more than" in issues[0].message and "line 1" in issues[0].message


def billion_laughs(levels: int, fan_out: int = 9) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * fan_out)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan_out)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"name: *a{levels - 1}", f"steps: *a{levels - 1}"])


@pytest.mark.timeout(60)
def test_parse_spec_refuses_an_alias_bomb_in_little_memory_and_text() -> None:
    text = billion_laughs(12)
    assert len(text) < 700  # 9**12 'lol's once expanded
    result: list[Any] = []
    peak = peak_mib(lambda: result.append(parse_spec(text)))
    spec, issues = result[0]
    assert spec is None and len(issues) == 1
    assert "aliases" in issues[0].message and str(MAX_NODES) in issues[0].message
    assert len(str(issues[0])) < 1_000
    assert peak < 50, f"{peak:.0f} MiB"


def test_parse_spec_still_reads_a_few_shared_aliases() -> None:
    text = """
        name: p
        x_tensor: &x {name: x, dtype: FP32, dims: [8]}
        inputs: [*x]
        outputs: [probs]
        steps: [{model: clf, inputs: [x], outputs: [probs]}]
    """.replace("        ", "")
    spec, issues = parse_and_check(text.replace("x_tensor", "description"))
    assert spec is not None and issues == []
    assert spec.inputs[0].dims == (8,)


def test_parse_spec_refuses_a_recursive_alias() -> None:
    spec, issues = parse_and_check("name: p\nsteps: &s [1, *s]\n")
    assert spec is None and "recursive alias" in issues[0].message


@pytest.mark.timeout(60)
def test_combiner_with_a_million_inputs_is_refused_with_its_limit_in_little_memory() -> None:
    text = (
        "name: p\nmodels: [{name: c, block: combiner, options: {inputs: 1000000, classes: 3}}]\n"
        "inputs: [{name: x, dtype: FP32, dims: [3]}]\noutputs: [LABEL]\n"
        "steps: [{model: c, inputs: {PROBS_0: x, PROBS_1: x}, outputs: [LABEL]}]"
    )
    result: list[Any] = []
    peak = peak_mib(lambda: result.append(parse_and_check(text)))
    _, issues = result[0]
    assert any("'inputs'" in i.message and str(MAX_COMBINER_INPUTS) in i.message for i in issues), issues
    assert peak < 20, f"{peak:.0f} MiB"


def test_block_model_raises_value_error_for_a_combiner_past_its_input_limit() -> None:
    with pytest.raises(ValueError, match=f"from 1 to {MAX_COMBINER_INPUTS}"):
        block_model("c", "combiner", {"inputs": MAX_COMBINER_INPUTS + 1, "classes": 3})
    assert len(block_model("c", "combiner", {"inputs": MAX_COMBINER_INPUTS, "classes": 3}).config.inputs) == (
        MAX_COMBINER_INPUTS
    )


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"inputs": 2, "classes": 3, "method": "weighted", "weights": [1e400, 1]}, "weights"),
        ({"inputs": 2, "classes": 3, "method": "weighted", "weights": [10**400, 1]}, "weights"),
        ({"inputs": 2, "classes": 3, "method": ["vote"]}, "method"),
        ({"inputs": 2, "classes": 2**70}, "classes"),
    ],
)
def test_block_model_raises_value_error_for_out_of_range_options(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        block_model("c", "combiner", options)


@pytest.mark.parametrize("padding", ["Bucket", "yes", True, ["bucket"], None])
def test_tokenizer_padding_is_none_or_bucket_and_anything_else_is_named(padding: Any) -> None:
    with pytest.raises(ValueError, match="'padding' must be 'none' or 'bucket'"):
        block_model("t", "tokenizer", {"padding": padding})
    assert "padding" not in block_model("t", "tokenizer", {"padding": "none"}).config.parameters
    assert block_model("t", "tokenizer", {"padding": "bucket"}).config.parameters["padding"] == "bucket"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("version", "9" * 5000),  # Python refuses int('9' * 5000)
        ("version", "0x" + "f" * 5000),  # a hex int converts, but has no repr
        ("max_batch_size", str(2**31)),
        ("instances", str(2**40)),
    ],
)
def test_parse_spec_reports_huge_numbers_as_issues(field: str, value: str) -> None:
    _, issues = parse_and_check(f"name: p\n{field}: {value}\n")
    assert any(field in i.message or "can't be read" in i.message for i in issues)


def test_parse_spec_reports_a_too_long_spec_without_parsing_it() -> None:
    spec, issues = parse_spec("#" * (MAX_SPEC_CHARS + 1))
    assert spec is None and f"at most {MAX_SPEC_CHARS}" in issues[0].message


def test_parse_spec_caps_the_issues_of_one_pipeline() -> None:
    text = (
        VALID_HEAD
        + "steps:\n"
        + "".join(f"  - {{model: m{i}, inputs: [x], outputs: [t{i}]}}\n" for i in range(900))
    )
    spec, issues = parse_and_check(text)
    assert spec is not None
    assert len(issues) == MAX_ISSUES + 1 and "more issue(s) not shown" in issues[-1].message


def test_check_reports_the_unknown_model_with_at_most_twenty_known_names() -> None:
    spec, _ = parse_spec(VALID_HEAD + "steps: [{model: nope, inputs: [x], outputs: [probs]}]")
    assert spec is not None
    many = {f"model_{i:03d}": CLF for i in range(500)}
    _, issues = check_pipeline(spec, many)
    assert "(+480 more)" in issues[0].message and "model_499" not in issues[0].message


def test_check_finds_a_cycle_through_a_thousand_chained_steps_without_recursion_error() -> None:
    steps = "".join(
        f"  - {{name: s{i}, model: ident, inputs: {{a: t{i}}}, outputs: {{b: t{i + 1}}}}}\n"
        for i in range(999)
    )
    steps += "  - {name: s999, model: ident, inputs: {a: t999}, outputs: {b: t0}}\n"
    head = "name: p\ninputs: [{name: x, dtype: FP32, dims: [4]}]\noutputs: [y]\n"
    _, issues = parse_and_check(head + "steps:\n" + steps)
    assert any("cycle" in i.message for i in issues)


# ----------------------------------------------------------------------------------- load_spec's files


def test_load_spec_reports_a_binary_file(tmp_path: Path) -> None:
    file = tmp_path / "b.yaml"
    file.write_bytes(b"name: p\n\xff\xfe\x00")
    spec, issues = load_spec(file)
    assert spec is None and "not UTF-8" in issues[0].message and issues[0].source == str(file)


def test_load_spec_reports_a_fifo_instead_of_blocking_on_it(tmp_path: Path) -> None:
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    spec, issues = load_spec(fifo)
    assert spec is None and "not a regular file" in issues[0].message


def test_load_spec_reports_a_folder(tmp_path: Path) -> None:
    spec, issues = load_spec(tmp_path)
    assert spec is None and "is a folder, not a regular file" in issues[0].message


def test_load_spec_reads_no_more_than_its_bound_of_a_huge_file(tmp_path: Path) -> None:
    file = tmp_path / "huge.yaml"
    with file.open("wb") as out:
        out.truncate(64 * 2**20)  # sparse: 64 MiB of NULs, no disk used
    result: list[Any] = []
    peak = peak_mib(lambda: result.append(load_spec(file)))
    spec, issues = result[0]
    assert spec is None and issues
    assert peak < 3 * 4 * MAX_SPEC_CHARS / 2**20, f"{peak:.0f} MiB"


# --------------------------------------------------------------------------------- property-based


KEYS = [
    "name", "version", "max_batch_size", "models", "inputs", "outputs", "steps", "route", "dynamic_batching",
    "instances", "route_output", "model", "fallback", "timeout_ms", "when", "tensor", "reduce", "below",
    "above", "block", "options", "dtype", "dims", "optional", "tokenizer", "max_length", "dim", "normalize",
    "classes", "method", "weights",
]  # fmt: skip
NAMES = st.sampled_from(["x", "probs", "a", "b", "t", "LABEL", "PROBS_0", "PROBS_1", "PROBABILITIES"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 300),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.sampled_from(KEYS),
    st.sampled_from(["FP32", "INT64", "BYTES", "combiner", "mean_pooling", "vote", "weighted", "clf", "max"]),
)
ANY_KEY = st.one_of(st.sampled_from(KEYS), st.integers(-2, 3), st.booleans(), st.none(), st.floats())
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_KEY, inner, max_size=4),
    max_leaves=12,
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the well-shaped value, sometimes junk in its place."""
    return st.one_of(strategy, strategy, strategy, JUNK)


TENSOR = maybe(
    NAMES
    | st.fixed_dictionaries(
        {"name": maybe(NAMES)},
        optional={
            "dtype": maybe(st.sampled_from(["FP32", "INT64", "BYTES", "TYPE_FP32"])),
            "dims": maybe(st.lists(st.integers(-2, 10), max_size=3)),
            "optional": JUNK,
        },
    )
)
NAME_MAP = maybe(st.dictionaries(NAMES, NAMES, max_size=3) | st.lists(NAMES, max_size=3))
STEP = maybe(
    st.fixed_dictionaries(
        {"model": maybe(st.sampled_from(["clf", "ident", "comb", "pool", "nope"]))},
        optional={"name": maybe(NAMES), "version": JUNK, "inputs": NAME_MAP, "outputs": NAME_MAP},
    )
)
OPTIONS = maybe(
    st.fixed_dictionaries(
        {},
        optional={
            "inputs": maybe(st.integers(0, 4)),
            "classes": maybe(st.integers(0, 4)),
            "method": maybe(st.sampled_from(["vote", "weighted", "average"])),
            "weights": JUNK,
            "dim": JUNK,
            "normalize": JUNK,
        },
    )
)
BLOCK = maybe(
    st.fixed_dictionaries(
        {
            "name": maybe(st.sampled_from(["comb", "pool", "clf"])),
            "block": maybe(st.sampled_from(["combiner", "mean_pooling", "nope"])),
        },
        optional={"options": OPTIONS, "max_batch_size": JUNK},
    )
)
CONDITION = maybe(
    st.fixed_dictionaries(
        {"tensor": maybe(NAMES)},
        optional={"reduce": maybe(st.sampled_from(["max", "min", "x"])), "below": JUNK, "above": JUNK},
    )
)
STAGE = maybe(
    st.fixed_dictionaries(
        {"model": maybe(st.sampled_from(["clf", "ident", "comb", "nope"]))},
        optional={
            "fallback": JUNK,
            "timeout_ms": JUNK,
            "when": CONDITION,
            "version": JUNK,
            "outputs": NAME_MAP,
        },
    )
)
SPEC = st.fixed_dictionaries(
    {"name": maybe(st.just("p"))},
    optional={
        "inputs": maybe(st.lists(TENSOR, max_size=3)),
        "outputs": maybe(st.lists(TENSOR, max_size=3)),
        "steps": maybe(st.lists(STEP, max_size=4)),
        "route": maybe(st.lists(STAGE, max_size=3)),
        "models": maybe(st.lists(BLOCK, max_size=2)),
        "max_batch_size": JUNK,
        "version": JUNK,
        "instances": JUNK,
        "dynamic_batching": JUNK,
        "route_output": JUNK,
    },
)


@FUZZ
@given(st.text(max_size=300))
def test_any_text_gives_a_spec_or_readable_issues(text: str) -> None:
    parse_and_check(text)


@FUZZ
@given(SPEC)
def test_any_spec_shaped_document_gives_a_spec_or_readable_issues(doc: dict[str, Any]) -> None:
    parse_and_check(yaml.safe_dump(doc))


@FUZZ
@given(st.dictionaries(ANY_KEY, JUNK, max_size=6))
def test_any_mapping_with_any_keys_gives_a_spec_or_readable_issues(doc: dict[Any, Any]) -> None:
    parse_and_check(yaml.safe_dump(doc))


@FUZZ
@given(st.integers(1, 30), st.integers(0, 2**32 - 1), st.integers(0, 2))
def test_a_well_formed_chain_in_any_order_checks_clean_and_resolves_its_types(
    length: int, seed: int, version: int
) -> None:
    """The 'correct result' half: a valid pipeline is accepted, whatever the order of its steps."""
    steps = [
        {"name": f"s{i}", "model": "ident", "inputs": {"a": f"t{i}"}, "outputs": {"b": f"t{i + 1}"}}
        | ({"version": version} if version else {})
        for i in range(length)
    ]
    random.Random(seed).shuffle(steps)
    doc = {
        "name": "chain",
        "inputs": [{"name": "t0", "dtype": "FP32", "dims": [4]}],
        "outputs": [f"t{length}"],
        "steps": steps,
    }
    spec, issues = parse_and_check(yaml.safe_dump(doc))
    assert issues == []
    resolved, _ = check_pipeline(spec, REPO_MODELS)  # type: ignore[arg-type]
    assert resolved is not None and resolved.max_batch_size == IDENT.max_batch_size
    assert [(t.name, t.dtype, tuple(t.dims)) for t in resolved.outputs] == [
        (f"t{length}", DataType.FP32, (4,))
    ]
