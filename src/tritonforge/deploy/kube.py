"""Kubernetes objects as plain data (dicts), one builder per object; the writer dumps them with safe_dump.

Core objects are checked against a pinned Kubernetes version's schemas (:mod:`tritonforge.deploy.check`);
the custom resources (ServiceMonitor, KEDA ScaledObject) against the fields their CRDs define.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tritonforge.deploy.cache import cache_config_map as config_map_of
from tritonforge.deploy.cache import cache_files, cache_volume
from tritonforge.deploy.images import MODELS_IMAGE_PATH
from tritonforge.deploy.spec import (
    CLIENT_LABEL,
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    MOUNT_PATH,
    TLS_MOUNT_PATH,
    DeploySpec,
    probe_paths,
    triton_args,
)

__all__ = [
    "cache_config_map",
    "deployment",
    "ingress",
    "labels",
    "namespace",
    "network_policy",
    "pdb",
    "pod_monitor",
    "pvc",
    "service_account",
    "service_monitor",
    "services",
]

Obj = dict[str, Any]
USER_ID = 1000  # the `triton-server` user of NVIDIA's image

SPOT_TOLERATIONS: list[Obj] = [
    {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true", "effect": "NoSchedule"},
    {
        "key": "kubernetes.azure.com/scalesetpriority",
        "operator": "Equal",
        "value": "spot",
        "effect": "NoSchedule",
    },
    {"key": "eks.amazonaws.com/capacityType", "operator": "Equal", "value": "SPOT", "effect": "NoSchedule"},
]
SPOT_NODE_TERMS: list[tuple[str, str]] = [
    ("cloud.google.com/gke-spot", "true"),
    ("kubernetes.azure.com/scalesetpriority", "spot"),
    ("eks.amazonaws.com/capacityType", "SPOT"),
]


#: how long a terminating pod serves on after leaving the Service (see the preStop hook)
PRESTOP_SLEEP_S = 15


def labels(spec: DeploySpec, component: str = "server") -> dict[str, str]:
    return {
        "app.kubernetes.io/name": spec.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "tritonforge",
    }


def _meta(name: str, spec: DeploySpec, component: str = "server", **extra: Any) -> Obj:
    return {"name": name, "labels": labels(spec, component), **extra}


def _pod_security() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": USER_ID,
        "runAsGroup": USER_ID,
        "fsGroup": USER_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> Obj:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


_UNITS = {
    "": 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
}


def _bytes(quantity: str) -> int:
    import re

    from tritonforge.errors import DeployError

    found = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|K|M|G)?", quantity.strip())
    if not found:
        raise DeployError(f"{quantity!r} is not a storage size such as 512Mi or 20Gi")
    return int(found.group(1)) * _UNITS[found.group(2) or ""]


def ephemeral_storage(spec: DeploySpec) -> str:
    """What the pod writes to node disk: /tmp's limit, plus the repository copy for an image store."""
    total = _bytes(spec.scratch_size) + (_bytes(spec.store.size) if spec.store.kind == "image" else 0)
    mebibytes = -(-total // (1 << 20))
    return f"{mebibytes // 1024}Gi" if mebibytes % 1024 == 0 else f"{mebibytes}Mi"


def resources(spec: DeploySpec, gpus: int) -> Obj:
    requests: Obj = {"cpu": spec.cpu_request, "memory": spec.memory_request}
    limits: Obj = {"cpu": spec.cpu_limit, "memory": spec.memory_limit}
    # emptyDirs on disk count as ephemeral storage: the scheduler places the pod where they fit
    requests["ephemeral-storage"] = ephemeral_storage(spec)
    if gpus:
        # extended resources: request must equal limit
        requests["nvidia.com/gpu"] = str(gpus)
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def _store_env_and_volumes(spec: DeploySpec) -> tuple[list[Obj], list[Obj], list[Obj], list[Obj]]:
    """Env vars, volumes, mounts and init containers that give Triton its repository; secrets only by
    reference, and none at all when the pods have a workload identity."""
    store = spec.store
    env: list[Obj] = []
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    init: list[Obj] = []
    if spec.workload_identity and store.kind in ("s3", "gs"):
        # IRSA / GKE Workload Identity: the cloud SDK inside Triton finds the identity by itself
        return env, volumes, mounts, init

    def secret_env(var: str, key: str, optional: bool = False) -> Obj:
        ref: Obj = {"name": store.secret, "key": key}
        if optional:
            ref["optional"] = True
        return {"name": var, "valueFrom": {"secretKeyRef": ref}}

    if store.kind == "s3":
        env += [
            secret_env("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
            secret_env("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
            secret_env("AWS_DEFAULT_REGION", "AWS_DEFAULT_REGION", optional=True),
            secret_env("AWS_SESSION_TOKEN", "AWS_SESSION_TOKEN", optional=True),
        ]
    elif store.kind == "gs":
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/gcs/key.json"})
        volumes.append({"name": "gcs-credentials", "secret": {"secretName": store.secret}})
        mounts.append({"name": "gcs-credentials", "mountPath": "/var/secrets/gcs", "readOnly": True})
    elif store.kind == "as":
        env += [
            secret_env("AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_ACCOUNT"),
            secret_env("AZURE_STORAGE_KEY", "AZURE_STORAGE_KEY"),
        ]
    elif store.kind == "pvc":
        volumes.append(
            {"name": "models", "persistentVolumeClaim": {"claimName": store.claim_or_image, "readOnly": True}}
        )
        mounts.append({"name": "models", "mountPath": MOUNT_PATH, "readOnly": True})
    elif store.kind == "image":
        # the repository image's files, copied into a size-limited emptyDir before Triton starts
        volumes.append({"name": "models", "emptyDir": {"sizeLimit": store.size}})
        mounts.append({"name": "models", "mountPath": MOUNT_PATH, "readOnly": True})
        init.append(
            {
                "name": "copy-models",
                "image": store.claim_or_image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["cp", "-R", f"{MODELS_IMAGE_PATH}/.", "/repository/"],
                "resources": {
                    "requests": {"cpu": "100m", "memory": "64Mi"},
                    "limits": {"cpu": "1", "memory": "256Mi"},
                },
                "securityContext": _container_security(),
                "volumeMounts": [{"name": "models", "mountPath": "/repository"}],
            }
        )
    return env, volumes, mounts, init


def _access_env_and_volumes(spec: DeploySpec) -> tuple[list[Obj], list[Obj], list[Obj]]:
    """Restricted-protocol keys as env vars from their Secrets (the args name them as ``$(VAR)``), and the
    gRPC TLS files from a ``kubernetes.io/tls`` Secret, mounted read-only with mode 0400."""
    env: list[Obj] = [
        {"name": r.env, "valueFrom": {"secretKeyRef": {"name": r.secret, "key": r.key}}}
        for r in spec.restrictions
    ]
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    if spec.tls_secret:
        items = [{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}]
        if spec.mtls:
            items.append({"key": "ca.crt", "path": "ca.crt"})
        volumes.append(
            {
                "name": "grpc-tls",
                "secret": {"secretName": spec.tls_secret, "defaultMode": 0o400, "items": items},
            }
        )
        mounts.append({"name": "grpc-tls", "mountPath": TLS_MOUNT_PATH, "readOnly": True})
    return env, volumes, mounts


def _probe(spec: DeploySpec, kind: str, *, period_s: int, failures: int) -> Obj:
    return {
        "httpGet": {"path": probe_paths(spec)[kind], "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def deployment(spec: DeploySpec) -> Obj:
    """NVIDIA's Triton container serving the repository, with probes, limits and a locked-down context."""
    env, volumes, mounts, init = _store_env_and_volumes(spec)
    # read-only root: Triton and the Python backend write only to /tmp (object-store downloads) and /dev/shm
    volumes += [
        {"name": "tmp", "emptyDir": {"sizeLimit": spec.scratch_size}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    mounts += [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    access_env, access_volumes, access_mounts = _access_env_and_volumes(spec)
    env += access_env
    volumes += access_volumes
    mounts += access_mounts
    if spec.cache is not None:
        volume, mount = cache_volume(cache_config_map(spec), cache_files(spec.cache))
        volumes.append(volume)
        mounts.append(mount)
    container: Obj = {
        "name": "triton",
        "image": spec.serving_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["tritonserver"],
        "args": triton_args(spec),
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "env": env,
        "resources": resources(spec, spec.gpus),
        # models load before the pod is ready: up to 10 minutes for the first start, then tight checks
        "startupProbe": _probe(spec, "startup", period_s=10, failures=60),
        "readinessProbe": _probe(spec, "readiness", period_s=5, failures=3),
        "livenessProbe": _probe(spec, "liveness", period_s=10, failures=3),
        # endpoints drop the pod before Triton stops taking requests
        # clients re-resolve the headless Service every 2 s behind a DNS TTL (CoreDNS: 5 s): a terminating
        # pod keeps serving until they have left it, or its calls fail with NOT_FOUND once Triton unloads
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    if not env:
        del container["env"]
    selector = labels(spec)
    pod_spec: Obj = {
        "serviceAccountName": spec.name,
        "automountServiceAccountToken": False,
        **_pod_extras(spec),
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_S + spec.exit_timeout_s + 15,
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": volumes,
        # ScheduleAnyway in the base (a one-node dev cluster still schedules); the prod overlay makes the
        # hostname spread DoNotSchedule, so two replicas never share a node
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": key,
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector},
            }
            for key in ("topology.kubernetes.io/zone", "kubernetes.io/hostname")
        ],
    }
    if spec.gpus:
        pod_spec["tolerations"] = [gpu_toleration()]
        pod_spec["nodeSelector"] = dict(spec.gpu_node_selector)
    # a surge pod needs a spare GPU, which a GPU node pool rarely has: replace one pod at a time instead
    surge = {"maxSurge": 0, "maxUnavailable": 1} if spec.gpus else {"maxSurge": 1, "maxUnavailable": 0}
    # no `replicas`: the HPA (or KEDA) owns the scale, and `kubectl apply` must not reset it
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(spec.name, spec),
        "spec": {
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": surge},
            "template": {"metadata": {"labels": _pod_labels(spec, selector)}, "spec": pod_spec},
        },
    }


def cache_config_map(spec: DeploySpec, namespace: str | None = None) -> Obj:
    """The ConfigMap holding the cache's coordinator (``NAME-cache-<hash>``), in ``namespace`` if given.

    Raises:
        DeployError: ``spec`` has no cache.
    """
    from tritonforge.errors import DeployError

    if spec.cache is None:
        raise DeployError(
            "this deployment has no model cache (give --cache-max-models or --cache-max-memory)"
        )
    obj = config_map_of(cache_files(spec.cache), name=spec.name, labels=labels(spec, "cache"))
    if namespace:
        obj["metadata"]["namespace"] = namespace
    return obj


def _pod_labels(spec: DeploySpec, selector: Mapping[str, str]) -> dict[str, str]:
    extra = (
        {"azure.workload.identity/use": "true"} if identity_annotation(spec)[0].startswith("azure") else {}
    )
    return {**selector, **extra}


def _pod_extras(spec: DeploySpec) -> Obj:
    """Image pull secrets and the priority class, on every pod we generate."""
    out: Obj = {}
    if spec.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    if spec.priority_class:
        out["priorityClassName"] = spec.priority_class
    return out


def identity_annotation(spec: DeploySpec) -> tuple[str, str]:
    """The ServiceAccount annotation of ``workload_identity``: IRSA's role ARN, GKE's service account,
    Azure's client id (("", "") without one).

    Raises:
        DeployError: a value that is none of the three.
    """
    import re

    from tritonforge.errors import DeployError

    who = spec.workload_identity
    if not who:
        return "", ""
    if who.startswith("arn:aws") and ":role/" in who:
        return "eks.amazonaws.com/role-arn", who
    if re.fullmatch(r"[^@\s]+@[^@\s]+\.iam\.gserviceaccount\.com", who):
        return "iam.gke.io/gcp-service-account", who
    if re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", who):
        return "azure.workload.identity/client-id", who
    raise DeployError(
        f"--workload-identity {who!r}: give an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME), a GKE service "
        "account (NAME@PROJECT.iam.gserviceaccount.com) or an Azure client id (a UUID)"
    )


def service_account(spec: DeploySpec, name: str | None = None, *, secrets: Sequence[str] = ()) -> Obj:
    """The pods' ServiceAccount: no API token mounted (Triton never calls the Kubernetes API), the
    workload identity's annotation when there is one, and (for KServe's storage initializer) the Secrets
    holding the store's credentials."""
    key, value = identity_annotation(spec)
    meta = _meta(name or spec.name, spec)
    if key:
        meta["annotations"] = {key: value}
    obj: Obj = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}
    obj["automountServiceAccountToken"] = False
    if secrets:
        obj["secrets"] = [{"name": s} for s in secrets]
    return obj


def network_policy(spec: DeploySpec) -> Obj:
    """Only labelled clients (``tritonforge.io/client-of: NAME``, in the namespace) reach HTTP and gRPC,
    only the monitoring namespace reaches metrics (and the ingress controller gRPC, with an Ingress)."""
    ports = [{"protocol": "TCP", "port": p} for p in ("http", "grpc")]
    rules: list[Obj] = [
        {"from": [{"podSelector": {"matchLabels": {CLIENT_LABEL: spec.name}}}], "ports": ports},
        {
            "from": [{"namespaceSelector": {"matchLabels": _ns_label(spec.monitoring_namespace)}}],
            "ports": [{"protocol": "TCP", "port": "metrics"}],
        },
    ]
    if spec.ingress_host:
        rules.append(
            {
                "from": [{"namespaceSelector": {"matchLabels": _ns_label(spec.ingress_namespace)}}],
                "ports": [{"protocol": "TCP", "port": "grpc"}],
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(spec.name, spec),
        "spec": {"podSelector": {"matchLabels": labels(spec)}, "policyTypes": ["Ingress"], "ingress": rules},
    }


def _ns_label(namespace: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": namespace}


def ingress(spec: DeploySpec) -> Obj:
    """gRPC through the ingress controller (ingress-nginx by default): L7, so each request is balanced
    over the pods, not each connection. TLS at the front (gRPC over HTTP/2 needs it on most
    controllers) from Secret ``NAME-ingress-tls``."""
    backend = "GRPCS" if spec.tls_secret else "GRPC"
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            **_meta(spec.name, spec),
            "annotations": {"nginx.ingress.kubernetes.io/backend-protocol": backend},
        },
        "spec": {
            "ingressClassName": spec.ingress_class,
            "tls": [{"hosts": [spec.ingress_host], "secretName": f"{spec.name}-ingress-tls"}],
            "rules": [
                {
                    "host": spec.ingress_host,
                    "http": {
                        "paths": [
                            {
                                "path": "/",
                                "pathType": "Prefix",
                                "backend": {"service": {"name": spec.name, "port": {"name": "grpc"}}},
                            }
                        ]
                    },
                }
            ],
        },
    }


def gpu_toleration() -> Obj:
    return {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def services(spec: DeploySpec) -> list[Obj]:
    """``NAME`` (HTTP + gRPC), ``NAME-metrics`` (scraped) and ``NAME-headless`` (one DNS record per ready
    pod, for clients that balance gRPC themselves: ``dns:///NAME-headless.NS.svc.cluster.local:8001``)."""
    selector = labels(spec)
    http = {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
    grpc = {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
    metrics = {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(spec.name, spec),
            "spec": {"type": "ClusterIP", "selector": selector, "ports": [http, grpc]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(f"{spec.name}-metrics", spec, "metrics"),
            "spec": {"type": "ClusterIP", "selector": selector, "ports": [metrics]},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(f"{spec.name}-headless", spec),
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": False,
                "selector": selector,
                "ports": [grpc, http],
            },
        },
    ]


def pdb(spec: DeploySpec) -> Obj:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(spec.name, spec),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels(spec)}},
    }


def pvc(name: str, spec: DeploySpec, *, size: str, mode: str, component: str, storage_class: str = "") -> Obj:
    claim: Obj = {"accessModes": [mode], "resources": {"requests": {"storage": size}}}
    if storage_class:
        claim["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(name, spec, component),
        "spec": claim,
    }


#: Pod Security Admission: every pod we generate meets the restricted profile, so it is enforced
POD_SECURITY = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "audit", "warn")}


def namespace(name: str, spec: DeploySpec) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {**labels(spec, "ns"), **POD_SECURITY}},
    }


def service_monitor(spec: DeploySpec) -> Obj:
    """prometheus-operator's ServiceMonitor for ``NAME-metrics`` (adds the ``namespace`` and ``pod``
    labels the autoscaling rule groups by)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {**_meta(spec.name, spec, "metrics"), "labels": _monitor_labels(spec, "metrics")},
        "spec": {
            "selector": {"matchLabels": labels(spec, "metrics")},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}],
        },
    }


def _monitor_labels(spec: DeploySpec, component: str) -> dict[str, str]:
    return {**labels(spec, component), **spec.monitor_labels}


def pod_monitor(spec: DeploySpec, *, namespace: str) -> Obj:
    """prometheus-operator's PodMonitor for KServe's predictor pods (Triton's metrics port, unnamed in
    KServe's runtime, so by number); Prometheus adds the ``namespace`` and ``pod`` labels the canary
    plan's PromQL reads."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": f"{spec.name}-kserve",
            "namespace": namespace,
            "labels": _monitor_labels(spec, "kserve"),
        },
        "spec": {
            "selector": {"matchLabels": {"serving.kserve.io/inferenceservice": spec.name}},
            "podMetricsEndpoints": [
                {"targetPort": METRICS_PORT, "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}
            ],
        },
    }
