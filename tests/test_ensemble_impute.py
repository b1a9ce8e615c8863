"""Missing values in pipelines: the ``missing:`` policy of a pipeline input and the ``impute`` block.

Through the real embedded Triton: a pipeline with an impute step answers NaN/±inf rows exactly as its
model answers the imputed rows sent directly; a pipeline without one gets NaN refused by our client
(default) or passed on when the client allows it. The checker refuses a policy the graph doesn't keep.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import tiny_models
from tritonforge.client import Client
from tritonforge.config import DataType, read_config
from tritonforge.ensemble import check_specs, compile_all
from tritonforge.ensemble.blocks import block_model
from tritonforge.ensemble.compile import MISSING_PARAMETER
from tritonforge.errors import InvalidRequestError
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer

FEATURES = 8
MEANS = [0.5, -1.0, 2.0, 0.0, 1.5, -0.25, 3.0, -2.0]
FILL = 0.75

SPECS = {
    "impute_mean.yaml": """
        name: impute_mean
        models:
          - {name: mean_filler, block: impute, options: {features: 8, strategy: mean, means: means.npy}}
        inputs:
          - {name: x, dtype: FP32, dims: [8], missing: impute}
        outputs: [probs, MISSING]
        steps:
          - name: fill
            model: mean_filler
            inputs: {INPUT: x}
            outputs: {OUTPUT: x_filled, MISSING: MISSING}
          - {name: classify, model: clf, inputs: {x: x_filled}, outputs: [probs]}
        """,
    "impute_constant.yaml": f"""
        name: impute_constant
        models:
          - {{name: constant_filler, block: impute, options: {{strategy: constant, value: {FILL}}}}}
        inputs:
          - {{name: x, dtype: FP32, dims: [8], missing: impute}}
        outputs: [probs]
        steps:
          - {{name: fill, model: constant_filler, inputs: {{INPUT: x}}, outputs: {{OUTPUT: x_filled}}}}
          - {{name: classify, model: clf, inputs: {{x: x_filled}}, outputs: [probs]}}
        """,
    "plain.yaml": """
        name: plain
        inputs:
          - {name: x, dtype: FP32, dims: [8]}
        outputs: [probs]
        steps:
          - {name: classify, model: clf, inputs: [x], outputs: [probs]}
        """,
}


def write_specs(folder: Path, specs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in specs.items():
        (folder / name).write_text(textwrap.dedent(text))
    np.save(folder / "means.npy", np.array(MEANS, dtype=np.float64))
    return folder


def with_holes(rows: int, seed: int) -> np.ndarray:
    """Random rows with NaN, +inf and -inf in some places (and some rows left whole)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
    holes = rng.random((rows, FEATURES)) < 0.3
    holes[::3] = False  # every third row complete
    x[holes] = rng.choice(np.array([np.nan, np.inf, -np.inf], dtype=np.float32), size=int(holes.sum()))
    return x


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, EmbeddedServer]]:
    root = tmp_path_factory.mktemp("impute")
    repo = root / "repo"
    add_model(repo, "clf", tiny_models.mlp_onnx(root / "_src" / "clf.onnx"), max_batch_size=32)
    compile_all(write_specs(root / "specs", SPECS), repo)
    with EmbeddedServer(repo) as server:
        yield repo, server


@pytest.fixture()
def client(served: tuple[Path, EmbeddedServer]) -> Iterator[Client]:
    with Client(served[1].grpc_url, registry=CollectorRegistry(), allow_non_finite={"x"}) as connection:
        yield connection


def test_mean_impute_step_answers_nan_and_inf_rows_as_the_model_answers_the_filled_rows(
    client: Client,
) -> None:
    x = with_holes(12, seed=1)
    got = client.infer("impute_mean", {"x": x})
    missing = ~np.isfinite(x)
    filled = np.where(missing, np.array(MEANS, dtype=np.float32), x)
    np.testing.assert_array_equal(got["MISSING"], missing)
    np.testing.assert_array_equal(got["probs"], client.infer("clf", {"x": filled})["probs"])
    assert np.isfinite(got["probs"]).all()


