"""The tool pods as plain data: the locust master and workers and the batch-inference Job, with the
client-side access settings (keys, TLS) that let them through a restricted server.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tritonforge.deploy.kube import (
    SPOT_NODE_TERMS,
    SPOT_TOLERATIONS,
    Obj,
    _container_security,
    _meta,
    _pod_extras,
    _pod_security,
    labels,
)
from tritonforge.deploy.spec import (
    CLIENT_LABEL,
    GRPC_PORT,
    DeploySpec,
)

__all__ = ["batch_job", "client_access", "locust_objects"]

CLIENT_TLS_PATH = "/etc/tritonforge/tls"
CLIENT_KEY_DIR = "/run/tritonforge"


def client_access(spec: DeploySpec) -> tuple[list[str], list[Obj], list[Obj], list[Obj], list[Obj]]:
    """What a tool pod (batch-infer, locust) needs to call the restricted, TLS-serving server:
    tritonforge's access settings as env vars (``TRITONFORGE_AUTH`` with ``env:`` references, the keys
    themselves from the same Secrets as the server's), the server's CA, and for mTLS a client certificate
    whose key an init container copies to mode 0600 (a Secret volume under ``fsGroup`` is group-readable,
    which the client refuses for a key). Returns (auth specs, env, volumes, mounts, init containers)."""
    specs = [f"{','.join(r.groups)}:{r.header}=env:{r.env}" for r in spec.restrictions]
    env: list[Obj] = [
        {"name": r.env, "valueFrom": {"secretKeyRef": {"name": r.secret, "key": r.key}}}
        for r in spec.restrictions
    ]
    if specs:
        env.append({"name": "TRITONFORGE_AUTH", "value": " ".join(specs)})
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    init: list[Obj] = []
    if spec.tls_secret:
        sources: list[Obj] = [
            {"secret": {"name": spec.tls_secret, "items": [{"key": "ca.crt", "path": "ca.crt"}]}}
        ]
        env += [
            {"name": "TRITONFORGE_TLS_ROOT_CERT", "value": f"{CLIENT_TLS_PATH}/ca.crt"},
            {"name": "TRITONFORGE_TLS_SERVER_NAME", "value": spec.name},
        ]
        if spec.mtls:
            items = [{"key": "tls.crt", "path": "client.crt"}, {"key": "tls.key", "path": "client.key"}]
            sources.append({"secret": {"name": spec.client_tls_secret, "items": items}})
            env += [
                {"name": "TRITONFORGE_TLS_CLIENT_CERT", "value": f"{CLIENT_TLS_PATH}/client.crt"},
                {"name": "TRITONFORGE_TLS_CLIENT_KEY", "value": f"{CLIENT_KEY_DIR}/client.key"},
            ]
            volumes.append({"name": "client-key", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
            mounts.append({"name": "client-key", "mountPath": CLIENT_KEY_DIR, "readOnly": True})
            init.append(
                {
                    "name": "client-key",
                    "image": spec.tools_image,
                    "command": [
                        "install",
                        "-m",
                        "0600",
                        f"{CLIENT_TLS_PATH}/client.key",
                        f"{CLIENT_KEY_DIR}/",
                    ],
                    "resources": {
                        "requests": {"cpu": "10m", "memory": "16Mi"},
                        "limits": {"cpu": "100m", "memory": "64Mi"},
                    },
                    "securityContext": _container_security(),
                    "volumeMounts": [
                        {"name": "client-tls", "mountPath": CLIENT_TLS_PATH, "readOnly": True},
                        {"name": "client-key", "mountPath": CLIENT_KEY_DIR},
                    ],
                }
            )
        volumes.append({"name": "client-tls", "projected": {"sources": sources, "defaultMode": 0o440}})
        mounts.append({"name": "client-tls", "mountPath": CLIENT_TLS_PATH, "readOnly": True})
    return specs, env, volumes, mounts, init


def _tool_labels(spec: DeploySpec, component: str) -> dict[str, str]:
    """A tool pod's labels: its own, and the client label the server's NetworkPolicy lets in."""
    return {**labels(spec, component), CLIENT_LABEL: spec.name}


def _locust_container(spec: DeploySpec, role: str, args: Sequence[str], model: str) -> Obj:
    ports = [{"name": "web", "containerPort": 8089}, {"name": "master", "containerPort": 5557}]
    container: Obj = {
        "name": f"locust-{role}",
        "image": spec.tools_image,
        "command": ["locust"],
        "args": list(args),
        "env": [
            {"name": "TRITONFORGE_MODEL", "value": model},
            {"name": "HOME", "value": "/tmp"},
            *(client_access(spec)[1] if role == "worker" else []),
        ],
        "resources": {
            "requests": {"cpu": "500m", "memory": "512Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        },
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "locustfiles", "mountPath": "/locust", "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *(client_access(spec)[3] if role == "worker" else []),
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
    base_volumes = [
        {"name": "locustfiles", "configMap": {"name": "locustfiles"}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    _, _, access_volumes, _, access_init = client_access(spec)

    def workload(role: str, replicas: int, args: Sequence[str]) -> Obj:
        # the workers call the server: they carry the client label and its access settings
        selector = labels(spec, f"locust-{role}")
        worker = role == "worker"
        pod: Obj = {
            **_pod_extras(spec),
            "automountServiceAccountToken": False,
            "securityContext": _pod_security(),
            **({"initContainers": access_init} if worker and access_init else {}),
            "containers": [_locust_container(spec, role, args, model)],
            "volumes": base_volumes + (access_volumes if worker else []),
        }
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(f"locust-{role}", spec, f"locust-{role}"),
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": selector},
                "template": {
                    "metadata": {"labels": {**selector, CLIENT_LABEL: spec.name} if worker else selector},
                    "spec": pod,
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
    selector = _tool_labels(spec, "batch")
    # batch-infer reads --auth / --tls-* from these env vars (the keys from the server's Secrets)
    _, access_env, access_volumes, access_mounts, access_init = client_access(spec)
    container: Obj = {
        "name": "batch-infer",
        "image": spec.tools_image,
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
            *access_env,
        ],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "2", "memory": "2Gi"}},
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "data", "mountPath": data},
            {"name": "tmp", "mountPath": "/tmp"},
            *access_mounts,
        ],
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
                    **_pod_extras(spec),
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    **({"initContainers": access_init} if access_init else {}),
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
                        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                        *access_volumes,
                    ],
                },
            },
        },
    }
