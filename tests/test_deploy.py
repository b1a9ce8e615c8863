"""`tritonforge deploy`: the manifests it writes validate offline, the server command line in them runs on the
real tritonserver and its probes answer, and the autoscaling PromQL -- evaluated by a real Prometheus
scraping two real servers -- is clearly higher under load than idle, per pod."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from typer.testing import CliRunner

from conftest import PROJECT_ROOT, triton_infer
from promserver import PrometheusServer
from tritonforge.cli import app
from tritonforge.deploy import (
    PROBE_PATHS,
    TRITON_VERSION,
    DeploySpec,
    check_tree,
    generate,
    load_measurement,
    parse_canary_steps,
    parse_model_store,
    parse_restriction,
    render_adapter_query,
    size_for,
    triton_args,
)
from tritonforge.deploy.check import validate_object
from tritonforge.errors import DeployError
from tritonforge.server import EmbeddedServer

LOCUSTFILES = {p.name: p.read_text() for p in sorted((PROJECT_ROOT / "loadtests").glob("*.py"))}
NAMESPACE = "tritonforge-prod"
PODS = ("triton-5d9c7f8b6-x2x7k", "triton-5d9c7f8b6-q9p4m")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def out(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated tree (object-store variant) shared by the offline tests."""
    target = tmp_path_factory.mktemp("deploy") / "deploy"
    spec = DeploySpec(store=parse_model_store("s3://models-bucket/triton", name="triton"), gpus=0)
    generate(model_repo, target, spec, locustfiles=LOCUSTFILES)
    return target


# -- generation and offline validation ---------------------------------------------------------------------


def test_generate_writes_base_overlays_autoscaling_kserve_locust_batch_and_compose(out: Path) -> None:
    for rel in (
        "base/kustomization.yaml",
        "base/deployment.yaml",
        "base/services.yaml",
        "base/pdb.yaml",
        "base/servicemonitor.yaml",
        "overlays/dev/kustomization.yaml",
        "overlays/prod/hpa.yaml",
        "overlays/prod/keda-scaledobject.yaml",
        "autoscaling/prometheus-adapter-values.yaml",
        "kserve/inferenceservice.yaml",
        "loadtest/locust.yaml",
        "batch/job.yaml",
        "compose/docker-compose.yaml",
        "README.md",
    ):
        assert (out / rel).is_file(), rel
    kinds = {d.get("kind") for p in out.rglob("*.yaml") for d in _docs(p)}
    assert {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "InferenceService",
        "Job",
        "ConfigMap",
        "Namespace",
    } <= kinds


def test_check_tree_finds_every_generated_object_valid(out: Path) -> None:
    findings = check_tree(out)
    assert [f for f in findings if not f.ok] == []
    hows = {f.how for f in findings}
    assert {"Kubernetes 1.31.0 schema", "kserve SDK models", "CRD fields"} <= hows
    # the overlays are checked as applied: base + their JSON patches
    assert any(f.file == "overlays/prod (base + patches)" and f.kind == "Deployment" for f in findings)


