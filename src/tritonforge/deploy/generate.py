"""``tritonforge deploy``: the whole tree of manifests from a model repository, written atomically.

Layout of ``OUT/``::

    base/                  kustomize base: Deployment, Services (+ headless), PDB, ServiceMonitor[, PVC]
    overlays/dev/          namespace, 1 replica, small CPU pods, HPA 1..2 (KEDA alternative beside it)
    overlays/prod/         namespace, sized replicas, GPUs, HPA min..max (KEDA alternative beside it)
    autoscaling/           prometheus-adapter rule (Helm values and a ConfigMap) serving the HPA metric
    kserve/                InferenceService on KServe's Triton runtime, with canary traffic
    kserve/canary/         with --canary-steps: one patch per step, rollback.yaml and plan.json
    loadtest/              distributed locust (ConfigMap of loadtests/, master, workers) + its Dockerfile
    batch/                 Indexed Job running `tritonforge batch-infer --shard K/N`, and its data PVC
    compose/               docker-compose.yaml for one host
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from tritonforge.deploy import kube
from tritonforge.deploy.canary import canary_patches, canary_plan, step_file
from tritonforge.deploy.extras import compose_file, inference_service
from tritonforge.deploy.metrics import adapter_rule, keda_query, pod_query
from tritonforge.deploy.sizing import Sizing
from tritonforge.deploy.spec import DeploySpec, triton_args
from tritonforge.errors import DeployError

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


def python_models(repository: Path) -> list[str]:
    """The models served by Triton's Python backend (their imports must be in the image)."""
    from tritonforge.config import read_config

    return [
        folder.name
        for folder in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file())
        if read_config(folder).backend == "python"
    ]


def repository_models(repository: Path) -> dict[str, int]:
    """Each model of ``repository`` and its instance count (ensembles: 0, they run no instances).

    Raises:
        DeployError: no repository there, or one the offline checks reject.
    """
    from tritonforge.config import read_config
    from tritonforge.repository import check_repository

    if not repository.is_dir():
        raise DeployError(f"no model repository at {repository} (build one first: `tritonforge build`)")
    errors = [p for p in check_repository(repository) if p.severity == "error"]
    if errors:
        listed = "; ".join(f"{p.model}: {p.message}" for p in errors[:3])
        raise DeployError(f"{repository} fails its offline checks ({listed}); run `tritonforge validate`")
    models: dict[str, int] = {}
    for folder in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file()):
        config = read_config(folder)
        if config.platform == "ensemble" or config.ensemble_steps:
            models[folder.name] = 0
        else:
            models[folder.name] = sum(g.count for g in config.instance_groups) or 1
    if not models:
        raise DeployError(f"{repository} has no models to deploy")
    return models


def _adapter_prometheus(url: str) -> Obj:
    """The prometheus-adapter chart takes the URL without its port, and the port apart."""
    scheme, _, rest = url.rstrip("/").partition("://")
    host, _, port = rest.partition(":")
    return {"url": f"{scheme}://{host}", "port": int(port or (443 if scheme == "https" else 80))}


def _small(spec: DeploySpec) -> DeploySpec:
    return spec.replace(cpu_request="1", cpu_limit="2", memory_request="2Gi", memory_limit="4Gi", gpus=0)


def overlay_patches(spec: DeploySpec, overlay: str) -> list[Obj]:
    """JSON-patch (RFC 6902) operations an overlay applies to the base Deployment."""
    container = "/spec/template/spec/containers/0"
    if overlay == "dev":
        small = _small(spec)
        return [
            {"op": "replace", "path": "/spec/replicas", "value": 1},
            {"op": "replace", "path": f"{container}/resources", "value": kube.resources(small, 0)},
        ]
    gpus = spec.prod_gpus
    ops: list[Obj] = [
        {"op": "replace", "path": "/spec/replicas", "value": spec.replicas},
        {"op": "replace", "path": f"{container}/resources", "value": kube.resources(spec, gpus)},
        {"op": "replace", "path": f"{container}/args", "value": triton_args(spec, gpus=gpus)},
    ]
    if gpus and not spec.gpus:
        ops.append({"op": "add", "path": "/spec/template/spec/tolerations", "value": [kube.gpu_toleration()]})
    return ops


def _kustomization(resources: Sequence[str], **extra: Any) -> Obj:
    return {"apiVersion": KUSTOMIZE, "kind": "Kustomization", **extra, "resources": list(resources)}


