"""KServe ModelMesh output: a Triton ``ServingRuntime`` behind ModelMesh's built-in adapter and one
``InferenceService`` per model in ModelMesh mode, for a repository larger than one pod holds.

ModelMesh (kserve/modelmesh-serving) places each model on the runtime pods it chooses, loads it on its
first request, keeps the used ones loaded and unloads the least recently used under each pod's memory. Its
Triton adapter loads one model at a time into a Triton started with ``--model-control-mode=explicit``,
under ModelMesh's own id for the model: a model in Triton's native layout (a ``config.pbtxt``) keeps its
config without the ``name`` field, and only its highest version directory is loaded.

What does not fit, and is left out with the reason named (the kustomize base serves the whole repository):

- an **ensemble**: its steps call the composing models by their names, and ModelMesh loads those under its
  own ids, maybe on other pods; an ensemble needs its composing models in one Triton;
- a **Python-backend model**: ModelMesh's Triton runtime declares no ``python`` format, ModelMesh sizes a
  model by its files while a Python model costs a stub process, and a routed (BLS) model calls other models
  by name like an ensemble.

Refused with one line (a feature ModelMesh lacks): an ``image://`` store (ModelMesh pulls from object
stores and PVCs), canary steps (no traffic split in ModelMesh mode), restricted protocols and gRPC TLS on
Triton (ModelMesh's adapter and router call Triton without the header or the certificate).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonforge.config import ModelConfig
from tritonforge.deploy.kube import gpu_toleration, labels, resources
from tritonforge.deploy.models import read_configs
from tritonforge.deploy.spec import GRPC_PORT, HTTP_PORT, METRICS_PORT, DeploySpec
from tritonforge.errors import DeployError

__all__ = [
    "ADAPTER",
    "MODEL_FORMATS",
    "MeshPlan",
    "isvc_name",
    "mesh_plan",
    "mesh_storage",
    "modelmesh_files",
    "modelmesh_objects",
    "runtime_name",
]

#: Triton platform or backend -> the model format ModelMesh matches an InferenceService on
MODEL_FORMATS: Mapping[str, str] = {
    "onnxruntime_onnx": "onnx",
    "onnxruntime": "onnx",
    "pytorch_libtorch": "pytorch",
    "pytorch": "pytorch",
    "tensorrt_plan": "tensorrt",
    "tensorrt": "tensorrt",
    "tensorflow_savedmodel": "tensorflow",
    "tensorflow_graphdef": "tensorflow",
    "tensorflow": "tensorflow",
}
#: ModelMesh's built-in Triton adapter, as KServe's own triton-2.x runtime declares it: it manages Triton's
#: models over gRPC, keeps 128 MiB of the container's memory out of the model budget, and gives a load 90 s
ADAPTER: Mapping[str, Any] = {
    "server_type": "triton",
    "runtime_management_port": GRPC_PORT,
    "mem_buffer_bytes": 128 << 20,
    "model_loading_timeout_millis": 90_000,
}
#: where the adapter lays out the models it loads (inside ModelMesh's /models volume)
MESH_REPOSITORY = "/models/_triton_models"
#: the gRPC port of ModelMesh's adapter inside the pod (KServe's triton-2.x runtime uses it too)
ADAPTER_PORT = 8085
#: a ModelMesh-mode InferenceService's name: a DNS-1035 label
_ISVC_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """Which models ModelMesh serves (InferenceService name -> (model, format)) and which it can't (model
    -> why), and the notes a user must read (versions ModelMesh won't load)."""

    services: Mapping[str, tuple[str, str]]
    left_out: Mapping[str, str]
    notes: tuple[str, ...] = ()


def runtime_name(spec: DeploySpec) -> str:
    return spec.name


def isvc_name(model: str) -> str:
    """The InferenceService (and ModelMesh model) name for a Triton model: lower case, '_' and '.' as '-'.

    Raises:
        DeployError: the result is no DNS-1035 label (starts with a digit, too long, odd characters).
    """
    name = re.sub(r"[_.]", "-", model.lower())
    if not _ISVC_NAME.match(name) or len(name) > 63:
        raise DeployError(
            f"model '{model}' can't be a ModelMesh InferenceService: '{name}' is no DNS-1035 label "
            "(lower-case letters, digits and '-', starting with a letter, at most 63 characters); "
            "rename the model"
        )
    return name


def _versions(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def mesh_plan(repository: Path, configs: Mapping[str, ModelConfig] | None = None) -> MeshPlan:
    """Sort ``repository``'s models into those ModelMesh serves and those it can't (with why).

    Raises:
        DeployError: two models map to one InferenceService name, a name is no DNS-1035 label, or no model
            of the repository fits ModelMesh.
    """
    configs = read_configs(repository) if configs is None else configs
    services: dict[str, tuple[str, str]] = {}
    left_out: dict[str, str] = {}
    notes: list[str] = []
    for model, config in configs.items():
        folder = repository / model
        if config.platform == "ensemble" or config.ensemble_steps:
            left_out[model] = "an ensemble: its composing models must live in one Triton under their names"
            continue
        if config.backend == "python":
            left_out[model] = (
                "a Python-backend model: ModelMesh's Triton runtime has no python format and sizes models "
                "by their files, not their stub process"
            )
            continue
        fmt = MODEL_FORMATS.get(config.platform or "") or MODEL_FORMATS.get(config.backend or "")
        if fmt is None:
            left_out[model] = f"backend {config.backend or config.platform!r} is no ModelMesh model format"
            continue
        name = isvc_name(model)
        if name in services:
            raise DeployError(
                f"models '{services[name][0]}' and '{model}' would both be the InferenceService '{name}' "
                "under ModelMesh; rename one"
            )
        services[name] = (model, fmt)
        versions = _versions(folder)
        if len(versions) > 1:
            notes.append(
                f"'{model}' has versions {', '.join(map(str, versions))}: ModelMesh loads only the highest "
                f"({versions[-1]}); roll versions out by changing the InferenceService's storage path"
            )
    if not services:
        why = "; ".join(f"{m}: {r}" for m, r in list(left_out.items())[:3])
        raise DeployError(
            f"no model of {repository} fits ModelMesh ({why}); use --kserve-mode raw or serverless"
        )
    return MeshPlan(services=services, left_out=left_out, notes=tuple(notes))


def check_mesh_spec(spec: DeploySpec) -> None:
    """The options ModelMesh can't honour, refused on one line each.

    Raises:
        DeployError: an image store, canary steps, restricted protocols or gRPC TLS with ModelMesh.
    """
    if spec.store.kind == "image":
        raise DeployError(
            "--kserve-mode modelmesh reads models from an object store or a PVC, not an image: give "
            "--model-store s3://..., gs://..., as://... or pvc://CLAIM"
        )
    if spec.canary_steps:
        raise DeployError(
            "--canary-steps: ModelMesh has no traffic split between versions; use --kserve-mode raw "
            "or serverless for a canary, or `tritonforge rollout` against the pods"
        )
    if spec.restrictions or spec.tls_secret:
        raise DeployError(
            "--restrict/--tls-secret: ModelMesh's adapter and router call Triton without the header or the "
            "certificate; secure ModelMesh's own Service (its TLS settings) instead, or use --kserve-mode raw"
        )


def mesh_storage(spec: DeploySpec, model: str) -> dict[str, Any]:
    """Where one model's InferenceService finds it: for an object store, ``storage`` with the key of
    ``storage-config`` (ModelMesh's Secret of store credentials), the bucket or container and the path of
    the model's folder; for a PVC, ``storageUri`` ``pvc://CLAIM/PATH``, which ModelMesh reads as the claim
    and the path (a ``storage`` with ``type: pvc`` would do the same, but KServe's own admission webhook,
    where KServe runs beside ModelMesh, accepts only s3/hdfs/webhdfs as a storage type)."""
    store = spec.store
    if store.kind == "pvc":
        path = f"{store.subpath}/{model}" if store.subpath else model
        return {"storageUri": f"pvc://{store.claim_or_image}/{path}"}
    location = store.uri.partition("://")[2]
    if store.kind == "as":
        _account, _, rest = location.partition("/")
        container, _, prefix = rest.partition("/")
        parameters = {"container": container}
    else:
        bucket, _, prefix = location.partition("/")
        parameters = {"bucket": bucket}
    path = f"{prefix.strip('/')}/{model}" if prefix.strip("/") else model
    return {"storage": {"key": store.secret, "parameters": parameters, "path": path}}


def _triton_command(spec: DeploySpec) -> str:
    """The container's shell line: make the adapter's repository folder, then exec Triton on it."""
    args = [
        f"--model-repository={MESH_REPOSITORY}",
        "--model-control-mode=explicit",
        # ModelMesh decides what is loaded: readiness must not wait for models
        "--strict-readiness=false",
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        f"--metrics-port={METRICS_PORT}",
        "--allow-http=true",
        "--allow-sagemaker=false",
        "--allow-metrics=true",
        "--allow-cpu-metrics=true",
        f"--allow-gpu-metrics={'true' if spec.gpus else 'false'}",
        f"--exit-timeout-secs={spec.exit_timeout_s}",
        "--log-verbose=0",
    ]
    return f"mkdir -p {MESH_REPOSITORY} && chmod 777 {MESH_REPOSITORY} && exec tritonserver " + " ".join(
        shlex.quote(a) for a in args
    )


def triton_mesh_args(spec: DeploySpec) -> list[str]:
    """Triton's arguments in the runtime's container (the tests run them on the real binary)."""
    return shlex.split(_triton_command(spec).partition("exec tritonserver ")[2])


def _runtime_plan(spec: DeploySpec, namespace: str, formats: list[str]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "triton",
        "image": spec.serving_image,
        "command": ["/bin/sh"],
        "args": ["-c", _triton_command(spec)],
        "resources": resources(spec, spec.gpus),
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        # Triton listens where ModelMesh's containers reach it; the kubelet's probe runs inside the pod
        "livenessProbe": {
            "exec": {
                "command": [
                    "curl",
                    "--fail",
                    "--silent",
                    "--show-error",
                    "--max-time",
                    "9",
                    f"http://localhost:{HTTP_PORT}/v2/health/live",
                ]
            },
            "initialDelaySeconds": 5,
            "periodSeconds": 30,
            "timeoutSeconds": 10,
        },
    }
    return {
        "name": runtime_name(spec),
        "namespace": namespace,
        "labels": labels(spec, "modelmesh"),
        # ModelMesh loads at most this many models at once per pod (KServe's Triton runtime: 2)
        "annotations": {"maxLoadingConcurrency": "2"},
        "formats": [{"name": f, "auto_select": True} for f in formats],
        "grpc_endpoint": f"port:{ADAPTER_PORT}",
        "grpc_data_endpoint": f"port:{GRPC_PORT}",
        "replicas": spec.min_replicas,
        "containers": [container],
        "adapter": dict(ADAPTER),
        "image_pull_secrets": [{"name": s} for s in spec.image_pull_secrets],
        "node_selector": dict(spec.gpu_node_selector) if spec.gpus else None,
        "tolerations": [gpu_toleration()] if spec.gpus else None,
    }


def modelmesh_objects(spec: DeploySpec, plan: MeshPlan, *, namespace: str) -> list[dict[str, Any]]:
    """The ServingRuntime, then one InferenceService per model of ``plan``, built from the kserve SDK's
    models (one interpreter for all of them, see :mod:`tritonforge.deploy._kserve_child`).

    Raises:
        DeployError: the options don't fit ModelMesh, or the kserve SDK is missing or failed.
    """
    from tritonforge.deploy.extras import kserve_sdk

    check_mesh_spec(spec)
    formats = sorted({fmt for _, fmt in plan.services.values()})
    services = [
        {
            "name": name,
            "namespace": namespace,
            "labels": {**labels(spec, "modelmesh"), "tritonforge.io/model": _label(model)},
            "annotations": {"serving.kserve.io/deploymentMode": "ModelMesh"},
            "format": fmt,
            "runtime": runtime_name(spec),
            **mesh_storage(spec, model),
        }
        for name, (model, fmt) in plan.services.items()
    ]
    answer = kserve_sdk(
        {"op": "modelmesh", "runtime": _runtime_plan(spec, namespace, formats), "services": services}
    )
    return list(answer["objects"])


def _label(model: str) -> str:
    """A model name as a label value (63 characters of letters, digits, '-', '_', '.')."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", model)[:63].strip("-_.")


def modelmesh_files(
    spec: DeploySpec, repo: Path, configs: Mapping[str, ModelConfig] | None = None
) -> tuple[dict[str, Any], list[str], list[str]]:
    """The ServingRuntime and one InferenceService per model (ModelMesh mode) under ``kserve/``, the steps
    before applying them and the notes (the models left out, and why).

    Raises:
        DeployError: the options or the repository don't fit ModelMesh, or the kserve SDK failed.
    """
    check_mesh_spec(spec)
    ns = spec.prod_namespace
    plan = mesh_plan(repo, configs)
    store_type = {"gs": "gcs", "as": "azure"}.get(spec.store.kind, spec.store.kind)
    runtime, *services = modelmesh_objects(spec, plan, namespace=ns)
    files: dict[str, Any] = {"kserve/servingruntime.yaml": runtime}
    for isvc in services:
        files[f"kserve/models/{isvc['metadata']['name']}.yaml"] = isvc
    files["kserve/kustomization.yaml"] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": ns,
        "resources": ["servingruntime.yaml", *(f"models/{i['metadata']['name']}.yaml" for i in services)],
    }
    steps = [
        f"Install ModelMesh Serving with `{ns}` as a user namespace (label it modelmesh-enabled=true) "
        f"before `kubectl apply -k kserve`: it runs the ServingRuntime {runtime_name(spec)}'s pods.",
        (
            "Let ModelMesh mount the claim: allowAnyPVC: true in its model-serving-config ConfigMap, "
            f'or a pvc entry {{"type": "pvc", "name": "{spec.store.claim_or_image}"}} in its '
            "storage-config Secret."
            if spec.store.kind == "pvc"
            else f"Add the key '{spec.store.secret}' to ModelMesh's storage-config Secret in {ns}: the "
            f"store's type ({store_type}) and credentials as JSON (ModelMesh's puller reads only that "
            "Secret)."
        ),
    ]
    renamed = [f"{model} as {name}" for name, (model, _) in plan.services.items() if model != name]
    notes = [
        "ModelMesh serves every model behind one Service (modelmesh-serving, gRPC port 8033), each by "
        "its InferenceService's name" + (f": {', '.join(renamed)}" if renamed else ""),
        *plan.notes,
    ]
    if plan.left_out:
        notes.append(
            "not in ModelMesh, served by the base Deployment (overlays/) with the whole repository: "
            + "; ".join(f"{m} ({why})" for m, why in plan.left_out.items())
        )
    return files, steps, notes
