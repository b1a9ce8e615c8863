"""`tritonforge deploy` with the model cache: the manifests validate offline; the server arguments of the
generated Deployment, run on the real tritonserver with the coordinator's ConfigMap laid out as the kubelet
lays out a ConfigMap volume, serve a model that was not loaded on a client's first call and keep the pod's
probes answering through loads and evictions; combinations that can't work are refused in one line."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from triton_stats import settled
from tritonforge.cache import CACHE_MODEL, CacheBudget
from tritonforge.cli import app
from tritonforge.client import Client
from tritonforge.deploy import DeploySpec, check_tree, generate, parse_restriction, probe_paths
from tritonforge.deploy.cache import CACHE_MOUNT_PATH, CACHE_READY_PATH, quantity_bytes
from tritonforge.server import EmbeddedServer

BUDGET = CacheBudget(max_models=2, pins=("fixed",), idle_s=0.5)
#: what the test swaps for its own: the ports (free loopback ones) and the models' repository (the copy
#: the deploy wrote); the cache's repository is swapped for the ConfigMap laid out under a temp folder
PORTS = ("--http-port=", "--grpc-port=", "--metrics-port=")


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _container(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = _docs(out / "base" / "deployment.yaml")[0]["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


@pytest.fixture(scope="module")
def cache_out(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("deploy-cache") / "deploy"
    generate(model_repo, target, DeploySpec(cache=BUDGET))
    return target


def test_the_cache_tree_validates_offline(cache_out: Path) -> None:
    findings = check_tree(cache_out)
    assert [f for f in findings if not f.ok] == []
    kinds = {(f.file, f.kind) for f in findings}
    assert ("base/cache-configmap.yaml", "ConfigMap") in kinds
    assert ("kserve/cache-configmap.yaml", "ConfigMap") in kinds


def test_the_deployment_runs_the_coordinator_from_its_configmap_in_explicit_control(cache_out: Path) -> None:
    pod, container = _container(cache_out)
    args = container["args"]
    assert args[:6] == [
        "--model-repository=/models",
        f"--model-repository={CACHE_MOUNT_PATH}",
        "--model-control-mode=explicit",
        f"--load-model={CACHE_MODEL}",
        "--load-model=fixed",
        "--strict-readiness=false",
    ]
    assert not any(a.startswith("--http-address") for a in args)  # all addresses: loopback reaches it
    assert sum(a.startswith("--model-control-mode=") for a in args) == 1
    config_map = _docs(cache_out / "base" / "cache-configmap.yaml")[0]
    volume = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert {i["key"] for i in volume["configMap"]["items"]} == set(config_map["data"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "cache")
    assert mount == {"name": "cache", "mountPath": f"/cache/{CACHE_MODEL}", "readOnly": True}
    assert container["readinessProbe"]["httpGet"]["path"] == CACHE_READY_PATH
    assert container["startupProbe"]["httpGet"]["path"] == CACHE_READY_PATH
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    kustomization = yaml.safe_load((cache_out / "base" / "kustomization.yaml").read_text())
    assert "cache-configmap.yaml" in kustomization["resources"]


def test_the_configmap_name_follows_its_content_and_nothing_else(model_repo: Path, tmp_path: Path) -> None:
    """The same budget gives the same name on every run (no build time or host in it); another budget
    another name, so the pods roll onto it."""
    names = []
    for i, budget in enumerate((BUDGET, BUDGET, CacheBudget(max_models=3, pins=("fixed",)))):
        generate(model_repo, tmp_path / str(i), DeploySpec(cache=budget), locustfiles=None)
        names.append(_docs(tmp_path / str(i) / "base" / "cache-configmap.yaml")[0]["metadata"]["name"])
    assert names[0] == names[1] != names[2]


def test_kserve_appends_the_cache_args_mounts_the_configmap_and_probes_the_coordinator(
    cache_out: Path,
) -> None:
    service = _docs(cache_out / "kserve" / "inferenceservice.yaml")[0]
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["args"] == [
        "--grpc-max-connection-age=60000",
        f"--model-repository={CACHE_MOUNT_PATH}",
        "--model-control-mode=explicit",
        f"--load-model={CACHE_MODEL}",
        "--load-model=fixed",
        "--strict-readiness=false",
    ]
    assert "--strict-readiness=true" not in model["args"]
    assert model["readinessProbe"]["httpGet"] == {"path": CACHE_READY_PATH, "port": 8080}
    assert model["volumeMounts"] == [
        {"mountPath": f"/cache/{CACHE_MODEL}", "name": "cache", "readOnly": True}
    ]
    config_map = _docs(cache_out / "kserve" / "cache-configmap.yaml")[0]
    assert config_map["metadata"]["namespace"] == "tritonforge-prod"
    assert predictor["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    kustomization = yaml.safe_load((cache_out / "kserve" / "kustomization.yaml").read_text())
    assert "cache-configmap.yaml" in kustomization["resources"]


def test_compose_mounts_the_written_cache_repository_beside_the_models(cache_out: Path) -> None:
    service = yaml.safe_load((cache_out / "compose" / "docker-compose.yaml").read_text())["services"][
        "triton"
    ]
    assert service["command"][1:4] == [
        "--model-repository=/models",
        f"--model-repository={CACHE_MOUNT_PATH}",
        "--model-control-mode=explicit",
    ]
    binds = {v["target"]: v["source"] for v in service["volumes"]}
    assert (cache_out / "compose" / binds[CACHE_MOUNT_PATH] / CACHE_MODEL / "config.pbtxt").is_file()
    assert CACHE_READY_PATH in " ".join(service["healthcheck"]["test"])


# -- the Deployment's arguments on the real tritonserver ---------------------------------------------------


def _lay_out_like_the_kubelet(out: Path, root: Path) -> Path:
    """The cache ConfigMap's volume as the kubelet writes it (its atomic writer): the files in a timestamped
    folder, ``..data`` linking to it, and each top-level item a link through ``..data``; at the Deployment's
    mount path under ``root``. Returns the repository folder to give Triton (``root`` + ``/cache``)."""
    pod, container = _container(out)
    config_map = _docs(out / "base" / "cache-configmap.yaml")[0]
    volume = next(v for v in pod["volumes"] if v["name"] == "cache")["configMap"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "cache")["mountPath"]
    target = root / mount.lstrip("/")
    stamp = target / "..2026_12_07_06_00_00.000000001"
    for item in volume["items"]:
        path = stamp / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_map["data"][item["key"]])
        path.chmod(volume["defaultMode"])
    (target / "..data").symlink_to(stamp.name)
    for top in sorted({item["path"].split("/")[0] for item in volume["items"]}):
        (target / top).symlink_to(f"..data/{top}")
    for folder in (p for p in [stamp, *stamp.rglob("*")] if p.is_dir()):
        folder.chmod(0o555)  # a ConfigMap volume is read-only
    return root / CACHE_MOUNT_PATH.lstrip("/")


@pytest.fixture(scope="module")
def cache_pod(cache_out: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """tritonserver with the Deployment's arguments as they are, but for the ports (free ones; gRPC and
    metrics on 127.0.0.4, HTTP on every address as in the pod) and the two repositories (the deployed
    copy, and the ConfigMap laid out as in the pod); the embedded server's own flags come first, so each
    of these takes effect (Triton keeps a flag's last value)."""
    args, cache_repo = _pod_args(cache_out, tmp_path_factory.mktemp("pod"))
    # the pod names no HTTP address (Triton's default: every address, which the coordinator reads as
    # 127.0.0.1); the embedded server names its own, so the default is given back here explicitly
    args.append("--http-address=0.0.0.0")
    with EmbeddedServer(cache_out / "repository", host="127.0.0.4", extra_args=args) as running:
        yield running
    _writable(cache_repo)


def _pod_args(out: Path, root: Path) -> tuple[list[str], Path]:
    """The Deployment's tritonserver arguments with the ports left out and ``/cache`` swapped for the
    ConfigMap laid out under ``root`` (``/models`` is the embedded server's first repository)."""
    cache_repo = _lay_out_like_the_kubelet(out, root)
    _, container = _container(out)
    args = [
        f"--model-repository={cache_repo}" if a == f"--model-repository={CACHE_MOUNT_PATH}" else a
        for a in container["args"]
        if a != "--model-repository=/models" and not a.startswith(PORTS)
    ]
    assert len(args) == len(container["args"]) - 4
    return args, cache_repo


def _writable(root: Path) -> None:
    """Let pytest remove the read-only folders of a laid-out ConfigMap."""
    for folder in (p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()):
        folder.chmod(0o755)


def _status(server: EmbeddedServer, path: str) -> int:
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _loaded(client: Client) -> set[str]:
    return {m["name"] for m in client.repository_index() if m.get("state") == "READY"} - {CACHE_MODEL}


def test_the_pod_starts_with_the_coordinator_and_the_pin_only_and_its_probes_answer(
    cache_pod: EmbeddedServer,
) -> None:
    options = {
        cells[1].strip(): cells[2].strip()
        for cells in (line.split("|") for line in cache_pod.log.splitlines())
        if len(cells) == 4
    }
    assert options["strict_readiness"] == "0"
    assert options["model_control_mode"] == "MODE_EXPLICIT"
    with Client(cache_pod.grpc_url) as client:
        assert _loaded(client) >= {"fixed"}
    for kind, path in probe_paths(DeploySpec(cache=BUDGET)).items():
        assert _status(cache_pod, path) == 200, kind


def test_a_model_not_loaded_loads_on_a_client_call_and_evictions_keep_the_pod_ready(
    cache_pod: EmbeddedServer,
) -> None:
    spec = DeploySpec(cache=BUDGET)
    with Client(cache_pod.grpc_url) as client:
        assert "mlp" not in _loaded(client)
        probs = client.infer("mlp", {"x": np.ones((1, 8), np.float32)})["probs"]
        assert probs.shape == (1, 3)
        assert "mlp" in _loaded(client)
        time.sleep(BUDGET.idle_s + 0.5)  # mlp idle: the next model past the budget evicts it
        total = client.infer("two_outputs", {"x": np.ones((1, 4), np.float32)})["total"]
        assert float(total[0][0]) == 4.0
        assert _loaded(client) == {"fixed", "two_outputs"}
    for kind, path in probe_paths(spec).items():
        assert _status(cache_pod, path) == 200, kind
    assert _status(cache_pod, "/v2/health/ready") == 200  # non-strict: an unloaded model is no matter


def test_restricted_groups_leave_the_cache_pods_probes_open(model_repo: Path, tmp_path: Path) -> None:
    """--restrict on the groups the coordinator doesn't call: the probe paths (the coordinator's
    readiness is in Triton's health group) answer without the header, the restricted APIs don't."""
    spec = DeploySpec(
        cache=BUDGET,
        restrictions=(parse_restriction("inference,metadata,model-config:x-api-key=keys/api-key"),),
    )
    out = tmp_path / "deploy"
    generate(model_repo, out, spec, locustfiles=None)
    args, cache_repo = _pod_args(out, tmp_path / "pod")
    args = [a.replace("$(TRITON_RESTRICT_KEY_0)", "test-key") for a in args]
    assert any(a.startswith("--http-restricted-api=inference,metadata,model-config:") for a in args)
    try:
        with EmbeddedServer(out / "repository", host="127.0.0.6", extra_args=args) as server:
            for kind, path in probe_paths(spec).items():
                assert _status(server, path) == 200, kind
            assert _status(server, f"/v2/models/{CACHE_MODEL}") == 403
    finally:
        _writable(cache_repo)


SLOW = """
import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(4)

    def execute(self, requests):
        return []
"""
BROKEN = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken on purpose")

    def execute(self, requests):
        return []
"""


def _python_model(repo: Path, name: str, source: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "1" / "model.py").write_text(source)
    (repo / name / "config.pbtxt").write_text(
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
        'input [{ name: "x" data_type: TYPE_FP32 dims: [1] }]\n'
        'output [{ name: "y" data_type: TYPE_FP32 dims: [1] }]\n'
    )


def _load(server: EmbeddedServer, model: str) -> int:
    request = urllib.request.Request(f"{server.http_url}/v2/repository/models/{model}/load", data=b"{}")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _wait_loading(server: EmbeddedServer, model: str) -> None:
    """Until Triton has begun loading ``model`` (by its log: its repository index waits for a load)."""
    mark = f"loading: {model}:"
    assert mark in settled(lambda: server.log, lambda log: mark in log, timeout_s=30), server.log_tail()


def test_the_pods_probes_stay_ready_through_a_slow_load_and_a_failed_one_where_strict_readiness_would_not(
    tmp_path: Path,
) -> None:
    """Why the cache's pods leave /v2/health/ready non-strict and probe the coordinator: with strict
    readiness, Triton answers "not ready" while a model loads and after any model failed to load, so a
    cache miss (or one bad model asked for) would take the pod out of its Service."""
    repo = tmp_path / "repo"
    _python_model(repo, "slow", SLOW)
    _python_model(repo, "broken", BROKEN)
    out = tmp_path / "deploy"
    generate(repo, out, DeploySpec(cache=CacheBudget(max_models=2)), locustfiles=None)
    args, cache_repo = _pod_args(out, tmp_path / "pod")
    paths = probe_paths(DeploySpec(cache=CacheBudget(max_models=2)))
    try:
        for strict in (False, True):
            extra = [*args, "--strict-readiness=true"] if strict else args
            with EmbeddedServer(out / "repository", host="127.0.0.5", extra_args=extra) as server:
                loading = threading.Thread(target=_load, args=(server, "slow"))
                loading.start()
                _wait_loading(server, "slow")  # (its initialize takes 4 s)
                during = {kind: _status(server, path) for kind, path in paths.items()}
                health_during = _status(server, "/v2/health/ready")
                loading.join()
                assert _load(server, "broken") == 400
                after = {kind: _status(server, path) for kind, path in paths.items()}
                health_after = _status(server, "/v2/health/ready")
            if strict:
                assert (health_during, health_after) == (400, 400)
            else:
                assert set(during.values()) == set(after.values()) == {200}
                assert (health_during, health_after) == (200, 200)
    finally:
        _writable(cache_repo)


def test_a_pinned_models_companions_load_at_start_before_it_as_serve_loads_them(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _python_model(repo, "twin", SLOW)
    _python_model(repo, "split", SLOW)
    with (repo / "split" / "config.pbtxt").open("a") as config:
        config.write('parameters { key: "tritonforge_load_with" value { string_value: "twin" } }\n')
    generate(repo, tmp_path / "out", DeploySpec(cache=CacheBudget(max_models=2, pins=("split",))))
    _, container = _container(tmp_path / "out")
    loads = [a for a in container["args"] if a.startswith("--load-model=")]
    assert loads == [f"--load-model={CACHE_MODEL}", "--load-model=twin", "--load-model=split"]
    service = _docs(tmp_path / "out" / "kserve" / "inferenceservice.yaml")[0]
    assert [
        a for a in service["spec"]["predictor"]["model"]["args"] if a.startswith("--load-model=")
    ] == loads


# -- memory, and what is refused ----------------------------------------------------------------------------


def test_a_memory_budget_raises_the_request_to_it_and_the_dev_overlay_keeps_the_memory(
    model_repo: Path, tmp_path: Path
) -> None:
    budget = CacheBudget(max_memory_bytes=5 << 30)
    generated = generate(model_repo, tmp_path / "d", DeploySpec(cache=budget), locustfiles=None)
    _, container = _container(tmp_path / "d")
    assert container["resources"]["requests"]["memory"] == "5Gi"
    assert container["resources"]["limits"]["memory"] == "8Gi"
    assert any("raised from 4Gi to 5Gi" in n for n in generated.notes)
    dev = yaml.safe_load((tmp_path / "d" / "overlays" / "dev" / "kustomization.yaml").read_text())
    patched = yaml.safe_load(dev["patches"][0]["patch"])[0]["value"]
    assert (patched["requests"]["memory"], patched["limits"]["memory"]) == ("5Gi", "8Gi")
    service = _docs(tmp_path / "d" / "kserve" / "inferenceservice.yaml")[0]
    assert service["spec"]["predictor"]["model"]["resources"]["requests"]["memory"] == "5Gi"


def test_quantity_bytes_reads_kubernetes_quantities() -> None:
    assert quantity_bytes("4Gi") == 4 << 30
    assert quantity_bytes("1.5Gi") == 3 << 29
    assert quantity_bytes("500M") == 500 * 10**6


def _deploy(repo: Path, out: Path, *options: str) -> Any:
    return CliRunner().invoke(app, ["deploy", str(repo), "--out", str(out), "--no-check", *options])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--pin", "fixed"], "--pin needs a cache: add --cache-max-models N or --cache-max-memory SIZE"),
        (["--cache-max-models", "0"], "--cache-max-models must be 1 or more, not 0"),
        (["--cache-max-memory", "lots"], "--cache-max-memory 'lots' is not a size"),
        (["--cache-max-models", "2", "--kserve-mode", "modelmesh"], "ModelMesh places, loads and evicts"),
        (["--cache-max-models", "2", "--model-store", "s3://bucket/models"], "give --model-store image://"),
        (
            ["--cache-max-models", "2", "--restrict", "model-repository:x-api-key=keys/admin"],
            "leave those groups out of --restrict",
        ),
        (["--cache-max-models", "2", "--pin", "nosuch"], "--pin nosuch: "),
        (
            ["--cache-max-memory", "7GiB"],
            "does not fit the pods' memory limit 8Gi (it leaves the cache 6.20 GiB after 1 GiB for /dev/shm "
            "and 10 % for a load past the budget): give --memory 4552Mi or more",
        ),
    ],
)
def test_cli_deploy_refuses_a_cache_that_cannot_work_in_one_line(
    model_repo: Path, tmp_path: Path, options: list[str], message: str
) -> None:
    result = _deploy(model_repo, tmp_path / "out", *options)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_memory_the_refusal_names_is_enough(model_repo: Path, tmp_path: Path) -> None:
    result = _deploy(model_repo, tmp_path / "out", "--cache-max-memory", "7GiB", "--memory", "4552Mi")
    assert result.exit_code == 0, result.output
    _, container = _container(tmp_path / "out")
    assert container["resources"]["requests"]["memory"] == "7Gi"
    assert container["resources"]["limits"]["memory"] == "9104Mi"