def _overlay(spec: DeploySpec, overlay: str) -> dict[str, Any]:
    namespace = spec.dev_namespace if overlay == "dev" else spec.prod_namespace
    low, high = (1, 2) if overlay == "dev" else (spec.min_replicas, spec.max_replicas)
    scaled = _small(spec) if overlay == "dev" else spec
    return {
        "namespace.yaml": kube.namespace(namespace, spec),
        "hpa.yaml": kube.hpa(scaled, min_replicas=low, max_replicas=high),
        "keda-scaledobject.yaml": kube.keda_scaled_object(
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


LOCUST_DOCKERFILE = (
    "# The locust image: tritonforge with its load-test extra (build from the project root:\n"
    "#   docker build -f deploy/loadtest/Dockerfile -t tritonforge-locust:latest .)\n"
    "FROM python:3.11-slim\n"
    "COPY . /src\n"
    'RUN pip install --no-cache-dir "/src[loadtest]" && rm -rf /src\n'
    "USER 1000\n"
)


def _readme(spec: DeploySpec, sizing: Sizing | None, notes: Sequence[str]) -> str:
    lines = [
        f"# Deploying `{spec.name}` (generated by `tritonforge deploy`)",
        "",
        f"Image: `{spec.image}`. Models: {', '.join(spec.models)}. Repository: `{spec.store.uri}`.",
        "",
        "    kubectl apply -k overlays/dev      # or overlays/prod",
        "    helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter \\",
        "        -n monitoring -f autoscaling/prometheus-adapter-values.yaml",
        "    kubectl apply -f kserve/inferenceservice.yaml        # instead of the overlays, on KServe",
        "    kubectl apply -k loadtest -n <namespace>              # distributed locust",
        "    kubectl apply -k batch -n <namespace>                 # the sharded batch Job",
        "    docker compose -f compose/docker-compose.yaml up -d   # one host",
        "",
        "KEDA instead of the HPA: in an overlay's kustomization.yaml replace `hpa.yaml` with",
        "`keda-scaledobject.yaml`.",
        "",
        "Per-pod autoscaling metric (what the HPA averages), in the prod namespace:",
        "",
        f"    {pod_query(spec, spec.prod_namespace)}",
        "",
    ]
    if spec.canary_steps:
        lines += [
            "## KServe canary",
            "",
            f"Steps {', '.join(f'{p}%' for p in spec.canary_steps)}, each held {spec.canary_hold_s} s "
            "(kserve/canary/plan.json: thresholds and the PromQL per step). Roll out the new version",
            "(a new storageUri in kserve/inferenceservice.yaml, `kubectl apply -f`), then per step:",
            "",
            *[
                f"    kubectl patch inferenceservice {spec.name} -n {spec.prod_namespace} --type merge "
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


def generate(
    repository: str | os.PathLike[str],
    out: str | os.PathLike[str],
    spec: DeploySpec | None = None,
    *,
    sizing: Sizing | None = None,
    instances: Mapping[str, int] | None = None,
    locustfiles: Mapping[str, str] | None = None,
    canary_thresholds: Mapping[str, float] | None = None,
    force: bool = False,
) -> Generated:
    """Write every manifest for serving ``repository`` into ``out`` (built beside it, then moved into
    place, so ``out`` is never half-written).

    Raises:
        DeployError: a bad repository, ``out`` not empty without ``force``, or options that don't fit.
    """
    repo = Path(repository)
    target = Path(out)
    spec = spec or DeploySpec()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise DeployError(f"{target} exists and is not empty; pass --force to replace it")
    counts = repository_models(repo)
    notes: list[str] = []
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
                "write the tuned configs first (`tritonforge tune ... --write`) and upload the repository"
            )
        instances[model] = n
    spec = spec.replace(models=tuple(counts), instances=instances)
    python = python_models(repo)
    if python:
        notes.append(
            f"{', '.join(python)} run on Triton's Python backend: what they import beyond numpy must be in "
            f"the image (build one FROM {spec.image} that pip-installs it, and pass it with --image)"
        )
    if spec.store.kind in ("s3", "gs", "as"):
        notes.append(
            f"create the Secret '{spec.store.secret}' with the object store's credentials before applying "
            "(never put them in these files)"
        )
    batch_model = spec.batch_model or next(iter(instances), next(iter(counts)))
    if batch_model not in counts:
        raise DeployError(f"batch model '{batch_model}' is not in {repo}; it has: {', '.join(counts)}")
    base_resources = ["deployment.yaml", "services.yaml", "pdb.yaml", "servicemonitor.yaml"]
    files: dict[str, Any] = {
        "base/deployment.yaml": kube.deployment(spec),
        "base/services.yaml": kube.services(spec),
        "base/pdb.yaml": kube.pdb(spec),
        "base/servicemonitor.yaml": kube.service_monitor(spec),
    }
    if spec.store.kind == "pvc":
        files["base/pvc.yaml"] = kube.pvc(
            spec.store.claim_or_image, spec, size=spec.store.pvc_size, mode="ReadOnlyMany", component="models"
        )
        base_resources.append("pvc.yaml")
        notes.append(f"copy the repository into the PVC '{spec.store.claim_or_image}' (mounted read-only)")
    files["base/kustomization.yaml"] = _kustomization(base_resources)
    for overlay in ("dev", "prod"):
        for name, content in _overlay(spec, overlay).items():
            files[f"overlays/{overlay}/{name}"] = content
    rule = adapter_rule(spec)
    files["autoscaling/prometheus-adapter-values.yaml"] = {
        "prometheus": _adapter_prometheus(spec.prometheus_url),
        "rules": {"default": False, "custom": [rule]},
    }
    files["autoscaling/prometheus-adapter-rules.yaml"] = kube.prometheus_adapter_configmap(spec)
    files["autoscaling/keda-query-prod.promql"] = keda_query(spec, spec.prod_namespace) + "\n"
    files["kserve/inferenceservice.yaml"] = inference_service(spec, gpus=spec.prod_gpus)
    if spec.canary_steps:
        *steps, rollback = canary_patches(spec)
        for i, (percent, patch) in enumerate(zip(spec.canary_steps, steps, strict=True), 1):
            files[f"kserve/canary/{step_file(i, percent)}"] = patch
        files["kserve/canary/rollback.yaml"] = rollback
        plan = canary_plan(spec, namespace=spec.prod_namespace, thresholds=dict(canary_thresholds or {}))
        files["kserve/canary/plan.json"] = json.dumps(plan, indent=2) + "\n"
    if spec.restrictions:
        secrets = sorted({(r.secret, r.key) for r in spec.restrictions})
        notes.append(
            "create the restricted-protocol key Secret(s) before applying: "
            + ", ".join(f"'{name}' (key '{key}')" for name, key in secrets)
            + "; compose reads them from the host's env vars "
            + ", ".join(r.env for r in spec.restrictions)
        )
    if spec.tls_secret:
        notes.append(
            f"create the kubernetes.io/tls Secret '{spec.tls_secret}' (tls.crt, tls.key"
            + (", ca.crt for the client certificates" if spec.mtls else "")
            + "); KServe and compose are written without gRPC TLS"
        )
    if locustfiles is not None:
        files["loadtest/locust.yaml"] = kube.locust_objects(spec, locustfiles, batch_model)
        files["loadtest/kustomization.yaml"] = _kustomization(["locust.yaml"])
        files["loadtest/Dockerfile"] = LOCUST_DOCKERFILE
    files["batch/job.yaml"] = kube.batch_job(spec, model=batch_model)
    files["batch/data-pvc.yaml"] = kube.pvc(
        f"{spec.name}-batch-data", spec, size="50Gi", mode="ReadWriteMany", component="batch"
    )
    files["batch/kustomization.yaml"] = _kustomization(["data-pvc.yaml", "job.yaml"])
    files["compose/docker-compose.yaml"] = compose_file(spec, repo, target / "compose", gpus=spec.prod_gpus)
    if sizing is not None:
        files["sizing.json"] = json.dumps(sizing.as_dict(), indent=2) + "\n"
    files["README.md"] = _readme(spec, sizing, notes)
    record = {
        "repository": str(repo.resolve()),
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "store"},
        "store": dataclasses.asdict(spec.store),
        "models": counts,
    }
    files["tritonforge-deploy.json"] = json.dumps(record, indent=2, default=list) + "\n"
    _write_atomically(target, {path: _dump(content) for path, content in files.items()})
    return Generated(out=target, files=sorted(files), spec=spec, notes=notes, sizing=sizing)


def _write_atomically(target: Path, texts: Mapping[str, str]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    old: Path | None = None
    try:
        for rel, text in texts.items():
            path = staging / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
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
