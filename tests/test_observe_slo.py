"""SLOs as code: the YAML is checked, the rules pass the real promtool (check + unit tests), the
dashboard is a Grafana JSON model with a row per model, an ensemble's composing models included."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml

from cli_runner import run_tritonforge
from promserver import promtool
from tritonforge.config import (
    DataType,
    EnsembleStep,
    ModelConfig,
    TensorSpec,
    read_config,
    write_config,
)
from tritonforge.observe.slo import SLOError, dashboard, load_slo, rules, write

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = PROJECT_ROOT / "observe" / "slo.example.yaml"

UNIT_SLO = """
window: 1m
for: 1m
models:
  slow:   {p99_latency_ms: 50, mean_latency_ms: 50, error_rate: 0.05, queue_ms: 10}
  fine:   {p99_latency_ms: 50, mean_latency_ms: 50, error_rate: 0.05, queue_ms: 10}
  broken: {error_rate: 0.05}
  drifty: {max_drift_psi: 0.25}
"""


def _slo(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slo.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: {m: {p99_latency_ms: 5}}\nwindw: 5m\n", "unknown key(s) ['windw']"),
        ("window: five\nmodels: {m: {p99_latency_ms: 5}}\n", "not a Prometheus duration"),
        ("models: {m: {error_rate: 5}}\n", "must be at most 1.0"),
        ("models: {m: {p99_latency_ms: -1}}\n", "must be a finite number above 0"),
        ("models: {m: {p99: 5}}\n", "objectives are p99_latency_ms"),
        ("window: 5m\n", "`models:` must map each model name"),
        ("models: [\n", "the YAML does not parse"),
        # hostile input: alerts that could never fire, or that always would
        ("models: {m: {error_rate: .nan}}\n", "models.m.error_rate: nan must be a finite number"),
        ("models: {m: {p99_latency_ms: .inf}}\n", "models.m.p99_latency_ms: inf must be a finite number"),
        ("models: {m: {queue_ms: -.inf}}\n", "must be a finite number above 0"),
        ("models: {m: {mean_latency_ms: true}}\n", "must be a finite number above 0"),
        ("models: {'': {error_rate: 0.1}}\n", "model names must be non-empty strings"),
        ("models: {'x\"} or vector(1) #': {error_rate: 0.1}}\n", "is not a usable model name"),
        ("models: {'a b': {error_rate: 0.1}}\n", "is not a usable model name"),
        ("models: {1: {error_rate: 0.1}}\n", "key 1 under models is not a string"),
        ("models: {m: {error_rate: 0.1}}\nmodels: {n: {error_rate: 0.1}}\n", "(lines 1 and 2)"),
        ("models:\n  m: {error_rate: 0.1}\n  m: {error_rate: 0.2}\n", "key 'm' appears twice"),
        ("selector: 'job=\"x\"} or vector(1) #'\nmodels: {m: {error_rate: 0.1}}\n", "not a list of PromQL"),
        ("severity: '{{ $labels }}'\nmodels: {m: {error_rate: 0.1}}\n", "severity"),
        ("ensembles: [a]\nmodels: {m: {error_rate: 0.1}}\n", "ensembles: ['a'] must be a folder path"),
    ],
)
def test_load_slo_raises_slo_error_naming_the_key_when_the_file_is_wrong(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(SLOError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_slo(_slo(tmp_path, text))


def test_example_slo_expands_each_pipeline_into_rows_of_its_composing_models() -> None:
    spec = load_slo(EXAMPLE)
    # the example names the project's repository: once built, its compiled pipelines decide the rows
    compiled = PROJECT_ROOT / "model_repository"
    vote, text = compiled / "digits_vote" / "config.pbtxt", compiled / "text_embedding" / "config.pbtxt"
    under_vote = [model for model, parent in spec.rows if parent == "digits_vote"]
    assert under_vote == (
        _steps(vote)
        if vote.is_file()
        else ["digits_logreg", "digits_mlp", "digits_random_forest", "digits_vote_combiner"]
    )
    under_text = [model for model, parent in spec.rows if parent == "text_embedding"]
    assert under_text == (
        _steps(text) if text.is_file() else ["minilm_tokenizer", "minilm_encoder", "mean_pool_384"]
    )
    assert spec.rows[0] == ("digits_vote", None)


def _steps(config_file: Path) -> list[str]:
    return list(dict.fromkeys(s.model_name for s in read_config(config_file).ensemble_steps or ()))


def test_rows_follow_the_compiled_pipeline_in_the_repository_not_the_spec(tmp_path: Path) -> None:
    # the compiler fused text_embedding's encoder and pooling: the fused model takes the traffic
    repo = tmp_path / "repo"
    fused = ModelConfig(
        name="text_embedding",
        platform="ensemble",
        inputs=(TensorSpec(name="text", dtype=DataType.STRING, dims=(1,)),),
        outputs=(TensorSpec(name="embedding", dtype=DataType.FP32, dims=(384,)),),
        ensemble_steps=(
            EnsembleStep(
                model_name="minilm_tokenizer", input_map={"TEXT": "text"}, output_map={"IDS": "ids"}
            ),
            EnsembleStep(
                model_name="minilm_encoder_v1__mean_pool_384",
                input_map={"input_ids": "ids"},
                output_map={"EMBEDDING": "embedding"},
            ),
        ),
    )
    write_config(fused, repo / "text_embedding" / "config.pbtxt")
    slo = tmp_path / "slo" / "slo.yaml"
    slo.parent.mkdir()
    slo.write_text(
        f"ensembles: {PROJECT_ROOT / 'ensembles'}\nrepository: {repo}\n"
        "models:\n  text_embedding: {error_rate: 0.01}\n  digits_vote: {error_rate: 0.01}\n"
    )
    spec = load_slo(slo)
    under_text = [model for model, parent in spec.rows if parent == "text_embedding"]
    assert under_text == ["minilm_tokenizer", "minilm_encoder_v1__mean_pool_384"]
    # a pipeline the repository does not hold compiled keeps its spec's models
    under_vote = [model for model, parent in spec.rows if parent == "digits_vote"]
    assert under_vote == ["digits_logreg", "digits_mlp", "digits_random_forest", "digits_vote_combiner"]


def test_a_repository_that_is_not_a_folder_is_an_slo_error_naming_it(tmp_path: Path) -> None:
    slo = _slo(
        tmp_path,
        f"ensembles: {PROJECT_ROOT / 'ensembles'}\nrepository: {tmp_path / 'nowhere'}\n"
        "models:\n  text_embedding: {error_rate: 0.01}\n",
    )
    with pytest.raises(SLOError, match=r"repository: .*nowhere is not a model repository"):
        load_slo(slo)


def test_example_rules_pass_promtool_check_rules(tmp_path: Path, prometheus_bin: Path) -> None:
    written = write(load_slo(EXAMPLE), tmp_path / "out")
    done = promtool("check", "rules", str(written["rules"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _series(
    model: str, *, success: str, failure: str, p99_us: float, duration: str, queue: str
) -> list[dict]:
    labels = f'model="{model}",version="1"'
    return [
        {"series": f"nv_inference_request_success{{{labels}}}", "values": success},
        {"series": f'nv_inference_request_failure{{{labels},reason="BACKEND"}}', "values": failure},
        {
            "series": f'nv_inference_request_summary_us{{{labels},quantile="0.99"}}',
            "values": f"{p99_us:g}x20",
        },
        {"series": f"nv_inference_request_duration_us{{{labels}}}", "values": duration},
        {"series": f"nv_inference_queue_duration_us{{{labels}}}", "values": queue},
    ]


def _alert(name: str, model: str, slo: str, summary: str, description: str, objective: str = "") -> dict:
    objective = objective or summary.rpartition("(")[2].rstrip(")").removesuffix("ms")
    return {
        "exp_labels": {"severity": "page", "slo": slo, "model": model, "objective": objective},
        "exp_annotations": {"summary": summary, "description": description},
    }


def test_rules_fire_for_the_slow_and_the_failing_model_only_after_for_in_promtool_unit_tests(
    tmp_path: Path, prometheus_bin: Path
) -> None:
    write(load_slo(_slo(tmp_path, UNIT_SLO)), tmp_path)
    # per 15 s: slow answers 10 requests taking 90 ms each, fine 10 taking 1 ms, broken fails half of its
    series = [
        *_series(
            "slow",
            success="0+10x20",
            failure="0+0x20",
            p99_us=90_000,
            duration="0+900000x20",
            queue="0+1000x20",
        ),
        *_series(
            "fine",
            success="0+10x20",
            failure="0+0x20",
            p99_us=1_000,
            duration="0+10000x20",
            queue="0+1000x20",
        ),
        *_series(
            "broken", success="0+5x20", failure="0+5x20", p99_us=1_000, duration="0+5000x20", queue="0+500x20"
        ),
    ]
    slow_p99 = _alert(
        "TritonModelP99LatencyHigh",
        "slow",
        "p99_latency_ms",
        "slow: p99 latency above its objective (50ms)",
        "p99 latency of slow over 1m is 90ms (objective 50ms) for 1m.",
    )
    slow_mean = _alert(
        "TritonModelMeanLatencyHigh",
        "slow",
        "mean_latency_ms",
        "slow: mean latency above its objective (50ms)",
        "mean latency of slow over 1m is 90ms (objective 50ms) for 1m.",
    )
    broken = _alert(
        "TritonModelErrorRateHigh",
        "broken",
        "error_rate",
        "broken: error rate above its objective (0.05)",
        "error rate of broken over 1m is 0.5 (objective 0.05) for 1m.",
    )
    # what `tritonforge drift --metrics-file` exports, for a drifted model and a calm one
    series += [
        {
            "series": 'tritonforge_drift_psi{model="drifty",version="1",feature="input[3]"}',
            "values": "0.3x20",
        },
        {
            "series": 'tritonforge_drift_psi{model="drifty",version="1",feature="input[4]"}',
            "values": "0.01x20",
        },
    ]
    drifty = _alert(
        "TritonModelInputDrift",
        "drifty",
        "max_drift_psi",
        "drifty: traffic drifted from its reference profile",
        "largest feature PSI of drifty is 0.3 (objective 0.25); run `tritonforge drift` for the report.",
        "0.25",
    )
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "alert_rule_test": [
                    # not yet: the breach has not lasted `for: 1m`
                    {"eval_time": "45s", "alertname": "TritonModelP99LatencyHigh", "exp_alerts": []},
                    {"eval_time": "4m", "alertname": "TritonModelP99LatencyHigh", "exp_alerts": [slow_p99]},
                    {"eval_time": "4m", "alertname": "TritonModelMeanLatencyHigh", "exp_alerts": [slow_mean]},
                    {"eval_time": "4m", "alertname": "TritonModelErrorRateHigh", "exp_alerts": [broken]},
                    {"eval_time": "4m", "alertname": "TritonModelQueueTimeHigh", "exp_alerts": []},
                    {"eval_time": "1m", "alertname": "TritonModelInputDrift", "exp_alerts": [drifty]},
                ],
                "promql_expr_test": [
                    {
                        "expr": 'model:tritonforge_error_ratio:rate1m{model="broken"}',
                        "eval_time": "4m",
                        "exp_samples": [
                            {"labels": 'model:tritonforge_error_ratio:rate1m{model="broken"}', "value": 0.5}
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = promtool("test", "rules", "rules.test.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_wrong_expectation_fails_promtool_unit_tests(tmp_path: Path, prometheus_bin: Path) -> None:
    """The unit test above can fail: expecting the healthy model to alert is caught."""
    write(load_slo(_slo(tmp_path, UNIT_SLO)), tmp_path)
    series = _series(
        "fine", success="0+10x20", failure="0+0x20", p99_us=1_000, duration="0+10000x20", queue="0+1000x20"
    )
    wrong = _alert("TritonModelP99LatencyHigh", "fine", "p99_latency_ms", "x", "y")
    tests = {
        "rule_files": ["rules.yml"],
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "TritonModelP99LatencyHigh", "exp_alerts": [wrong]}
                ],
            }
        ],
    }
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = promtool("test", "rules", "rules.test.yml", cwd=tmp_path)
    assert done.returncode != 0


def test_dashboard_is_a_grafana_model_with_a_row_and_four_panels_per_model(tmp_path: Path) -> None:
    spec = load_slo(EXAMPLE)
    written = write(spec, tmp_path)
    board = json.loads(written["dashboard"].read_text())
    rows = [p for p in board["panels"] if p["type"] == "row"]
    # a row per pipeline, then one per model it runs (the compiled pipeline's, when the repository is built)
    under_vote = [model for model, parent in spec.rows if parent == "digits_vote"]
    assert [r["title"] for r in rows][: 1 + len(under_vote)] == [
        "digits_vote",
        *(f"digits_vote / {model}" for model in under_vote),
    ]
    assert under_vote
    assert len(rows) == len(spec.rows)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [p for p in board["panels"] if p["type"] == "timeseries"]
    assert len(graphs) == 4 * len(rows)
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
        assert panel["gridPos"]["w"] == 6
    assert board["templating"]["list"][0]["type"] == "datasource"
    # the objective is drawn on its panel
    vote_errors = next(p for p in graphs if p["title"] == "digits_vote: Error ratio")
    steps = vote_errors["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == 0.01


def test_models_sharing_an_objective_share_one_alert_rule(tmp_path: Path) -> None:
    spec = load_slo(_slo(tmp_path, UNIT_SLO))
    alerts = rules(spec)["groups"][1]["rules"]
    by_slo = {(a["labels"]["slo"], a["expr"]) for a in alerts}
    # slow, fine and broken share error_rate 0.05: one rule selecting the three; one model: an exact match
    assert by_slo == {
        ("p99_latency_ms", 'model:tritonforge_latency_p99_ms:max{model=~"slow|fine"} > 50'),
        ("mean_latency_ms", 'model:tritonforge_latency_mean_ms:rate1m{model=~"slow|fine"} > 50'),
        ("error_rate", 'model:tritonforge_error_ratio:rate1m{model=~"slow|fine|broken"} > 0.05'),
        ("queue_ms", 'model:tritonforge_queue_mean_ms:rate1m{model=~"slow|fine"} > 10'),
        ("max_drift_psi", 'max by (model) (tritonforge_drift_psi{model="drifty"}) > 0.25'),
    }
    assert all("model" not in a["labels"] for a in alerts)  # each firing series names its model
    assert dashboard(spec)["panels"][0]["title"] == "slow"


def test_rules_and_dashboard_stay_the_same_size_at_500_models_and_pass_promtool(
    tmp_path: Path, prometheus_bin: Path
) -> None:
    """500 models with two objective sets: a handful of rules and a dashboard of one repeated row."""
    lines = ["window: 1m", "for: 1m", "models:"]
    lines += [
        f"  m.{i:03d}: {{error_rate: {0.01 if i % 2 else 0.05}, mean_latency_ms: 20}}" for i in range(500)
    ]
    spec = load_slo(_slo(tmp_path, "\n".join(lines) + "\n"))
    groups = rules(spec)["groups"]
    assert len(groups[0]["rules"]) == 9  # recording rules: aggregated by model, whatever their number
    assert len(groups[1]["rules"]) == 3  # error_rate at 0.01 and at 0.05, mean latency at 20
    write(spec, tmp_path)
    checked = promtool("check", "rules", str(tmp_path / "rules.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    board = dashboard(spec)
    assert len(board["panels"]) == 10  # an overview row of 4, one row of 4 repeated per chosen model
    repeated = [p for p in board["panels"] if p.get("repeat")]
    assert [p["repeat"] for p in repeated] == ["model"]
    variable = board["templating"]["list"][1]
    assert variable["name"] == "model" and len(variable["options"]) == 500 and variable["multi"]
    graphs = [p for p in board["panels"] if p["type"] == "timeseries"]
    assert all('model="$model"' in t["expr"] for p in graphs[4:] for t in p["targets"])
    # the mean latency objective is shared, so drawn; the error rates differ, so not
    latency = next(p for p in graphs if p["title"] == "$model: Latency")
    assert latency["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == 20
    errors = next(p for p in graphs if p["title"] == "$model: Error ratio")
    assert len(errors["fieldConfig"]["defaults"]["thresholds"]["steps"]) == 1
    # the regex of a group matches its models literally: "m.001" is not matched by "m0001"
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    *_series(
                        "m.001",
                        success="0+5x20",
                        failure="0+5x20",
                        p99_us=1_000,
                        duration="0+5000x20",
                        queue="0+500x20",
                    ),
                    *_series(
                        "mx001",
                        success="0+5x20",
                        failure="0+5x20",
                        p99_us=1_000,
                        duration="0+5000x20",
                        queue="0+500x20",
                    ),
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "4m",
                        "alertname": "TritonModelErrorRateHigh",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "slo": "error_rate",
                                    "model": "m.001",
                                    "objective": "0.01",
                                },
                                "exp_annotations": {
                                    "summary": "m.001: error rate above its objective (0.01)",
                                    "description": "error rate of m.001 over 1m is 0.5 (objective 0.01) "
                                    "for 1m.",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = promtool("test", "rules", "rules.test.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_slo_cli_writes_both_files_and_fails_on_one_line_for_a_bad_file(tmp_path: Path) -> None:
    done = run_tritonforge("slo", str(EXAMPLE), "--out", str(tmp_path / "out"), timeout=120, columns=None)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "rules.yml").is_file() and (tmp_path / "out" / "dashboard.json").is_file()
    assert "digits_random_forest" in done.stdout  # composing models listed, names whole
    bad = _slo(tmp_path, "models: {m: {error_rate: 2}}\n")
    done = run_tritonforge("slo", str(bad), "--out", str(tmp_path / "bad"), timeout=120, columns=None)
    assert done.returncode == 1 and done.stderr.strip().count("\n") == 0
    assert "models.m.error_rate" in done.stderr and not (tmp_path / "bad").exists()


def test_a_selector_of_label_matchers_is_kept(tmp_path: Path) -> None:
    text = 'selector: \'{job="triton", namespace=~"prod-.*"}\'\nmodels: {m: {error_rate: 0.1}}\n'
    assert load_slo(_slo(tmp_path, text)).selector == 'job="triton", namespace=~"prod-.*"'


def test_an_slo_file_that_is_a_fifo_or_a_device_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(SLOError, match="is a FIFO"):
        load_slo(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    with pytest.raises(SLOError, match=r"a symlink to /dev/zero.* is a character device"):
        load_slo(zero)


def test_a_model_name_holding_promql_can_not_make_an_alert_that_always_fires(
    tmp_path: Path, prometheus_bin: Path
) -> None:
    """A hand-built spec bypasses load_slo's name check: its rules still quote the name as a label value.

    Unescaped, ``x"} or vector(1) #`` made ``...{model="x"} or vector(1) #"} > 0.01``: an alert firing
    with no traffic at all. Escaped, it selects a model of that exact name, which sends nothing here.
    """
    hostile = 'x"} or vector(1) #'
    spec = load_slo(
        _slo(tmp_path, "window: 1m\nfor: 1m\nmodels: {fine: {error_rate: 0.01, max_drift_psi: 0.2}}\n")
    )
    spec = dataclasses.replace(
        spec,
        objectives=tuple(dataclasses.replace(o, model=hostile) for o in spec.objectives),
        rows=((hostile, None),),
    )
    write(spec, tmp_path)
    assert promtool("check", "rules", str(tmp_path / "rules.yml")).returncode == 0
    series = _series(
        "fine", success="0+10x20", failure="0+10x20", p99_us=1_000, duration="0+10000x20", queue="0+1000x20"
    )
    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "TritonModelErrorRateHigh", "exp_alerts": []},
                    {"eval_time": "4m", "alertname": "TritonModelInputDrift", "exp_alerts": []},
                ],
            }
        ],
    }
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = promtool("test", "rules", "rules.test.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # the dashboard's queries quote it the same way
    assert all(hostile not in t["expr"] for p in dashboard(spec)["panels"] for t in p.get("targets", []))


GPU_SLO = """
window: 1m
for: 1m
gpu_utilization_max: 0.9
gpu_memory_max: 0.8
models:
  fine: {error_rate: 0.05}
