"""The parts beyond plain Kubernetes: a KServe InferenceService (built with the ``kserve`` SDK's models) and
a docker-compose file for one host with NVIDIA's container."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tritonforge.deploy.cache import CACHE_MOUNT_PATH, CACHE_READY_PATH, cache_args, cache_files, cache_volume
from tritonforge.deploy.kube import cache_config_map, labels, resources
from tritonforge.deploy.spec import (
    GRPC_PORT,
    HTTP_PORT,
    METRICS_PORT,
    DeploySpec,
    Restriction,
    probe_paths,
    triton_args,
)
from tritonforge.errors import DeployError

__all__ = ["KSERVE_HTTP_PORT", "compose_file", "inference_service", "kserve_sdk"]

#: the HTTP port of KServe's Triton runtime (its `--http-port`; Knative routes to it)
KSERVE_HTTP_PORT = 8080


def inference_service(spec: DeploySpec, *, namespace: str, service_account: str = "") -> dict[str, Any]:
    """KServe's InferenceService on its Triton runtime in ``namespace``, in ``spec.kserve_mode``
    (RawDeployment or Serverless), reading the store with ``service_account``'s credentials. A canary
    share is set only with canary steps (the first step's: an update then starts there, the step patches
    move it on); without them an update takes all traffic, as KServe does by default. Built from the
    SDK's models (in a separate interpreter, see :mod:`tritonforge.deploy._kserve_child`), so a field
    KServe doesn't have can't be written.

    Raises:
        DeployError: the ``kserve`` SDK is missing or failed (``pip install 'tritonforge[deploy]'``).
    """
    last = spec.image.rsplit("/", 1)[-1]
    args = [
        f"--grpc-max-connection-age={spec.grpc_max_connection_age_ms}",
        "--strict-readiness=true",
        *[a for r in spec.restrictions for a in _restricted(r)],
    ]
    cache: dict[str, Any] = {}
    if spec.cache is not None:
        # KServe appends these to its runtime's `tritonserver --model-store=/mnt/models --http-port=8080 ...`
        args = [a for a in args if not a.startswith("--strict-readiness=")] + cache_args(
            spec.cache, spec.cache_loads
        )
        volume, mount = cache_volume(cache_config_map(spec), cache_files(spec.cache))
        cache = {
            "volumes": [volume],
            "volume_mounts": [mount],
            "readiness_probe": {
                "httpGet": {"path": CACHE_READY_PATH, "port": KSERVE_HTTP_PORT},
                "periodSeconds": 5,
                "timeoutSeconds": 2,
                "failureThreshold": 3,
            },
        }
    plan = {
        "name": spec.name,
        "namespace": namespace,
        "labels": labels(spec, "kserve"),
        "annotations": {"serving.kserve.io/deploymentMode": spec.kserve_mode},
        # KServe's runtime image is NVIDIA's; a built server image (the models' requirements) replaces it
        "image": spec.server_image or None,
        "service_account": service_account or None,
        "runtime": "kserve-tritonserver",
        "runtime_version": last.split(":", 1)[1] if ":" in last else None,
        "storage_uri": spec.store.kserve_uri,
        "args": args,
        **cache,
        "env": [
            {"name": r.env, "valueFrom": {"secretKeyRef": {"name": r.secret, "key": r.key}}}
            for r in spec.restrictions
        ],
        "resources": resources(spec, spec.gpus),
        "min_replicas": spec.min_replicas,
        "max_replicas": spec.max_replicas,
        "canary_traffic_percent": spec.canary_steps[0] if spec.canary_steps else None,
    }
    return kserve_sdk({"op": "build", "plan": plan})


def _restricted(restriction: Restriction) -> list[str]:
    return [
        f"--grpc-restricted-protocol={restriction.spec_arg()}",
        f"--http-restricted-api={restriction.spec_arg()}",
    ]


def kserve_sdk(request: dict[str, Any]) -> dict[str, Any]:
    """One request to the kserve SDK in its own interpreter; the object it answers.

    Raises:
        DeployError: the SDK is not installed, or it failed (its error is in the message).
    """
    script = Path(__file__).with_name("_kserve_child.py")
    try:
        done = subprocess.run(
            [sys.executable, str(script)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DeployError(f"could not run the kserve SDK: {exc}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        hint = " (pip install 'tritonforge[deploy]')" if "No module named" in last else ""
        raise DeployError(f"the kserve SDK failed: {last}{hint}")
    return dict(json.loads(done.stdout)["object"])


def compose_file(spec: DeploySpec, repository: Path, compose_dir: Path) -> dict[str, Any]:
    """docker-compose for one host: NVIDIA's container on the local repository (read-only bind mount),
    the same arguments as the pods, a GPU reservation and a healthcheck on Triton's readiness."""
    local = os.path.relpath(repository.resolve(), compose_dir.resolve())
    # compose reads the restricted-protocol keys from the host's environment (or .env): ${VAR}, never a
    # literal; the gRPC TLS files of --tls-secret live in a Kubernetes Secret, so compose serves without them
    args = [
        re.sub(r"\$\((\w+)\)", r"${\1:?set \1 to the key}", a)
        for a in triton_args(spec)
        if a != f"--model-repository={spec.store.repository_arg}"
        and not a.startswith(("--grpc-use-ssl", "--grpc-server-", "--grpc-root-cert"))
    ]
    volumes = [{"type": "bind", "source": local, "target": "/models", "read_only": True}]
    if spec.cache is not None:  # the coordinator's repository, written beside repository/
        cache = os.path.relpath(repository.resolve().parent / "cache", compose_dir.resolve())
        volumes.append({"type": "bind", "source": cache, "target": CACHE_MOUNT_PATH, "read_only": True})
    service: dict[str, Any] = {
        "image": spec.serving_image,
        "command": ["tritonserver", "--model-repository=/models", *args],
        "user": "1000:1000",
        "read_only": True,
        "tmpfs": ["/tmp"],
        "shm_size": "1gb",
        "volumes": volumes,
        "ports": [f"{p}:{p}" for p in (HTTP_PORT, GRPC_PORT, METRICS_PORT)],
        "healthcheck": {
            "test": ["CMD", "curl", "-fsS", f"http://localhost:{HTTP_PORT}{probe_paths(spec)['readiness']}"],
            "interval": "10s",
            "timeout": "3s",
            "retries": 3,
            "start_period": "120s",
        },
        "restart": "unless-stopped",
        "stop_grace_period": f"{spec.exit_timeout_s + 15}s",
    }
    if spec.gpus:
        service["deploy"] = {
            "resources": {
                "reservations": {
                    "devices": [{"driver": "nvidia", "count": spec.gpus, "capabilities": ["gpu"]}]
                }
            }
        }
    return {"name": spec.name, "services": {"triton": service}}
