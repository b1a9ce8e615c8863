"""Kubernetes objects as plain data (dicts), one builder per object; the writer dumps them with safe_dump.

Core objects are checked against a pinned Kubernetes version's schemas (:mod:`tritonforge.deploy.check`);
the custom resources (ServiceMonitor, KEDA ScaledObject) against the fields their CRDs define.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tritonforge.deploy.metrics import ADAPTER_METRIC_NAMES, adapter_rule, keda_query, target_value
from tritonforge.deploy.spec import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    MOUNT_PATH,
    PROBE_PATHS,
    TLS_MOUNT_PATH,
    DeploySpec,
    triton_args,
)

__all__ = [
    "batch_job",
    "deployment",
    "hpa",
    "keda_scaled_object",
    "labels",
    "locust_objects",
    "namespace",
    "pdb",
    "prometheus_adapter_configmap",
    "pvc",
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


def resources(spec: DeploySpec, gpus: int) -> Obj:
    requests: Obj = {"cpu": spec.cpu_request, "memory": spec.memory_request}
    limits: Obj = {"cpu": spec.cpu_limit, "memory": spec.memory_limit}
    if gpus:
        # extended resources: request must equal limit
        requests["nvidia.com/gpu"] = str(gpus)
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": requests, "limits": limits}


def _store_env_and_volumes(spec: DeploySpec) -> tuple[list[Obj], list[Obj], list[Obj]]:
    """Env vars, volumes and mounts that give Triton its repository; secrets only by reference."""
    store = spec.store
    env: list[Obj] = []
    volumes: list[Obj] = []
    mounts: list[Obj] = []

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
    return env, volumes, mounts


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


def _probe(kind: str, *, period_s: int, failures: int) -> Obj:
    return {
        "httpGet": {"path": PROBE_PATHS[kind], "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def deployment(spec: DeploySpec) -> Obj:
    """NVIDIA's Triton container serving the repository, with probes, limits and a locked-down context."""
    env, volumes, mounts = _store_env_and_volumes(spec)
    # read-only root: Triton and the Python backend write only to /tmp (object-store downloads) and /dev/shm
    volumes += [
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    mounts += [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}]
    access_env, access_volumes, access_mounts = _access_env_and_volumes(spec)
    env += access_env
    volumes += access_volumes
    mounts += access_mounts
    image = spec.store.claim_or_image if spec.store.kind == "image" else spec.image
    container: Obj = {
        "name": "triton",
        "image": image,
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
        "startupProbe": _probe("startup", period_s=10, failures=60),
        "readinessProbe": _probe("readiness", period_s=5, failures=3),
        "livenessProbe": _probe("liveness", period_s=10, failures=3),
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
        "securityContext": _pod_security(),
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_S + spec.exit_timeout_s + 15,
        "containers": [container],
        "volumes": volumes,
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
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(spec.name, spec),
        "spec": {
            "replicas": spec.replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": selector}, "spec": pod_spec},
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


def pvc(name: str, spec: DeploySpec, *, size: str, mode: str, component: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(name, spec, component),
        "spec": {"accessModes": [mode], "resources": {"requests": {"storage": size}}},
    }


def namespace(name: str, spec: DeploySpec) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels(spec, "ns")}}


def service_monitor(spec: DeploySpec) -> Obj:
    """prometheus-operator's ServiceMonitor for ``NAME-metrics`` (adds the ``namespace`` and ``pod``
    labels the autoscaling rule groups by)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(spec.name, spec, "metrics"),
        "spec": {
            "selector": {"matchLabels": labels(spec, "metrics")},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}],
        },
    }


def hpa(spec: DeploySpec, *, min_replicas: int, max_replicas: int) -> Obj:
    """autoscaling/v2 on the per-pod Triton metric that prometheus-adapter serves; scale-down waits out
    ``scale_down_window_s`` of lower recommendations so replicas don't flap."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(spec.name, spec),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": ADAPTER_METRIC_NAMES[spec.metric]},
                        "target": {"type": "AverageValue", "averageValue": target_value(spec)},
                    },
                }
            ],
            "behavior": {
                "scaleUp": {
                    "stabilizationWindowSeconds": 0,
                    "selectPolicy": "Max",
                    "policies": [
                        {"type": "Pods", "value": 2, "periodSeconds": 60},
                        {"type": "Percent", "value": 100, "periodSeconds": 60},
                    ],
                },
                "scaleDown": {
                    "stabilizationWindowSeconds": spec.scale_down_window_s,
                    "selectPolicy": "Min",
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                },
            },
        },
    }


def prometheus_adapter_configmap(spec: DeploySpec, *, adapter_namespace: str = "monitoring") -> Obj:
    """The adapter's rules file as a ConfigMap (for an adapter started with ``--config``)."""
    import yaml

    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            **_meta("prometheus-adapter-triton", spec, "autoscaling"),
            "namespace": adapter_namespace,
        },
        "data": {"config.yaml": yaml.safe_dump({"rules": [adapter_rule(spec)]}, sort_keys=False)},
    }