def test_constant_impute_step_fills_every_hole_with_its_value(client: Client) -> None:
    x = with_holes(7, seed=2)
    filled = np.where(np.isfinite(x), x, np.float32(FILL))
    got = client.infer("impute_constant", {"x": x})["probs"]
    np.testing.assert_array_equal(got, client.infer("clf", {"x": filled})["probs"])


def test_impute_answers_requests_batched_together_as_it_answers_each_alone(client: Client) -> None:
    requests = [with_holes(1 + k % 5, seed=10 + k) for k in range(24)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda x: client.infer("impute_mean", {"x": x}), requests))
    for x, got in zip(requests, answers, strict=True):
        filled = np.where(np.isfinite(x), x, np.array(MEANS, dtype=np.float32))
        np.testing.assert_array_equal(got["probs"], client.infer("clf", {"x": filled})["probs"])


def test_nan_into_a_pipeline_without_impute_is_refused_by_the_client_naming_input_and_rows(
    served: tuple[Path, EmbeddedServer],
) -> None:
    x = np.zeros((4, FEATURES), np.float32)
    x[1, 2] = np.nan
    x[3, 0] = np.inf
    with (
        Client(served[1].grpc_url, registry=CollectorRegistry()) as strict,
        pytest.raises(InvalidRequestError) as caught,
    ):
        strict.infer("plain", {"x": x})
    assert "'x'" in caught.value.message and "rows [1, 3]" in caught.value.message


def test_nan_into_a_pipeline_without_impute_goes_through_when_the_client_allows_it(client: Client) -> None:
    x = np.zeros((3, FEATURES), np.float32)
    x[1, 2] = np.nan
    probs = client.infer("plain", {"x": x})["probs"]
    assert np.isnan(probs[1]).all() and np.isfinite(probs[[0, 2]]).all()  # what imputation spares you


def test_compiled_pipelines_carry_their_inputs_missing_policy(served: tuple[Path, EmbeddedServer]) -> None:
    repo, _ = served
    assert json.loads(read_config(repo / "impute_mean").parameters[MISSING_PARAMETER]) == {"x": "impute"}
    assert json.loads(read_config(repo / "plain").parameters[MISSING_PARAMETER]) == {"x": "reject"}
    filler = read_config(repo / "mean_filler")
    assert [(t.name, t.dtype, list(t.dims)) for t in filler.outputs] == [
        ("OUTPUT", DataType.FP32, [8]),
        ("MISSING", DataType.BOOL, [8]),
    ]
    assert json.loads(filler.parameters["fill"]) == MEANS


# ------------------------------------------------------------------------------------------- checks


@pytest.fixture(scope="module")
def models_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("impute_check")
    add_model(root / "repo", "clf", tiny_models.mlp_onnx(root / "_src" / "clf.onnx"), max_batch_size=32)
    return root / "repo"


def issues_of(tmp_path: Path, repo: Path, text: str) -> list[str]:
    _, issues = check_specs([write_specs(tmp_path / "specs", {"p.yaml": text})], repo)
    return [str(i) for i in issues]


def test_check_refuses_an_imputed_input_that_a_model_reads_directly(
    tmp_path: Path, models_repo: Path
) -> None:
    issues = issues_of(
        tmp_path,
        models_repo,
        """
        name: p
        inputs: [{name: x, dtype: FP32, dims: [8], missing: impute}]
        outputs: [probs]
        steps: [{name: classify, model: clf, inputs: [x], outputs: [probs]}]
        """,
    )
    assert len(issues) == 1
    assert "step 'classify', tensor 'x': pipeline input 'x' is declared missing: impute" in issues[0]
    assert "would see NaN/inf" in issues[0]
    assert "Fix: feed the input to an 'impute' building block" in issues[0]


def test_check_refuses_an_impute_step_on_an_input_declared_reject_or_not_float(
    tmp_path: Path, models_repo: Path
) -> None:
    issues = issues_of(
        tmp_path,
        models_repo,
        """
        name: p
        models: [{name: f, block: impute, options: {features: 8}}]
        inputs:
          - {name: x, dtype: FP32, dims: [8]}
          - {name: ids, dtype: INT64, dims: [8], missing: impute}
          - {name: y, dtype: FP32, dims: [8], missing: sometimes}
        outputs: [probs]
        steps:
          - {name: fill, model: f, inputs: {INPUT: x}, outputs: {OUTPUT: xf}}
          - {name: classify, model: clf, inputs: {x: xf}, outputs: [probs]}
        """,
    )
    text = "\n".join(issues)
    assert "step 'fill' imputes pipeline input 'x', which is declared missing: reject" in text
    assert "input 'ids' is INT64" in text
    assert "'missing' must be one of ['reject', 'allow', 'impute'], got 'sometimes'" in text