def test_check_tree_reports_an_unknown_field_in_a_core_object(out: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    deployment = _docs(broken / "base/deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    (broken / "base/deployment.yaml").write_text(yaml.safe_dump(deployment))
    bad = [f for f in check_tree(broken) if not f.ok]
    assert bad and all(f.kind == "Deployment" for f in bad)
    assert "readinessProbes" in bad[0].problem  # type: ignore[operator]


def test_validate_object_rejects_a_misspelt_crd_field_and_an_unknown_kserve_field(out: Path) -> None:
    monitor = _docs(out / "base/servicemonitor.yaml")[0]
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert validate_object(monitor)[1] is not None
    isvc = _docs(out / "kserve/inferenceservice.yaml")[0]
    isvc["spec"]["predictor"]["model"]["storageUrl"] = "s3://x"
    how, problem = validate_object(isvc)
    assert how == "kserve SDK models" and problem is not None and "storageUrl" in problem


def test_deployment_is_non_root_read_only_with_probes_on_triton_health_and_secrets_by_reference(
    out: Path,
) -> None:
    deployment = _docs(out / "base/deployment.yaml")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert "--model-repository=s3://models-bucket/triton" in container["args"]
    for env in container["env"]:
        assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"] == "triton-model-store"
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} == {
        "topology.kubernetes.io/zone",
        "kubernetes.io/hostname",
    }
    headless = [s for s in _docs(out / "base/services.yaml") if s["metadata"]["name"] == "triton-headless"]
    assert headless[0]["spec"]["clusterIP"] == "None"


def test_prod_overlay_asks_for_gpus_and_the_hpa_waits_before_scaling_down(out: Path) -> None:
    kustomization = _docs(out / "overlays/prod/kustomization.yaml")[0]
    ops = json.loads(kustomization["patches"][0]["patch"])
    resources = next(op["value"] for op in ops if op["path"].endswith("/resources"))
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    hpa = _docs(out / "overlays/prod/hpa.yaml")[0]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_us_per_request"


def test_batch_job_is_indexed_and_passes_its_completion_index_as_the_shard(out: Path) -> None:
    job = _docs(out / "batch/job.yaml")[0]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    assert job["spec"]["backoffLimit"] > 0
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[:2] == ["batch-infer", args[1]] and args[args.index("--shard") + 1] == "$(SHARD_INDEX)/4"
    env = {e["name"]: e for e in container["env"]}
    assert env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    assert any(t["key"] == "cloud.google.com/gke-spot" for t in pod["tolerations"])
    assert pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]