def keda_scaled_object(spec: DeploySpec, *, namespace: str, min_replicas: int, max_replicas: int) -> Obj:
    """KEDA's alternative to the HPA + adapter: the same metric, queried from Prometheus by KEDA."""
    threshold = str(spec.target_queue_us) if spec.metric == "queue_time" else f"{spec.target_queue_ratio:g}"
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(spec.name, spec, "autoscaling"),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
            "minReplicaCount": min_replicas,
            "maxReplicaCount": max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": spec.scale_down_window_s,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {
                        "scaleDown": {
                            "stabilizationWindowSeconds": spec.scale_down_window_s,
                            "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}],
                        }
                    }
                }
            },
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "Value",
                    "metadata": {
                        "serverAddress": spec.prometheus_url,
                        "query": keda_query(spec, namespace),
                        "threshold": threshold,
                        "ignoreNullValues": "false",
                    },
                }
            ],
        },
    }


def _locust_container(spec: DeploySpec, role: str, args: Sequence[str], model: str) -> Obj:
    ports = [{"name": "web", "containerPort": 8089}, {"name": "master", "containerPort": 5557}]
    container: Obj = {
        "name": f"locust-{role}",
        "image": spec.locust_image,
        "command": ["locust"],
        "args": list(args),
        "env": [
            {"name": "TRITONFORGE_MODEL", "value": model},
            {"name": "HOME", "value": "/tmp"},
        ],
        "resources": {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "locustfiles", "mountPath": "/locust", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if role == "master":
        container["ports"] = ports
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": "web"}, "periodSeconds": 10}
    return container


def locust_objects(spec: DeploySpec, locustfiles: Mapping[str, str], model: str) -> list[Obj]:
    """Distributed locust against the gRPC Service: the locustfiles as a ConfigMap, one master (web UI on
    8089, workers connect on 5557) and ``locust_workers`` workers."""
    if spec.locustfile not in locustfiles:
        from tritonforge.errors import DeployError

        raise DeployError(
            f"locustfile {spec.locustfile!r} is not among the load tests found "
            f"({', '.join(sorted(locustfiles))}); pass --locustfile"
        )
    target = f"{spec.name}:{GRPC_PORT}"
    script = f"/locust/{spec.locustfile}"
    volumes = [{"name": "locustfiles", "configMap": {"name": "locustfiles"}}, {"name": "tmp", "emptyDir": {}}]

    def workload(role: str, replicas: int, args: Sequence[str]) -> Obj:
        selector = labels(spec, f"locust-{role}")
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(f"locust-{role}", spec, f"locust-{role}"),
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": selector},
                    "spec": {
                        "securityContext": _pod_security(),
                        "containers": [_locust_container(spec, role, args, model)],
                        "volumes": volumes,
                    },
                },
            },
        }

    master_labels = labels(spec, "locust-master")
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta("locustfiles", spec, "locust"),
            "data": dict(sorted(locustfiles.items())),
        },
        workload("master", 1, ["-f", script, "--master", "--host", target]),
        workload("worker", spec.locust_workers, ["-f", script, "--worker", "--master-host", "locust-master"]),
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta("locust-master", spec, "locust-master"),
            "spec": {
                "selector": master_labels,
                "ports": [
                    {"name": "web", "port": 8089, "targetPort": "web"},
                    {"name": "master", "port": 5557, "targetPort": "master"},
                ],
            },
        },
    ]


SHARD_ENV = "SHARD_INDEX"


def batch_job(spec: DeploySpec, *, model: str) -> Obj:
    """An Indexed Job: ``batch_shards`` pods, each ``tritonforge batch-infer MODEL ... --shard K/N`` with
    K its completion index (downward API), preferring spot nodes and tolerating their taints."""
    data = "/data"
    input_path = spec.batch_input or f"{data}/input"
    output_path = spec.batch_output or f"{data}/output"
    shards = spec.batch_shards
    selector = labels(spec, "batch")
    container: Obj = {
        "name": "batch-infer",
        "image": spec.batch_image,
        "command": ["tritonforge"],
        "args": [
            "batch-infer",
            model,
            "--url",
            f"{spec.name}:{GRPC_PORT}",
            "--input",
            input_path,
            "--out",
            output_path,
            "--shard",
            f"$({SHARD_ENV})/{shards}",
        ],
        "env": [
            {
                "name": SHARD_ENV,
                "valueFrom": {
                    "fieldRef": {
                        "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                    }
                },
            },
            {"name": "HOME", "value": "/tmp"},
        ],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "securityContext": _container_security(),
        "volumeMounts": [{"name": "data", "mountPath": data}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(f"{spec.name}-batch-infer", spec, "batch"),
        "spec": {
            "completionMode": "Indexed",
            "completions": shards,
            "parallelism": shards,
            # a shard that failed (a reclaimed spot node) is retried; the run resumes from its manifest
            "backoffLimit": 3 * shards,
            "ttlSecondsAfterFinished": 86400,
            "template": {
                "metadata": {"labels": selector},
                "spec": {
                    "restartPolicy": "Never",
                    "securityContext": _pod_security(),
                    "tolerations": SPOT_TOLERATIONS,
                    "affinity": {
                        "nodeAffinity": {
                            "preferredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "weight": 100,
                                    "preference": {
                                        "matchExpressions": [
                                            {"key": key, "operator": "In", "values": [value]}
                                        ]
                                    },
                                }
                                for key, value in SPOT_NODE_TERMS
                            ]
                        }
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "data", "persistentVolumeClaim": {"claimName": f"{spec.name}-batch-data"}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }
