"""`tritonforge deploy --kserve-mode modelmesh`: a Triton ServingRuntime and one InferenceService per model
in ModelMesh mode. Validated offline (the kserve SDK's models, the ServingRuntime CRD's fields, the Pod
schema for its containers, runtime <-> format cross-checks); the runtime's Triton command line runs on the
real tritonserver, with each model laid out the way ModelMesh's Triton adapter lays it out (its own id, the
config without its name, the highest version), loaded, answered and unloaded through explicit control.
No cluster, no ModelMesh controller here: what those do with the objects is not checked."""

from __future__ import annotations

import copy
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from typer.testing import CliRunner

import tiny_models
from conftest import triton_infer
from tritonforge.cli import app
from tritonforge.config import DataType, EnsembleStep, ModelConfig, TensorSpec, write_config
from tritonforge.deploy import DeploySpec, check_tree, generate, parse_model_store, parse_restriction
from tritonforge.deploy.check import validate_object
from tritonforge.deploy.modelmesh import ADAPTER, isvc_name, mesh_plan, mesh_storage, triton_mesh_args
from tritonforge.errors import DeployError
from tritonforge.server import EmbeddedServer

NS = "tritonforge-prod"
#: never run: ModelMesh leaves Python models out before anything loads them
IDLE_PY = "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def mesh_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test repository plus what ModelMesh can't take: a Python model and an ensemble over ``fixed``;
    and a second version of ``mlp``."""
    root = tmp_path_factory.mktemp("mesh")
    repo = root / "repo"
    shutil.copytree(model_repo, repo)
    echo = ModelConfig(
        name="echo_py",
        backend="python",
        max_batch_size=0,
        inputs=(TensorSpec(name="x", dtype=DataType.FP32, dims=(2,)),),
        outputs=(TensorSpec(name="y", dtype=DataType.FP32, dims=(2,)),),
    )
    tiny_models.python_model(repo, root / "_src", echo, IDLE_PY)
    pipe = ModelConfig(
        name="pipe",
        platform="ensemble",
        max_batch_size=0,
        inputs=(TensorSpec(name="a", dtype=DataType.FP32, dims=(2, 3)),),
        outputs=(TensorSpec(name="b", dtype=DataType.FP32, dims=(3, 2)),),
        ensemble_steps=(EnsembleStep(model_name="fixed", input_map={"a": "a"}, output_map={"b": "b"}),),
    )
    (repo / "pipe" / "1").mkdir(parents=True)
    write_config(pipe, repo / "pipe")
    shutil.copytree(repo / "mlp" / "1", repo / "mlp" / "2")
    return repo


@pytest.fixture(scope="module")
def mesh_out(mesh_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("mesh-deploy") / "deploy"
    spec = DeploySpec(
        store=parse_model_store("s3://models-bucket/triton", name="triton"), kserve_mode="ModelMesh"
    )
    generate(mesh_repo, target, spec)
    return target


def _services(out: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: _docs(p)[0] for p in sorted((out / "kserve/models").glob("*.yaml"))}


# -- what is written ----------------------------------------------------------------------------------------


def test_modelmesh_writes_one_runtime_and_one_inference_service_per_model_that_fits(
    mesh_out: Path, mesh_repo: Path
) -> None:
    (runtime,) = _docs(mesh_out / "kserve/servingruntime.yaml")
    services = _services(mesh_out)
    fits = {p.name for p in mesh_repo.iterdir() if p.is_dir()} - {"echo_py", "pipe"}
    assert set(services) == {isvc_name(m) for m in fits}
    assert "two-outputs" in services and "two_outputs" not in services
    kustomization = _docs(mesh_out / "kserve/kustomization.yaml")[0]
    assert kustomization["namespace"] == NS
    assert kustomization["resources"][0] == "servingruntime.yaml"
    assert sorted(kustomization["resources"][1:]) == [f"models/{n}.yaml" for n in services]
    # no raw-mode objects beside them
    assert not (mesh_out / "kserve/inferenceservice.yaml").exists()
    assert not (mesh_out / "kserve/podmonitor.yaml").exists()
    assert runtime["metadata"]["name"] == "triton" and runtime["metadata"]["namespace"] == NS
    readme = (mesh_out / "README.md").read_text()
    assert "echo_py (a Python-backend model" in readme and "pipe (an ensemble" in readme
    assert "'mlp' has versions 1, 2: ModelMesh loads only the highest (2)" in readme
    assert "storage-config" in readme


def test_every_inference_service_is_in_modelmesh_mode_on_our_runtime_with_its_format_and_store_path(
    mesh_out: Path,
) -> None:
    (runtime,) = _docs(mesh_out / "kserve/servingruntime.yaml")
    declared = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    formats = {}
    for name, isvc in _services(mesh_out).items():
        assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
        assert isvc["metadata"]["annotations"] == {"serving.kserve.io/deploymentMode": "ModelMesh"}
        model = isvc["spec"]["predictor"]["model"]
        assert model["runtime"] == "triton"
        assert "storageUri" not in model
        original = isvc["metadata"]["labels"]["tritonforge.io/model"]
        assert isvc_name(original) == name
        assert model["storage"] == {
            "key": "triton-model-store",
            "parameters": {"bucket": "models-bucket"},
            "path": f"triton/{original}",
        }
        formats[original] = model["modelFormat"]["name"]
    assert formats["mlp"] == "onnx" and formats["fixed"] == "onnx"
    if "affine_ts" in formats:  # the TorchScript models exist where torch is installed
        assert formats["affine_ts"] == "pytorch"
    assert set(formats.values()) == declared


def test_the_runtime_declares_the_triton_adapter_ports_and_formats_as_kserves_triton_runtime_does(
    mesh_out: Path,
) -> None:
    (runtime,) = _docs(mesh_out / "kserve/servingruntime.yaml")
    spec = runtime["spec"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    assert spec["multiModel"] is True and spec["protocolVersions"] == ["grpc-v2"]
    assert spec["grpcEndpoint"] == "port:8085" and spec["grpcDataEndpoint"] == "port:8001"
    assert spec["builtInAdapter"] == {
        "serverType": "triton",
        "runtimeManagementPort": 8001,
        "memBufferBytes": 134217728,
        "modelLoadingTimeoutMillis": 90000,
    }
    assert ADAPTER["runtime_management_port"] == 8001
    assert all(f["autoSelect"] for f in spec["supportedModelFormats"])
    (container,) = spec["containers"]
    assert container["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert container["command"] == ["/bin/sh"]
    line = container["args"][1]
    assert line.startswith("mkdir -p /models/_triton_models && chmod 777 /models/_triton_models && exec ")
    assert "--model-control-mode=explicit" in line and "--strict-readiness=false" in line
    assert container["livenessProbe"]["exec"]["command"][-1] == "http://localhost:8000/v2/health/live"


def test_the_modelmesh_tree_validates_offline_by_sdk_crd_and_pod_schema(mesh_out: Path) -> None:
    findings = check_tree(mesh_out)
    bad = [f for f in findings if not f.ok]
    assert not bad, bad
    hows = {f.file: f.how for f in findings if f.file.startswith("kserve/")}
    assert hows["kserve/servingruntime.yaml"] == "CRD fields + Pod schema + kserve SDK models"
    assert hows["kserve/models/mlp.yaml"] == "kserve SDK models"


def _tree_copy(mesh_out: Path, tmp_path: Path) -> Path:
    copy_root = tmp_path / "deploy"
    shutil.copytree(mesh_out, copy_root, symlinks=True)
    return copy_root


@pytest.mark.parametrize(
    ("where", "change", "expected"),
    [
        ("runtime", lambda o: o["spec"].__setitem__("builtInAdaptor", o["spec"].pop("builtInAdapter")),
         "builtInAdaptor"),
        ("runtime", lambda o: o["spec"]["builtInAdapter"].__setitem__("serverType", "trition"), "trition"),
        ("runtime", lambda o: o["spec"].__setitem__("grpcEndpoint", "8085"), "grpcEndpoint"),
        ("runtime", lambda o: o["spec"]["containers"][0].__setitem__("livenesProbe", {}), "livenesProbe"),
        ("runtime", lambda o: o["spec"]["containers"][0]["resources"].__setitem__("limit", {}), "limit"),
        ("runtime", lambda o: o["spec"]["containers"][0].update(name="tritonserver"),
         "needs a container named 'triton'"),
        ("runtime", lambda o: o["spec"]["containers"][0].update(readinessProbe={"exec": {"command": ["a"]}}),
         "manages readinessProbe and lifecycle itself"),
        ("isvc", lambda o: o["spec"]["predictor"]["model"]["storage"].__setitem__("bucket", "b"),
         "storage/bucket"),
        ("isvc", lambda o: o["spec"]["predictor"]["model"]["modelFormat"].__setitem__("name", "tensorflow"),
         "declares no model format 'tensorflow'"),
        ("isvc", lambda o: o["spec"]["predictor"]["model"].__setitem__("runtime", "triton-2.x"),
         "'triton-2.x' is no ServingRuntime of this tree"),
        ("isvc", lambda o: o["spec"]["predictor"]["model"].__setitem__("storageUri", "s3://b/m"),
         "both storageUri and storage.path"),
        ("isvc", lambda o: o["spec"]["predictor"]["model"].pop("storage"),
         "needs storageUri or storage.path"),
        ("isvc", lambda o: o["spec"]["predictor"]["model"]["storage"]["parameters"].update(type="pvc"),
         "refuses storage type 'pvc'"),
    ],
)  # fmt: skip
def test_check_tree_reports_a_wrong_field_in_the_modelmesh_objects(
    mesh_out: Path, tmp_path: Path, where: str, change: Any, expected: str
) -> None:
    root = _tree_copy(mesh_out, tmp_path)
    path = root / ("kserve/servingruntime.yaml" if where == "runtime" else "kserve/models/mlp.yaml")
    obj = _docs(path)[0]
    change(obj)
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    bad = [f for f in check_tree(root) if not f.ok]
    assert [f.file for f in bad] == [str(path.relative_to(root))], bad
    assert expected in (bad[0].problem or ""), bad[0].problem


def test_validate_object_checks_a_serving_runtime_alone(mesh_out: Path) -> None:
    (runtime,) = _docs(mesh_out / "kserve/servingruntime.yaml")
    assert validate_object(runtime)[1] is None
    broken = copy.deepcopy(runtime)
    broken["spec"]["containers"][0]["image"] = 7
    how, problem = validate_object(broken)
    assert how == "CRD fields + Pod schema + kserve SDK models"
    assert problem is not None and "containers/0/image" in problem


# -- stores, names and what ModelMesh can't do ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "storage"),
    [
        ("s3://bucket/a/b",
         {"storage": {"key": "t-model-store", "parameters": {"bucket": "bucket"}, "path": "a/b/m_1"}}),
        ("gs://bucket",
         {"storage": {"key": "t-model-store", "parameters": {"bucket": "bucket"}, "path": "m_1"}}),
        ("as://acct/box/repo",
         {"storage": {"key": "t-model-store", "parameters": {"container": "box"}, "path": "repo/m_1"}}),
        ("pvc://claim/sub/dir", {"storageUri": "pvc://claim/sub/dir/m_1"}),
        ("pvc://claim", {"storageUri": "pvc://claim/m_1"}),
    ],
)  # fmt: skip
def test_mesh_storage_points_at_the_models_folder_in_each_kind_of_store(
    uri: str, storage: dict[str, Any]
) -> None:
    spec = DeploySpec(name="t", store=parse_model_store(uri, name="t"), kserve_mode="ModelMesh")
    assert mesh_storage(spec, "m_1") == storage


def test_isvc_name_raises_deploy_error_for_a_model_name_no_dns_label_can_carry() -> None:
    assert isvc_name("Digits_Vote.v2") == "digits-vote-v2"
    with pytest.raises(DeployError, match=r"'4bits'.*rename the model"):
        isvc_name("4bits")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({}, "not an image: give --model-store s3://"),
        ({"store": "s3://b/r", "canary_steps": (5, 100)}, "ModelMesh has no traffic split"),
        ({"store": "s3://b/r", "restrictions": (parse_restriction("inference:x-key=keys/k"),)},
         "ModelMesh's adapter and router call Triton without the header"),
        ({"store": "s3://b/r", "tls_secret": "tls"}, "without the header or the certificate"),
    ],
)  # fmt: skip
def test_generate_refuses_what_modelmesh_lacks_on_one_line_and_writes_nothing(
    mesh_repo: Path, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    store = changes.pop("store", None)
    spec = DeploySpec(kserve_mode="ModelMesh", **changes)
    if store:
        spec = spec.replace(store=parse_model_store(store, name="triton"))
    with pytest.raises(DeployError, match=message) as err:
        generate(mesh_repo, tmp_path / "out", spec)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_mesh_plan_raises_deploy_error_when_no_model_fits_or_two_share_a_name(
    mesh_repo: Path, tmp_path: Path
) -> None:
    only = tmp_path / "only"
    only.mkdir()
    for name in ("echo_py", "pipe"):
        shutil.copytree(mesh_repo / name, only / name)
    with pytest.raises(DeployError, match=r"no model of .* fits ModelMesh .*--kserve-mode raw"):
        mesh_plan(only)
    twins = tmp_path / "twins"
    twins.mkdir()
    shutil.copytree(mesh_repo / "fixed", twins / "a_b")
    shutil.copytree(mesh_repo / "fixed", twins / "a.b")
    with pytest.raises(
        DeployError, match=re.escape("'a.b' and 'a_b' would both be the InferenceService 'a-b'")
    ):
        mesh_plan(twins)


def test_cli_deploy_kserve_mode_modelmesh_writes_valid_objects(mesh_repo: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["deploy", str(mesh_repo), "-o", str(tmp_path / "out"), "--kserve-mode", "modelmesh",
         "--model-store", "pvc://models/prod", "--loadtests", str(tmp_path / "none")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "offline checks:" in result.output and "objects valid" in result.output
    model = _docs(tmp_path / "out/kserve/models/fixed.yaml")[0]["spec"]["predictor"]["model"]
    assert model["storageUri"] == "pvc://models/prod/fixed" and "storage" not in model
    assert "allowAnyPVC" in (tmp_path / "out/README.md").read_text()
    refused = CliRunner().invoke(
        app, ["deploy", str(mesh_repo), "-o", str(tmp_path / "img"), "--kserve-mode", "modelmesh"]
    )
    assert refused.exit_code != 0
    assert "--kserve-mode modelmesh reads models from an object store or a PVC" in refused.output


# -- the runtime's Triton on the real binary, models laid out as ModelMesh's adapter lays them out -----------

SWAPPED = ("--model-repository=", "--http-port=", "--grpc-port=", "--metrics-port=")


def _adapter_layout(repository: Path, model: str, model_id: str, into: Path) -> None:
    """What ModelMesh's Triton adapter does with a model in Triton's native layout: a folder named by
    ModelMesh's id, the config without its ``name``, the highest version directory linked in."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb2

    source = repository / model
    target = into / model_id
    target.mkdir(parents=True)
    config = text_format.Parse((source / "config.pbtxt").read_text(), pb2.ModelConfig())
    config.ClearField("name")
    (target / "config.pbtxt").write_text(text_format.MessageToString(config))
    highest = max((p for p in source.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    (target / highest.name).symlink_to(highest.resolve(), target_is_directory=True)


@pytest.fixture(scope="module")
def mesh_server(mesh_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    layout = tmp_path_factory.mktemp("mesh-layout") / "_triton_models"
    layout.mkdir()
    for model in ("fixed", "mlp", "two_outputs"):
        _adapter_layout(mesh_repo, model, f"{isvc_name(model)}__isvc-0123456789", layout)
    spec = DeploySpec(store=parse_model_store("s3://b/r", name="triton"), kserve_mode="ModelMesh")
    args = [a for a in triton_mesh_args(spec) if not a.startswith(SWAPPED)]
    assert "--model-control-mode=explicit" in args
    with EmbeddedServer(layout, host="127.0.0.2", model_control="explicit", extra_args=args) as running:
        yield running


def test_the_runtimes_triton_loads_answers_and_unloads_models_under_modelmesh_ids(
    mesh_server: EmbeddedServer,
) -> None:
    with grpcclient.InferenceServerClient(mesh_server.grpc_url) as client:
        assert client.is_server_ready()  # --strict-readiness=false: ready with no model loaded
        ids = {m.name for m in client.get_model_repository_index().models}
        assert ids == {f"{n}__isvc-0123456789" for n in ("fixed", "mlp", "two-outputs")}
        fixed = "fixed__isvc-0123456789"
        client.load_model(fixed)
        out = triton_infer(client, fixed, {"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
        assert out["b"].shape == (3, 2)
        mlp = "mlp__isvc-0123456789"
        client.load_model(mlp)
        assert client.get_model_metadata(mlp).versions == ["2"]  # the highest version only
        assert triton_infer(client, mlp, {"x": np.ones((1, 8), np.float32)})["probs"].shape == (1, 3)
        client.unload_model(fixed)
        deadline = time.monotonic() + 30
        while client.is_model_ready(fixed) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not client.is_model_ready(fixed)
        client.unload_model(mlp)
    options = {
        cells[1].strip(): cells[2].strip()
        for cells in (line.split("|") for line in mesh_server.log.splitlines())
        if len(cells) == 4
    }
    assert options["model_control_mode"] == "MODE_EXPLICIT"
    assert options["strict_readiness"] == "0"


def test_gpu_pods_of_the_runtime_ask_for_the_gpu_tolerate_and_select_gpu_nodes(
    mesh_repo: Path, tmp_path: Path
) -> None:
    spec = DeploySpec(
        store=parse_model_store("gs://bucket/repo", name="triton"), kserve_mode="ModelMesh", gpus=1
    )
    generate(mesh_repo, tmp_path / "out", spec)
    (runtime,) = _docs(tmp_path / "out/kserve/servingruntime.yaml")
    pod = runtime["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--allow-gpu-metrics=true" in container["args"][1]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (
        "key 'triton-model-store' to ModelMesh's storage-config Secret"
        in (tmp_path / "out/README.md").read_text()
    )
    assert "type (gcs)" in (tmp_path / "out/README.md").read_text()
    assert not [f for f in check_tree(tmp_path / "out") if not f.ok]
