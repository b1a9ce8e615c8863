"""``tritonforge deploy``: the whole tree of manifests from a model repository, written atomically.

Layout of ``OUT/``::

    base/                  kustomize base: Deployment, Services (+ headless), PDB, ServiceMonitor,
                           ServiceAccount, NetworkPolicy[, Ingress][, PVC with a named storage class]
    overlays/dev/          namespace (PodSecurity restricted), small pods, HPA 1..2 (KEDA beside it)
    overlays/prod/         namespace, pods spread one per node, HPA min..max (KEDA beside it)
    autoscaling/           prometheus-adapter rule (Helm values and a ConfigMap) serving the HPA metric
    kserve/                InferenceService (RawDeployment or Serverless), its ServiceAccount, PodMonitor;
                           in ModelMesh mode: the Triton ServingRuntime and models/<name>.yaml, one
                           InferenceService per model
    kserve/canary/         with --canary-steps: one patch per step, rollback.yaml and plan.json
    loadtest/              distributed locust (ConfigMap of loadtests/, master, workers)
    batch/                 Indexed Job running `tritonforge batch-infer --shard K/N`, and its data PVC
    compose/               docker-compose.yaml for one host
    repository/            the repository as deployed (GPU instance groups when the pods have GPUs)
    images/                Dockerfiles of every image built here: server (when the Python models need
                           packages), models (the image store), tools (locust, batch-infer)
    README.md              how to apply it, and how the sizing was decided
    tritonforge-deploy.json  what it was generated from
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tritonforge.cache import CACHE_MODEL, CacheBudget
from tritonforge.config import ModelConfig
from tritonforge.deploy import kube, scaling, tools
from tritonforge.deploy.cache import cache_files, cache_memory_request
from tritonforge.deploy.canary import canary_patches, canary_plan, step_file
from tritonforge.deploy.extras import compose_file, inference_service
from tritonforge.deploy.gpu import gpu_capable_models, rewrite_for_gpus
from tritonforge.deploy.images import (
    image_set,
    models_dockerfile,
    requirement_lines,
    server_dockerfile,
    tools_dockerfile,
)
from tritonforge.deploy.metrics import adapter_rule, gpu_queries, keda_query, pod_query
from tritonforge.deploy.modelmesh import modelmesh_files
from tritonforge.deploy.models import checked_configs, instance_counts, python_models, repository_models
from tritonforge.deploy.sizing import Sizing
from tritonforge.deploy.spec import DeploySpec
from tritonforge.errors import DeployError, TritonForgeError
from tritonforge.server.embedded import load_with

__all__ = ["Generated", "generate", "overlay_patches", "repository_models"]

KUSTOMIZE = "kustomize.config.k8s.io/v1beta1"
Obj = dict[str, Any]


@dataclasses.dataclass
class Generated:
    out: Path
    files: list[str]
    spec: DeploySpec
    notes: list[str]
    sizing: Sizing | None = None


def _adapter_prometheus(url: str) -> Obj:
    """The prometheus-adapter chart takes the URL without its port, and the port apart."""
    scheme, _, rest = url.rstrip("/").partition("://")
    host, _, port = rest.partition(":")
    return {"url": f"{scheme}://{host}", "port": int(port or (443 if scheme == "https" else 80))}


def _small(spec: DeploySpec) -> DeploySpec:
    # the GPUs stay: the deployed configs place the models on them; with the cache the memory stays too:
    # its budget is per pod and was checked against the base's limit
    if spec.cache is not None:
        return spec.replace(cpu_request="1", cpu_limit="2")
    return spec.replace(cpu_request="1", cpu_limit="2", memory_request="2Gi", memory_limit="4Gi")


def overlay_patches(spec: DeploySpec, overlay: str) -> list[Obj]:
    """JSON-patch (RFC 6902) operations an overlay applies to the base Deployment. Each changes one
    field; none touches the replicas (the HPA's) or the server's arguments (the base's alone, so an edit
    there is never silently replaced by an overlay's copy)."""
    container = "/spec/template/spec/containers/0"
    if overlay == "dev":
        return [
            {
                "op": "replace",
                "path": f"{container}/resources",
                "value": kube.resources(_small(spec), spec.gpus),
            }
        ]
    return [
        # the hostname spread (the second constraint): two prod replicas never share a node
        {
            "op": "replace",
            "path": "/spec/template/spec/topologySpreadConstraints/1/whenUnsatisfiable",
            "value": "DoNotSchedule",
        }
    ]


def _kustomization(resources: Sequence[str], **extra: Any) -> Obj:
    return {"apiVersion": KUSTOMIZE, "kind": "Kustomization", **extra, "resources": list(resources)}


def _overlay(spec: DeploySpec, overlay: str) -> dict[str, Any]:
    namespace = spec.dev_namespace if overlay == "dev" else spec.prod_namespace
    low, high = (1, 2) if overlay == "dev" else (spec.min_replicas, spec.max_replicas)
    scaled = _small(spec) if overlay == "dev" else spec
    return {
        "namespace.yaml": kube.namespace(namespace, spec),
        "hpa.yaml": scaling.hpa(scaled, min_replicas=low, max_replicas=high),
        "keda-scaledobject.yaml": scaling.keda_scaled_object(
            scaled, namespace=namespace, min_replicas=low, max_replicas=high
        ),
        "kustomization.yaml": _kustomization(
            ["namespace.yaml", "../../base", "hpa.yaml"],
            namespace=namespace,
            labels=[{"pairs": {"tritonforge.io/overlay": overlay}, "includeSelectors": False}],
            patches=[
                {
                    "target": {"group": "apps", "version": "v1", "kind": "Deployment", "name": spec.name},
                    "patch": json.dumps(overlay_patches(spec, overlay)),
                }
            ],
        ),
    }


def _readme(spec: DeploySpec, sizing: Sizing | None, notes: Sequence[str], steps: Sequence[str]) -> str:
    ns = spec.prod_namespace
    lines = [
        f"# Deploying `{spec.name}` (generated by `tritonforge deploy`)",
        "",
        f"Image: `{spec.serving_image}`. Models: {', '.join(spec.models)}. Repository: `{spec.store.uri}`.",
        "",
        "## Before the first apply",
        "",
        *[f"{i}. {step}" for i, step in enumerate(steps, 1)],
        "",
        "## Apply",
        "",
        f"Everything below lives in one namespace, `{ns}` (the dev overlay: `{spec.dev_namespace}`).",
        "",
        "    kubectl apply -k overlays/prod      # or overlays/dev",
        "    helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter \\",
        f"        -n {spec.monitoring_namespace} -f autoscaling/prometheus-adapter-values.yaml",
        "    kubectl apply -k kserve                               # instead of the overlays, on KServe",
        "    kubectl apply -k loadtest                             # distributed locust",
        "    kubectl apply -k batch                                # the sharded batch Job",
        "    docker compose -f compose/docker-compose.yaml up -d   # one host",
        "",
        "KEDA instead of the HPA: in an overlay's kustomization.yaml replace `hpa.yaml` with",
        "`keda-scaledobject.yaml`.",
        "",
        f"Per-pod autoscaling metric (what the HPA averages), in `{ns}`:",
        "",
        f"    {pod_query(spec, ns)}",
        "",
    ]
    if spec.gpus:
        lines += ["GPU metrics per pod (Triton exports them with --allow-gpu-metrics, on here):", ""]
        lines += [f"    {q}" for q in gpu_queries(spec, ns).values()]
        lines += [""]
    if spec.canary_steps:
        lines += [
            "## KServe canary",
            "",
            f"Steps {', '.join(f'{p}%' for p in spec.canary_steps)}, each held {spec.canary_hold_s} s "
            "(kserve/canary/plan.json: thresholds and the PromQL per step). Roll out the new version",
            "(a new storageUri in kserve/inferenceservice.yaml, `kubectl apply -f`), then per step:",
            "",
            *[
                f"    kubectl patch inferenceservice {spec.name} -n {ns} --type merge "
                f"--patch-file kserve/canary/{step_file(i, p)}"
                for i, p in enumerate(spec.canary_steps, 1)
            ],
            "",
            "and on a breached threshold: `... --patch-file kserve/canary/rollback.yaml`.",
            "",
        ]
    if sizing is not None:
        lines += ["## Sizing", "", *[f"- {r}" for r in sizing.reasons], ""]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


class _SafeDumper(yaml.SafeDumper):
    """The safe dumper, writing a dict used twice (a selector and the pod labels) out in full both
    times: anchors and aliases are valid YAML but read badly and some tools reject them."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(content: Any) -> str:
    if isinstance(content, str):
        return content
    docs = content if isinstance(content, list) else [content]
    return yaml.dump_all(docs, Dumper=_SafeDumper, sort_keys=False, default_flow_style=False, width=120)


def python_requirements(
    repository: Path, target: str, configs: Mapping[str, ModelConfig] | None = None
) -> dict[str, list[str]]:
    """Model -> the pinned pip requirement lines its Python code needs beyond ``target`` (NVIDIA's image);
    imports with a fallback (listed commented out) are not installed.

    Raises:
        DeployError: a model's code is not readable Python, or ``target`` is no NVIDIA tag.
    """
    from tritonforge.repository.requirements import python_requirements as needed

    try:
        found = needed(repository, target, configs=configs)
    except (TritonForgeError, ValueError) as exc:
        raise DeployError(f"the Python models' requirements for {target}: {exc}") from exc
    required = {m: [line for line in lines if not line.startswith("#")] for m, lines in found.items()}
    return {m: lines for m, lines in required.items() if lines}


def _store_steps(spec: DeploySpec, out: Path) -> list[str]:
    """How the repository (``OUT/repository``, as deployed) gets into the store: the one command."""
    store = spec.store
    deployed = out / "repository"
    if store.object_store:
        # the cloud's own copy tool does the same where `tritonforge push` is not installed
        bucket_path = store.uri.partition("://")[2]
        account, _, blob_path = bucket_path.partition("/")
        container, _, prefix = blob_path.partition("/")
        same = {
            "s3": f"aws s3 sync {deployed} {store.uri}",
            "gs": f"gcloud storage rsync -r {deployed} {store.uri}",
            "as": f"az storage blob upload-batch --account-name {account} -d {container} "
            f"--destination-path {prefix or '.'} -s {deployed}",
        }[store.kind]
        return [
            f"Put the deployed repository into the store: `tritonforge push {deployed} {store.uri}` "
            f"(the same with the cloud's tool: `{same}`).",
            *(
                []
                if spec.workload_identity
                else [
                    f"Create the Secret '{store.secret}' with the store's credentials (never in these files)."
                ]
            ),
        ]
    if store.kind == "image":
        return [
            f"Build and push the models image: `docker build -f images/models/Dockerfile -t "
            f"{store.claim_or_image} . && docker push {store.claim_or_image}` (in {out}).",
        ]
    where = f"'{store.claim_or_image}'" + (f" under {store.subpath}/" if store.subpath else "")
    made = (
        f"generated here (base/pvc.yaml, class {store.storage_class}, ReadOnlyMany)"
        if store.storage_class
        else "your existing claim (none is generated: the clouds' default classes offer no ReadOnlyMany)"
    )
    return [f"Copy {deployed} into the claim {where}, {made}, from a pod that mounts it read-write."]


def generate(
    repository: str | os.PathLike[str],
    out: str | os.PathLike[str],
    spec: DeploySpec | None = None,
    *,
    sizing: Sizing | None = None,
    instances: Mapping[str, int] | None = None,
    locustfiles: Mapping[str, str] | None = None,
    canary_thresholds: Mapping[str, float] | None = None,
    allow_idle_gpus: bool = False,
    force: bool = False,
) -> Generated:
    """Write every manifest for serving ``repository`` into ``out`` (built beside it, then moved into
    place, so ``out`` is never half-written), with the repository as deployed and the images' Dockerfiles.

    Raises:
        DeployError: a bad repository, ``out`` not empty without ``force``, GPUs asked for a repository
            with no model that runs on one (unless ``allow_idle_gpus``), or options that don't fit.
    """
    repo = Path(repository)
    target = Path(out)
    spec = spec or DeploySpec()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise DeployError(f"{target} exists and is not empty; pass --force to replace it")
    configs = checked_configs(repo)  # every step below reads the models from these
    counts = instance_counts(configs)
    notes: list[str] = []
    if spec.cache is not None:
        spec = _with_cache(spec, spec.cache, counts, repo, notes)
    measured = dict(instances or {})
    instances = {m: n for m, n in counts.items() if n}
    if sizing is not None:
        measured.update(sizing.instances)
        spec = spec.replace(
            replicas=sizing.replicas, min_replicas=sizing.min_replicas, max_replicas=sizing.max_replicas
        )
    for model, n in measured.items():
        if model not in counts:
            raise DeployError(f"the measured config names model '{model}', which {repo} doesn't have")
        if instances.get(model) != n:
            notes.append(
                f"'{model}' was measured with {n} instance(s) but {repo} has {instances.get(model)}: "
                "write the tuned configs first (`tritonforge tune ... --write`) and deploy again"
            )
        instances[model] = n
    gpu_models = gpu_capable_models(repo, configs) if spec.gpus else []
    if spec.gpus and not gpu_models and not allow_idle_gpus:
        raise DeployError(
            f"--gpus {spec.gpus}: no model of {repo} runs on a GPU (Python models and ensembles stay on "
            "the CPU), so the GPUs would sit idle; drop --gpus, or pass --allow-idle-gpus to pay for them"
        )
    requirements = python_requirements(repo, spec.image, configs)
    images = image_set(spec.name, base_image=spec.image, registry=spec.registry, requirements=requirements)
    spec = spec.replace(
        models=tuple(counts),
        instances=instances,
        server_image=images.server if images.server_built else "",
    )
    python = python_models(repo, configs)
    if python and not requirements:
        notes.append(
            f"{', '.join(python)} run on Triton's Python backend with what {spec.image} has (the standard "
            "library and numpy); check what they import with `tritonforge validate`"
        )
    batch_model = spec.batch_model or next(iter(instances), next(iter(counts)))
    if batch_model not in counts:
        raise DeployError(f"batch model '{batch_model}' is not in {repo}; it has: {', '.join(counts)}")
    steps = _store_steps(spec, target)
    base_resources = [
        "serviceaccount.yaml",
        "deployment.yaml",
        "services.yaml",
        "pdb.yaml",
        "servicemonitor.yaml",
        "networkpolicy.yaml",
    ]
    files: dict[str, Any] = {
        "base/serviceaccount.yaml": kube.service_account(spec),
        "base/deployment.yaml": kube.deployment(spec),
        "base/services.yaml": kube.services(spec),
        "base/pdb.yaml": kube.pdb(spec),
        "base/servicemonitor.yaml": kube.service_monitor(spec),
        "base/networkpolicy.yaml": kube.network_policy(spec),
    }
    if spec.ingress_host:
        files["base/ingress.yaml"] = kube.ingress(spec)
        base_resources.append("ingress.yaml")
        steps.append(
            f"Create the TLS Secret '{spec.name}-ingress-tls' for {spec.ingress_host} (the Ingress's front)."
        )
    if spec.store.kind == "pvc" and spec.store.storage_class:
        files["base/pvc.yaml"] = kube.pvc(
            spec.store.claim_or_image,
            spec,
            size=spec.store.size,
            mode="ReadOnlyMany",
            component="models",
            storage_class=spec.store.storage_class,
        )
        base_resources.append("pvc.yaml")
    if spec.cache is not None:
        files["base/cache-configmap.yaml"] = kube.cache_config_map(spec)
        base_resources.append("cache-configmap.yaml")
        for path, text in cache_files(spec.cache).items():  # compose mounts it from here
            files[f"cache/{CACHE_MODEL}/{path}"] = text
    files["base/kustomization.yaml"] = _kustomization(base_resources)
    for overlay in ("dev", "prod"):
        for name, content in _overlay(spec, overlay).items():
            files[f"overlays/{overlay}/{name}"] = content
    rule = adapter_rule(spec)
    files["autoscaling/prometheus-adapter-values.yaml"] = {
        "prometheus": _adapter_prometheus(spec.prometheus_url),
        "rules": {"default": False, "custom": [rule]},
    }
    files["autoscaling/prometheus-adapter-rules.yaml"] = scaling.prometheus_adapter_configmap(
        spec, adapter_namespace=spec.monitoring_namespace
    )
    files["autoscaling/keda-query-prod.promql"] = keda_query(spec, spec.prod_namespace) + "\n"
    if spec.kserve_mode == "ModelMesh":
        mesh_files, mesh_steps, mesh_notes = modelmesh_files(spec, repo, configs)
        files.update(mesh_files)
        steps += mesh_steps
        notes += mesh_notes
    else:
        files.update(_kserve_files(spec, canary_thresholds))
    if spec.restrictions:
        secrets = sorted({(r.secret, r.key) for r in spec.restrictions})
        steps.append(
            "Create the restricted-protocol key Secret(s): "
            + ", ".join(f"'{name}' (key '{key}')" for name, key in secrets)
            + "; compose reads them from the host's env vars "
            + ", ".join(r.env for r in spec.restrictions)
            + "."
        )
    if spec.tls_secret:
        steps.append(
            f"Create the kubernetes.io/tls Secret '{spec.tls_secret}' (tls.crt, tls.key, ca.crt: the "
            "tool pods trust that CA)"
            + (
                f", and '{spec.client_tls_secret}' with the tool pods' client certificate"
                if spec.mtls
                else ""
            )
            + "; KServe and compose are written without gRPC TLS."
        )
    if locustfiles is not None:
        files["loadtest/locust.yaml"] = tools.locust_objects(spec, locustfiles, batch_model)
        files["loadtest/kustomization.yaml"] = _kustomization(["locust.yaml"], namespace=spec.prod_namespace)
    files["batch/job.yaml"] = tools.batch_job(spec, model=batch_model)
    files["batch/data-pvc.yaml"] = kube.pvc(
        f"{spec.name}-batch-data",
        spec,
        size="50Gi",
        mode="ReadWriteMany",
        component="batch",
        storage_class=spec.store.storage_class,
    )
    files["batch/kustomization.yaml"] = _kustomization(
        ["data-pvc.yaml", "job.yaml"], namespace=spec.prod_namespace
    )
    notes.append(
        "batch/data-pvc.yaml asks for ReadWriteMany (the shards run on several nodes): the clouds' "
        "default classes don't offer it; name one that does with --storage-class"
        if not spec.store.storage_class
        else f"batch/data-pvc.yaml uses storage class {spec.store.storage_class} (ReadWriteMany)"
    )
    if spec.store.kind == "image":
        notes.append(
            "KServe reads the models image (storageUri oci://...) only with modelcars enabled in its "
            "storage initializer's config (enableModelcar); otherwise use an object store for KServe"
        )
    files["compose/docker-compose.yaml"] = compose_file(spec, target / "repository", target / "compose")
    files.update(_image_files(spec, images.server_built, requirements))
    steps.append(
        f"Build and push the tools image {spec.tools_image} (locust, batch-infer): images/tools/Dockerfile."
    )
    if images.server_built:
        steps.insert(
            0,
            f"Build and push the server image {spec.server_image} (NVIDIA's {spec.image} plus the Python "
            "models' requirements): `docker build -t "
            f"{spec.server_image} images/server && docker push {spec.server_image}`.",
        )
    if sizing is not None:
        files["sizing.json"] = json.dumps(sizing.as_dict(), indent=2) + "\n"
    files["README.md"] = _readme(spec, sizing, notes, steps)
    record = {
        "repository": str(repo.resolve()),
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "store"},
        "store": dataclasses.asdict(spec.store),
        "models": counts,
        "requirements": requirements,
    }
    files["tritonforge-deploy.json"] = json.dumps(record, indent=2, default=list) + "\n"
    changed: dict[str, str] = {}

    def deployed_repository(copy: Path) -> None:
        if spec.gpus and gpu_models:
            changed.update(rewrite_for_gpus(copy, accelerator=spec.gpu_accelerator, models=gpu_models))  # type: ignore[arg-type]
            what = "; ".join(f"{m}: {w}" for m, w in changed.items())
            notes.insert(0, f"on {spec.gpus} GPU(s) per pod: {what}")
            (copy.parent / "README.md").write_text(_readme(spec, sizing, notes, steps))

    _write_atomically(
        target, {path: _dump(content) for path, content in files.items()}, repo, deployed_repository
    )
    return Generated(out=target, files=sorted(files), spec=spec, notes=[*steps, *notes], sizing=sizing)


def _with_cache(
    spec: DeploySpec, cache: CacheBudget, counts: Mapping[str, int], repo: Path, notes: list[str]
) -> DeploySpec:
    """``spec`` with its memory request raised to the cache's memory budget where it is below, the pins
    checked against the repository and their companions loaded with them."""
    for pin in cache.pins:
        if pin not in counts:
            raise DeployError(f"--pin {pin}: {repo} has no such model; it has: {', '.join(counts)}")
    notes.append(
        f"every server pod runs the model cache ({cache.describe()}); tritonforge's client asks it on a "
        "miss, other clients call it themselves (docs: Many models)"
    )
    loads = tuple(load_with([repo], cache.pins))  # a pin's companions load before it, as in `serve`
    if loads != cache.pins:
        spec = spec.replace(cache_loads=loads)
    request = cache_memory_request(cache, spec.memory_request)
    if request != spec.memory_request:
        notes.append(
            f"the pods' memory request is raised from {spec.memory_request} to {request}: the cache's memory "
            "budget (a full cache holds that much; the scheduler must place the pod where it fits)"
        )
        spec = spec.replace(memory_request=request)
    return spec


def _kserve_files(spec: DeploySpec, canary_thresholds: Mapping[str, float] | None) -> dict[str, Any]:
    """The InferenceService, the ServiceAccount its storage initializer reads credentials from (object
    stores), the PodMonitor that gets its pods scraped, the canary plan: all in the prod namespace."""
    ns = spec.prod_namespace
    files: dict[str, Any] = {}
    resources = ["inferenceservice.yaml", "podmonitor.yaml"]
    if spec.cache is not None:
        files["kserve/cache-configmap.yaml"] = kube.cache_config_map(spec, namespace=ns)
        resources.insert(0, "cache-configmap.yaml")
    account = ""
    if spec.store.object_store or spec.workload_identity:
        account = f"{spec.name}-kserve"
        secrets = [] if spec.workload_identity or not spec.store.object_store else [spec.store.secret]
        files["kserve/serviceaccount.yaml"] = {
            **kube.service_account(spec, account, secrets=secrets),
        }
        resources.insert(0, "serviceaccount.yaml")
    files["kserve/inferenceservice.yaml"] = inference_service(spec, namespace=ns, service_account=account)
    files["kserve/podmonitor.yaml"] = kube.pod_monitor(spec, namespace=ns)
    files["kserve/kustomization.yaml"] = _kustomization(resources, namespace=ns)
    if spec.canary_steps:
        *patches, rollback = canary_patches(spec)
        for i, (percent, patch) in enumerate(zip(spec.canary_steps, patches, strict=True), 1):
            files[f"kserve/canary/{step_file(i, percent)}"] = patch
        files["kserve/canary/rollback.yaml"] = rollback
        plan = canary_plan(spec, namespace=ns, thresholds=dict(canary_thresholds or {}))
        files["kserve/canary/plan.json"] = json.dumps(plan, indent=2) + "\n"
    return files


def _image_files(
    spec: DeploySpec, server_built: bool, requirements: Mapping[str, Sequence[str]]
) -> dict[str, str]:
    files = {"images/tools/Dockerfile": tools_dockerfile(spec.tools_image)}
    if spec.store.kind == "image":
        files["images/models/Dockerfile"] = models_dockerfile(spec.store.claim_or_image)
    if server_built:
        files["images/server/Dockerfile"] = server_dockerfile(spec.image, spec.server_image)
        files["images/server/requirements.txt"] = "\n".join(requirement_lines(requirements)) + "\n"
    return files


def _write_atomically(
    target: Path, texts: Mapping[str, str], repository: Path, finish: Callable[[Path], None]
) -> None:
    """``texts`` and a copy of ``repository`` (as ``repository/``, then changed by ``finish``) into
    ``target``, built beside it and moved into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    old: Path | None = None
    try:
        for rel, text in texts.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        shutil.copytree(repository, staging / "repository", symlinks=False)
        finish(staging / "repository")
        if target.exists():
            old = target.with_name(f".{target.name}-old-{os.getpid()}")
            target.rename(old)
        staging.rename(target)
    except BaseException:
        if old is not None and not target.exists():
            old.rename(target)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(old)