def test_check_refuses_imputing_in_a_routed_pipeline_and_accepts_allow(
    tmp_path: Path, models_repo: Path
) -> None:
    routed = """
        name: p
        inputs: [{name: x, dtype: FP32, dims: [8], missing: %s}]
        outputs: [probs]
        route: [clf]
        """
    issues = issues_of(tmp_path, models_repo, routed % "impute")
    assert len(issues) == 1 and "a routed pipeline can't impute input 'x'" in issues[0]
    assert issues_of(tmp_path, models_repo, routed % "allow") == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "median"}, "'strategy' must be one of ['constant', 'mean'], got 'median'"),
        ({"value": float("nan")}, "'value' must be a finite number, got nan"),
        ({"value": "zero"}, "'value' must be a finite number, got 'zero'"),
        ({"strategy": "mean"}, "strategy 'mean' needs 'features'"),
        ({"strategy": "mean", "features": 2, "means": [1.0]}, "'means' must hold 2 finite numbers"),
        ({"strategy": "mean", "features": 2, "means": [1.0, 1e400]}, "'means' must hold 2 finite numbers"),
        ({"strategy": "mean", "features": 2, "means": "nowhere.npy"}, "can't read means file"),
        ({"strategy": "mean", "features": 2, "means": "m.csv"}, "must end in .json or .npy"),
        ({"strategy": "mean", "features": 2, "means": "."}, "must end in .json or .npy"),
        ({"strategy": "mean", "features": 2, "means": [1, 2], "value": 3}, "'value' only applies"),
        ({"means": [1, 2]}, "'means' only apply to strategy 'mean'"),
        ({"features": 10**9}, "'features' must be an integer from 1 to 65536"),
        ({"features": True}, "'features' must be an integer"),
        ({"dtype": "INT64"}, "'dtype' must be one of ['FP32', 'FP64'], got 'INT64'"),
        ({"fill": 1}, "block 'impute' has no options ['fill']"),
    ],
)
def test_impute_block_refuses_bad_options_with_a_clear_message(
    tmp_path: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError) as caught:
        block_model("f", "impute", options, base_dir=tmp_path)
    assert message in str(caught.value)
    assert len(str(caught.value)) < 400


def test_impute_block_reads_means_from_a_json_file_and_serves_fp64(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text("[1, 2.5]")
    built = block_model(
        "f",
        "impute",
        {"strategy": "mean", "features": 2, "means": "m.json", "dtype": "FP64"},
        base_dir=tmp_path,
    )
    assert json.loads(built.config.parameters["fill"]) == [1.0, 2.5]
    assert [t.dtype for t in built.config.inputs] == [DataType.FP64]


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=4),
    st.sampled_from(["constant", "mean", "FP32", "FP64", "m.json", "m.npy", "bad.json", "/dev/null.npy"]),
)


@settings(
    max_examples=150,
    derandomize=True,  # the same examples on every run: a CI failure reproduces locally
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    options=st.dictionaries(
        st.sampled_from(["features", "dtype", "strategy", "value", "means", "other"]), ANY_VALUE, max_size=5
    )
)
def test_impute_block_gives_a_config_or_a_value_error_for_any_options(
    tmp_path: Path, options: dict[str, object]
) -> None:
    (tmp_path / "m.json").write_text("[1, 2, 3, 4]")
    (tmp_path / "bad.json").write_text("[" * 100_000)
    np.save(tmp_path / "m.npy", np.arange(4.0))
    try:
        built = block_model("f", "impute", options, base_dir=tmp_path)
    except ValueError as exc:
        assert "\n" not in str(exc) and len(str(exc)) < 600
        return
    fill = json.loads(built.config.parameters["fill"])
    assert np.isfinite(fill).all()
    assert built.config.inputs[0].dtype in (DataType.FP32, DataType.FP64)