"""


def test_gpu_objectives_alert_per_gpu_in_promtool_unit_tests(tmp_path: Path, prometheus_bin: Path) -> None:
    """Per GPU, on Triton's gauges by gpu_uuid: the busy, full GPU alerts on both; the calm one on neither."""
    write(load_slo(_slo(tmp_path, GPU_SLO)), tmp_path)
    assert promtool("check", "rules", str(tmp_path / "rules.yml")).returncode == 0
    hot, calm = "GPU-c06bbf33-c250-ca45-579b-19134b518844", "GPU-1b2e7f0a-9d3c-4e8b-a1f2-0c9d8e7f6a5b"
    where = 'instance="gpu-node:8002",job="triton"'
    series = [
        {"series": f'nv_gpu_utilization{{{where},gpu_uuid="{hot}"}}', "values": "0.97x20"},
        {"series": f'nv_gpu_utilization{{{where},gpu_uuid="{calm}"}}', "values": "0.3x20"},
        {"series": f'nv_gpu_memory_total_bytes{{{where},gpu_uuid="{hot}"}}', "values": "42949672960x20"},
        {"series": f'nv_gpu_memory_total_bytes{{{where},gpu_uuid="{calm}"}}', "values": "42949672960x20"},
        # 38 of 40 GiB used (0.95) on the hot one, 10 GiB (0.25) on the calm one
        {"series": f'nv_gpu_memory_used_bytes{{{where},gpu_uuid="{hot}"}}', "values": "40802189312x20"},
        {"series": f'nv_gpu_memory_used_bytes{{{where},gpu_uuid="{calm}"}}', "values": "10737418240x20"},
    ]

    def fired(objective: str, what: str, value: str, threshold: str) -> dict[str, object]:
        gpu = f"{hot} on gpu-node:8002"
        return {
            "exp_labels": {
                "severity": "page",
                "slo": objective,
                "instance": "gpu-node:8002",
                "gpu_uuid": hot,
            },
            "exp_annotations": {
                "summary": f"{gpu}: {what} above its objective ({threshold})",
                "description": f"{what} of {gpu} is {value} (objective {threshold}) for 1m.",
            },
        }

    tests = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "30s", "alertname": "TritonGPUUtilizationHigh", "exp_alerts": []},  # < for
                    {
                        "eval_time": "3m",
                        "alertname": "TritonGPUUtilizationHigh",
                        "exp_alerts": [fired("gpu_utilization_max", "GPU utilization", "0.97", "0.9")],
                    },
                    {
                        "eval_time": "3m",
                        "alertname": "TritonGPUMemoryHigh",
                        "exp_alerts": [fired("gpu_memory_max", "GPU memory used", "0.95", "0.8")],
                    },
                ],
                "promql_expr_test": [
                    {
                        "expr": f'gpu:tritonforge_memory_used_ratio:max{{gpu_uuid="{calm}"}}',
                        "eval_time": "3m",
                        "exp_samples": [
                            {
                                "labels": "gpu:tritonforge_memory_used_ratio:max"
                                f'{{instance="gpu-node:8002",gpu_uuid="{calm}"}}',
                                "value": 0.25,
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    done = promtool("test", "rules", "rules.test.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    # the calm GPU alerting would be caught: the same test expecting it fails
    tests["tests"][0]["alert_rule_test"][1]["exp_alerts"][0]["exp_labels"]["gpu_uuid"] = calm  # type: ignore[index]
    (tmp_path / "rules.test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    assert promtool("test", "rules", "rules.test.yml", cwd=tmp_path).returncode != 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("gpu_utilization_max: 1.5", "gpu_utilization_max: 1.5 must be at most 1.0"),
        ("gpu_memory_max: .nan", "gpu_memory_max: nan must be a finite number above 0"),
        ("gpu_memory_max: .inf", "gpu_memory_max: inf must be a finite number above 0"),
        ("gpu_utilization_max: '90%'", "gpu_utilization_max: '90%' must be a finite number above 0"),
    ],
)
def test_gpu_objectives_must_be_finite_shares(tmp_path: Path, line: str, message: str) -> None:
    with pytest.raises(SLOError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_slo(_slo(tmp_path, f"{line}\nmodels: {{m: {{error_rate: 0.1}}}}\n"))


def test_no_gpu_objective_no_gpu_rules(tmp_path: Path) -> None:
    text = yaml.safe_dump(rules(load_slo(_slo(tmp_path, "models: {m: {error_rate: 0.1}}\n"))))
    assert "nv_gpu" not in text and "TritonGPU" not in text