def test_locust_configmap_holds_the_project_load_tests(out: Path) -> None:
    configmap, master, worker, _service = _docs(out / "loadtest/locust.yaml")
    assert set(configmap["data"]) == set(LOCUSTFILES)
    assert "--master" in master["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--worker" in worker["spec"]["template"]["spec"]["containers"][0]["args"]


def test_generate_raises_deploy_error_when_out_is_not_empty_and_leaves_it_alone(
    model_repo: Path, out: Path
) -> None:
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(DeployError, match="--force"):
        generate(model_repo, out)
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize(
    "uri",
    ["ftp://host/models", "s3://", "s3://key:secret@bucket/models", "as://only-account", "pvc://Bad_Name"],
)
def test_parse_model_store_raises_deploy_error_for_a_bad_uri(uri: str) -> None:
    with pytest.raises(DeployError):
        parse_model_store(uri, name="triton")


def test_cli_deploy_fails_on_one_line_for_a_missing_repository(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["deploy", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "no model repository" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_deploy_fails_on_one_line_for_a_prometheus_url_without_scheme(
    model_repo: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app, ["deploy", str(model_repo), "--out", str(tmp_path / "out"), "--prometheus-url", "prom:9090"]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "error: Prometheus URL 'prom:9090' must be http(s)://host[:port], e.g. "
        "http://prometheus-operated.monitoring.svc:9090"
    ]


def test_only_commands_import_deploy_and_deploy_imports_no_command() -> None:
    import ast

    src = PROJECT_ROOT / "src" / "tritonforge"
    for path in src.rglob("*.py"):
        rel = path.relative_to(src).parts
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for name in names:
                if name.startswith("tritonforge.deploy"):
                    assert rel[0] in ("deploy", "commands"), path
                if rel[0] == "deploy":
                    assert not name.startswith(("tritonforge.commands", "tritonforge.cli")), path


# -- sizing from a measured sweep ---------------------------------------------------------------------------


def _level(level: float, rps: float, p99: float, errors: int = 0) -> dict[str, Any]:
    return {"level": level, "throughput_rps": rps, "latency_ms": {"p99": p99}, "errors": errors}


def test_render_adapter_query_fills_the_template_as_the_adapter_does() -> None:
    template = "sum by (<<.GroupBy>>) (rate(x{<<.LabelMatchers>>}[1m]))"
    assert render_adapter_query(template, namespace="ns", pods=["a-1", "b-2"]) == (
        'sum by (pod) (rate(x{namespace="ns",pod=~"a-1|b-2"}[1m]))'
    )
    assert render_adapter_query(template, namespace="ns", pods=["a-1"]) == (
        'sum by (pod) (rate(x{namespace="ns",pod="a-1"}[1m]))'
    )
    with pytest.raises(DeployError):
        render_adapter_query("<<.Series>>{<<.LabelMatchers>>}", namespace="ns", pods=["a"])


def test_size_for_plans_pods_at_the_utilisation_of_the_best_level_within_budget() -> None:
    sweep = {
        "model": "m",
        "mode": "concurrency",
        "levels": [
            _level(1, 100, 5),
            _level(4, 300, 12),
            _level(16, 500, 80),
            _level(32, 900, 300, errors=3),
        ],
    }
    sizing = size_for(1000, sweep, p99_budget_ms=50, utilisation=0.5)
    assert sizing.per_replica_rps == 300  # level 16 is over budget, level 32 had errors
    assert sizing.replicas == 7  # 1000 / (300 * 0.5) = 6.7
    assert any("6.67" in r for r in sizing.reasons)


def test_size_for_raises_deploy_error_when_no_level_is_usable() -> None:
    sweep = {"model": "m", "levels": [_level(1, 100, 500)]}
    with pytest.raises(DeployError, match="no level"):
        size_for(10, sweep, p99_budget_ms=50)


def test_a_tune_winner_gives_the_sweep_and_instance_counts_and_a_note_when_the_repository_differs(
    model_repo: Path, tmp_path: Path
) -> None:
    tune = {
        "sweeps": [
            {"model": "mlp", "label": "default", "mode": "concurrency", "levels": [_level(4, 100, 9)]},
            {"model": "mlp", "label": "mlp: 2 inst", "mode": "concurrency", "levels": [_level(4, 180, 9)]},
        ],
        "tune": {"model": "mlp", "winner": {"config": "mlp: 2 inst", "knobs": {"mlp": {"instances": 2}}}},
    }
    (tmp_path / "tune.json").write_text(json.dumps(tune))
    sweep, instances, source = load_measurement(tmp_path / "tune.json")
    assert sweep["label"] == "mlp: 2 inst" and instances == {"mlp": 2} and "tune winner" in source
    sizing = size_for(500, sweep, instances=instances, source=source)
    generated = generate(model_repo, tmp_path / "out", sizing=sizing)
    assert generated.spec.instances["mlp"] == 2
    assert any("'mlp' was measured with 2 instance(s)" in note for note in generated.notes)
    assert _docs(tmp_path / "out/overlays/prod/hpa.yaml")[0]["spec"]["minReplicas"] == sizing.min_replicas


@pytest.mark.slow
def test_cli_deploy_sizes_prod_from_a_real_bench_sweep(
    server: EmbeddedServer, model_repo: Path, tmp_path: Path
) -> None:
    from tritonforge.loadtest import SweepSettings, bench

    settings = SweepSettings(concurrency=(1, 4), window_s=0.5, stable_windows=1, max_windows=2, warmup_s=0.2)
    bench("mlp", settings=settings, url=server.grpc_url, output=tmp_path / "bench", report=False)
    sweep, _, _ = load_measurement(tmp_path / "bench" / "sweep.json")
    best = max(lv["throughput_rps"] for lv in sweep["levels"] if lv["errors"] == 0)
    target = round(best * 3)
    result = CliRunner().invoke(
        app,
        [
            "deploy",
            str(model_repo),
            "--out",
            str(tmp_path / "out"),
            "--loadtests",
            str(PROJECT_ROOT / "loadtests"),
            "--target-rps",
            str(target),
            "--sweep",
            str(tmp_path / "bench" / "sweep.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    sizing = json.loads((tmp_path / "out" / "sizing.json").read_text())
    assert sizing["replicas"] == max(2, -(-target // (best * 0.7)))
    assert f"=> prod: {sizing['replicas']} replicas" in result.output
    assert _docs(tmp_path / "out/overlays/prod/hpa.yaml")[0]["spec"]["maxReplicas"] == sizing["max_replicas"]
    assert "objects valid" in result.output


@pytest.mark.slow
def test_cli_deploy_on_the_example_repository_writes_valid_manifests(
    example_repo: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "deploy",
            str(example_repo),
            "--out",
            str(tmp_path / "deploy"),
            "--loadtests",
            str(PROJECT_ROOT / "loadtests"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "deploy/loadtest/locust.yaml").is_file()


# -- the command line on the real binary, and the autoscaling metric on a real Prometheus -----------------

SWAPPED = ("--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=")


@pytest.fixture(scope="module")
def deployed_server(model_repo: Path) -> Iterator[EmbeddedServer]:
    """The real tritonserver run with the Deployment's arguments (repository, ports and addresses swapped
    for loopback ones) on 127.0.0.2. They come after the embedded server's own defaults, so each takes
    effect: Triton keeps the last value a flag is given."""
    args = [a for a in triton_args(DeploySpec()) if not a.startswith(SWAPPED)]
    with EmbeddedServer(model_repo, host="127.0.0.2", extra_args=args) as running:
        yield running


def test_deployment_arguments_serve_on_the_real_tritonserver_and_take_effect(
    deployed_server: EmbeddedServer,
) -> None:
    with grpcclient.InferenceServerClient(deployed_server.grpc_url) as client:
        assert client.get_server_metadata().version == TRITON_VERSION  # the image tag's Triton
        out = triton_infer(client, "fixed", {"a": np.ones((2, 3), np.float32)})
    assert out["b"].shape == (3, 2)
    options = {
        cells[1].strip(): cells[2].strip()
        for cells in (line.split("|") for line in deployed_server.log.splitlines())
        if len(cells) == 4
    }
    # the Deployment's values, not the embedded server's own (exit timeout 10 s)
    assert options["strict_readiness"] == "1"
    assert options["exit_timeout"] == "30"


def test_probe_paths_answer_200_on_the_real_tritonserver(deployed_server: EmbeddedServer) -> None:
    for kind, path in PROBE_PATHS.items():
        with urllib.request.urlopen(deployed_server.http_url + path, timeout=5) as answer:
            assert answer.status == 200, kind


class _PodPrometheus(PrometheusServer):
    """Each target labelled as prometheus-operator labels a pod it scrapes: namespace and pod."""

    def __init__(self, pods: dict[str, str], **kwargs: Any) -> None:
        super().__init__({"triton": list(pods)}, **kwargs)
        self.pods = pods

    def config(self) -> dict[str, Any]:
        config = super().config()
        config["scrape_configs"][0]["static_configs"] = [
            {"targets": [target], "labels": {"namespace": NAMESPACE, "pod": pod}}
            for target, pod in self.pods.items()
        ]
        return config


def _load(urls: list[str], stop: threading.Event, failures: list[BaseException]) -> list[threading.Thread]:
    def worker(url: str) -> None:
        try:
            with grpcclient.InferenceServerClient(url) as client:
                while not stop.is_set():
                    triton_infer(client, "fixed", {"a": np.ones((2, 3), np.float32)})
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(url,), daemon=True) for url in urls for _ in range(8)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.slow
def test_autoscaling_promql_is_clearly_higher_under_load_than_idle_per_pod(
    server: EmbeddedServer, deployed_server: EmbeddedServer, out: Path, tmp_path: Path, prometheus_bin: Path
) -> None:
    ratio_out = tmp_path / "ratio"
    generate(server.repositories[0], ratio_out, DeploySpec(metric="queue_ratio"))
    rules = [
        yaml.safe_load((d / "autoscaling/prometheus-adapter-values.yaml").read_text())["rules"]["custom"][0]
        for d in (out, ratio_out)
    ]
    keda = [
        _docs(d / "overlays/prod/keda-scaledobject.yaml")[0]["spec"]["triggers"][0]["metadata"]["query"]
        for d in (out, ratio_out)
    ]
    hpa_queries = [render_adapter_query(r["metricsQuery"], namespace=NAMESPACE, pods=PODS) for r in rules]
    targets = {
        f"{server.host}:{server.metrics_port}": PODS[0],
        f"{deployed_server.host}:{deployed_server.metrics_port}": PODS[1],
    }
    with _PodPrometheus(targets, scrape_interval_s=0.5) as prom:
        prom.wait_for_targets()
        # the adapter discovers the metric through its seriesQuery: one series set per pod
        series = prom.api("series", **{"match[]": rules[0]["seriesQuery"]})
        assert {s["pod"] for s in series} == set(PODS)
        time.sleep(3)
        idle = [prom.values(q) for q in hpa_queries]
        idle_keda = [prom.values(q) for q in keda]
        stop, failures = threading.Event(), []
        threads = _load([server.grpc_url, deployed_server.grpc_url], stop, failures)
        try:
            time.sleep(8)
            loaded = [prom.values(q) for q in hpa_queries]
            loaded_keda = [prom.values(q) for q in keda]
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    assert failures == []

    def by_pod(values: dict[str, float]) -> dict[str, float]:
        return {json.loads(key)["pod"]: value for key, value in values.items()}

    # queue time per request (us) must be well above the ~tens of us a lone request waits; the ratio well
    # above 0. Idle is exactly 0 for every pod (present, not missing: the HPA always gets a value).
    floors = (100.0, 0.2)
    for before, after, floor in zip(idle, loaded, floors, strict=True):
        assert by_pod(before) == dict.fromkeys(PODS, 0.0)
        assert set(by_pod(after)) == set(PODS)
        assert min(by_pod(after).values()) > floor, after
    for before, after, floor in zip(idle_keda, loaded_keda, floors, strict=True):
        assert list(before.values()) == [0.0]
        assert len(after) == 1 and next(iter(after.values())) > floor


# -- access control and the KServe canary plan --------------------------------------------------------------

#: the values the Secrets would hold (only ever in the test's environment, never in a generated file)
KEY_VALUES = {"TRITON_RESTRICT_KEY_0": "s3cr3t-infer-9f1c", "TRITON_RESTRICT_KEY_1": "s3cr3t-admin-77ab"}
RESTRICT = (
    "inference:x-api-key=triton-keys/infer",
    "model-repository,model-config,statistics:x-admin-key=triton-keys/admin",
)


def _access_spec() -> DeploySpec:
    return DeploySpec(
        restrictions=tuple(parse_restriction(r, index=i) for i, r in enumerate(RESTRICT)),
        tls_secret="triton-grpc-tls",
        mtls=True,
        canary_steps=(5, 25, 50, 100),
        canary_hold_s=120,
    )


@pytest.fixture(scope="module")
def guarded(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tree with restricted protocols, gRPC mTLS and a canary plan."""
    target = tmp_path_factory.mktemp("deploy-guarded") / "deploy"
    generate(model_repo, target, _access_spec(), canary_thresholds={"max_mean_latency_ms": 50.0})
    return target


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' ``$(VAR)`` expansion of container args (an undefined var stays as written)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def test_restricted_keys_come_from_secrets_by_env_and_the_args_name_those_env_vars(guarded: Path) -> None:
    container = _docs(guarded / "base/deployment.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env == {
        "TRITON_RESTRICT_KEY_0": {"name": "triton-keys", "key": "infer"},
        "TRITON_RESTRICT_KEY_1": {"name": "triton-keys", "key": "admin"},
    }
    referenced = {v for a in container["args"] for v in re.findall(r"\$\((\w+)\)", a)}
    assert referenced == set(env)
    assert "--grpc-restricted-protocol=inference:x-api-key=$(TRITON_RESTRICT_KEY_0)" in container["args"]
    assert "--http-restricted-api=inference:x-api-key=$(TRITON_RESTRICT_KEY_0)" in container["args"]
    assert not any("health" in a for a in container["args"] if "restricted" in a)
    assert container["readinessProbe"]["httpGet"]["path"] == PROBE_PATHS["readiness"]


def test_kserve_and_compose_take_the_same_keys_by_reference(guarded: Path) -> None:
    (isvc,) = _docs(guarded / "kserve/inferenceservice.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert {e["name"] for e in model["env"]} == set(KEY_VALUES)
    assert "--grpc-restricted-protocol=inference:x-api-key=$(TRITON_RESTRICT_KEY_0)" in model["args"]
    (compose,) = _docs(guarded / "compose/docker-compose.yaml")
    command = compose["services"]["triton"]["command"]
    assert any(
        a.startswith("--http-restricted-api=inference:x-api-key=${TRITON_RESTRICT_KEY_0:?") for a in command
    )
    assert not any("$(" in a or a.startswith("--grpc-use-ssl") for a in command)


def test_no_generated_file_holds_a_key_value(guarded: Path) -> None:
    for path in guarded.rglob("*"):
        if path.is_file():
            text = path.read_text()
            for value in KEY_VALUES.values():
                assert value not in text, path


def test_grpc_tls_files_come_from_a_tls_secret_mounted_0400_and_the_args_point_at_them(guarded: Path) -> None:
    pod = _docs(guarded / "base/deployment.yaml")[0]["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "grpc-tls")
    assert volume["secret"]["secretName"] == "triton-grpc-tls"
    assert volume["secret"]["defaultMode"] == 0o400
    assert {i["key"] for i in volume["secret"]["items"]} == {"tls.crt", "tls.key", "ca.crt"}
    container = pod["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "grpc-tls")
    assert mount["readOnly"] is True
    args = container["args"]
    assert "--grpc-use-ssl=true" in args and "--grpc-use-ssl-mutual=true" in args
    for flag in ("--grpc-server-cert=", "--grpc-server-key=", "--grpc-root-cert="):
        (path,) = [a.removeprefix(flag) for a in args if a.startswith(flag)]
        assert path.startswith(mount["mountPath"] + "/")
        assert Path(path).name in {i["path"] for i in volume["secret"]["items"]}


def test_the_guarded_tree_validates_offline_with_its_canary_patches(guarded: Path) -> None:
    findings = check_tree(guarded)
    assert [f for f in findings if not f.ok] == []
    checked = {f.file for f in findings}
    assert "kserve/canary/step-1-5pct.yaml" in checked and "kserve/canary/rollback.yaml" in checked


def test_canary_plan_has_one_patch_per_step_and_the_promql_per_version(guarded: Path) -> None:
    plan = json.loads((guarded / "kserve/canary/plan.json").read_text())
    assert [s["canary_traffic_percent"] for s in plan["steps"]] == [5, 25, 50, 100]
    assert plan["hold_s"] == 120 and plan["thresholds"]["max_mean_latency_ms"] == 50.0
    for step in plan["steps"]:
        (patch,) = _docs(guarded / "kserve/canary" / step["patch"])
        assert patch == {
            "apiVersion": "serving.kserve.io/v1beta1",
            "kind": "InferenceService",
            "metadata": {"name": "triton"},
            "spec": {"predictor": {"canaryTrafficPercent": step["canary_traffic_percent"]}},
        }
        assert step["patch"] in step["apply"] and "kubectl patch inferenceservice triton" in step["apply"]
        assert all("by (model, version)" in q for q in step["queries"].values())
    (rollback,) = _docs(guarded / "kserve/canary/rollback.yaml")
    assert rollback["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert "kubectl patch inferenceservice triton" in (guarded / "README.md").read_text()


@pytest.mark.parametrize("text", ["5,25,50", "25,5,100", "0,100", "5,x,100", ""])
def test_parse_canary_steps_raises_deploy_error_for_steps_that_do_not_climb_to_100(text: str) -> None:
    with pytest.raises(DeployError, match="canary-steps"):
        parse_canary_steps(text)


@pytest.mark.parametrize(
    "text",
    ["health,inference:x-key=keys/k", "inference:x-key=keys", "inference=keys/k", "bogus:x-key=keys/k"],
)
def test_parse_restriction_raises_deploy_error_naming_the_bad_value(text: str) -> None:
    with pytest.raises(DeployError, match="--restrict"):
        parse_restriction(text)


def test_cli_deploy_writes_the_canary_plan_and_access_control_and_they_validate(
    model_repo: Path, tmp_path: Path
) -> None:
    target = tmp_path / "d"
    result = CliRunner().invoke(
        app,
        [
            "deploy", str(model_repo), "--out", str(target), "--canary-steps", "10,100",
            "--canary-hold", "60", "--restrict", RESTRICT[0], "--tls-secret", "grpc-tls", "--mtls",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (
        "objects valid" in result.output and "create the kubernetes.io/tls Secret 'grpc-tls'" in result.output
    )
    plan = json.loads((target / "kserve/canary/plan.json").read_text())
    assert [s["patch"] for s in plan["steps"]] == ["step-1-10pct.yaml", "step-2-100pct.yaml"]


def test_cli_deploy_fails_on_one_line_when_health_is_restricted(model_repo: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["deploy", str(model_repo), "--out", str(tmp_path / "d"), "--restrict", "health:x=k/v"]
    )
    assert result.exit_code != 0
    assert "health group must stay unrestricted" in result.output
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def guarded_server(model_repo: Path) -> Iterator[EmbeddedServer]:
    """The real tritonserver with the guarded Deployment's arguments, ``$(VAR)`` expanded from test values
    as the kubelet expands them from the Secrets (TLS left out: no certificates here)."""
    spec = _access_spec().replace(tls_secret="", mtls=False)
    args = _expand([a for a in triton_args(spec) if not a.startswith(SWAPPED)], KEY_VALUES)
    with EmbeddedServer(model_repo, host="127.0.0.3", extra_args=args) as running:
        yield running


def test_restricted_args_on_the_real_tritonserver_refuse_calls_without_the_key_and_keep_health_open(
    guarded_server: EmbeddedServer,
) -> None:
    for kind, path in PROBE_PATHS.items():
        with urllib.request.urlopen(guarded_server.http_url + path, timeout=5) as answer:
            assert answer.status == 200, kind
    inputs = {"a": np.ones((2, 3), np.float32)}
    with grpcclient.InferenceServerClient(guarded_server.grpc_url) as client:
        with pytest.raises(Exception, match=r"(?i)unauthenticated|x-api-key|restricted|permission"):
            triton_infer(client, "fixed", inputs)
        out = triton_infer(
            client,
            "fixed",
            inputs,
            headers={"triton-grpc-protocol-x-api-key": KEY_VALUES["TRITON_RESTRICT_KEY_0"]},
        )
    assert out["b"].shape == (3, 2)
    body = json.dumps(
        {"inputs": [{"name": "a", "shape": [2, 3], "datatype": "FP32", "data": [1.0] * 6}]}
    ).encode()
    url = guarded_server.http_url + "/v2/models/fixed/infer"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=5)
    keyed = urllib.request.Request(url, data=body, headers={"x-api-key": KEY_VALUES["TRITON_RESTRICT_KEY_0"]})
    with urllib.request.urlopen(keyed, timeout=5) as answer:
        assert answer.status == 200
