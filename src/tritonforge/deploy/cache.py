"""The model cache in the generated pods: the coordinator's repository as a ConfigMap, mounted beside the
model repository, and what the cache changes in the server's arguments, probes and memory.

Why a ConfigMap: the coordinator's repository is three small text files (about 26 KB; a ConfigMap holds
1 MiB) that depend on the budget, not on the models. Mounted as a volume it reaches every pod the same way
whatever the model store is (an image copied in, a claim, an object store) and in KServe's pods too, and a
new budget needs no image rebuilt. Its name carries a hash of its content (as kustomize's generators do),
so a new budget is a new ConfigMap and the pods roll onto it.

The ConfigMap is mounted at ``/cache/tritonforge_cache`` (the model's folder), not at ``/cache``: the
kubelet keeps a ConfigMap volume's files behind ``..data`` links, which Triton would list as models if they
sat at the repository's top.

The coordinator finds the repositories and the HTTP and metrics endpoints on tritonserver's command line
(``/proc/<parent>/cmdline``), which in these pods holds them all: ``--model-repository`` (or KServe's
``--model-store``) for both repositories, the ports, and no ``--http-address`` (all addresses, so loopback
reaches it).
"""

from __future__ import annotations

import functools
import hashlib
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from tritonforge.cache import CACHE_MODEL, CacheBudget, write_cache_repository
from tritonforge.errors import DeployError

__all__ = [
    "CACHE_MOUNT_PATH",
    "CACHE_READY_PATH",
    "SHM_MARGIN_BYTES",
    "cache_args",
    "cache_config_map",
    "cache_files",
    "cache_memory_request",
    "cache_volume",
    "check_cache_fits",
    "quantity_bytes",
]

#: the coordinator's repository inside the pod (the ConfigMap fills its one model folder)
CACHE_MOUNT_PATH = "/cache"
#: the readiness and startup probes of a pod with the cache: the coordinator is ready to load models (the
#: server's own /v2/health/ready is left non-strict, so a model loading, unloading or failed to load on a
#: request does not take the pod out of its Service)
CACHE_READY_PATH = f"/v2/models/{CACHE_MODEL}/ready"
#: part of the margin a memory budget leaves below the memory limit: the pods' /dev/shm is a memory-backed
#: emptyDir of this size, charged to the container's memory, which the cache's PSS sees only in part
SHM_MARGIN_BYTES = 1 << 30
#: the other part: a share of the limit for a model loading past the budget before the cache evicts
LOAD_MARGIN_SHARE = 0.10
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti|Pi|Ei|k|K|M|G|T|P|E)?\s*$")
_FACTORS = {
    None: 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "Ei": 1 << 60,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def quantity_bytes(quantity: str, *, what: str = "memory") -> int:
    """Bytes of a Kubernetes memory quantity (``4Gi``, ``1.5Gi``, ``500M``, ``1048576``).

    Raises:
        DeployError: not a quantity of that form.
    """
    found = _QUANTITY.match(str(quantity))
    if not found:
        raise DeployError(f"{what} {quantity!r} is not a Kubernetes quantity such as 512Mi, 4Gi or 1.5Gi")
    return int(float(found.group(1)) * _FACTORS[found.group(2)])


def _mebibytes(size: int) -> str:
    mib = -(-size // (1 << 20))
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def cache_args(budget: CacheBudget, loads: Sequence[str] = ()) -> list[str]:
    """tritonserver's arguments for the cache: its repository beside the models', explicit model control,
    the coordinator and ``loads`` (default: the pins) loaded at start, and a non-strict
    ``/v2/health/ready``."""
    return [
        f"--model-repository={CACHE_MOUNT_PATH}",
        "--model-control-mode=explicit",
        f"--load-model={CACHE_MODEL}",
        *[f"--load-model={model}" for model in loads or budget.pins],
        "--strict-readiness=false",
    ]


@functools.lru_cache(maxsize=8)
def cache_files(budget: CacheBudget) -> dict[str, str]:
    """The coordinator's model folder as written by :func:`tritonforge.cache.write_cache_repository`: its
    path under the folder (``config.pbtxt``, ``1/model.py`` ...) -> text. The writer's ``manifest.json``
    is left out: Triton never reads it, and its build host, user and time would change the ConfigMap's
    hash (and roll every pod) on each run."""
    with tempfile.TemporaryDirectory(prefix="tritonforge-cache-") as tmp:
        folder = write_cache_repository(tmp, budget) / CACHE_MODEL
        return {
            p.relative_to(folder).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"
        }


def _key(path: str) -> str:
    """A ConfigMap key for ``path`` (keys can't hold '/'): ``1/model.py`` -> ``1.model.py``."""
    return path.replace("/", ".")


def cache_config_map(files: Mapping[str, str], *, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
    """The ConfigMap holding ``files`` (see :func:`cache_files`), named ``NAME-cache-<hash of them>``.

    Raises:
        DeployError: two paths map onto one key.
    """
    data = {_key(path): text for path, text in files.items()}
    if len(data) != len(files):
        raise DeployError(f"the cache's files {sorted(files)} can't be keys of one ConfigMap")
    digest = hashlib.sha256("\0".join(f"{k}\0{v}" for k, v in sorted(data.items())).encode()).hexdigest()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-cache-{digest[:10]}", "labels": dict(labels)},
        "data": data,
    }


def cache_volume(
    config_map: Mapping[str, Any], files: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The volume of ``config_map`` with each of ``files`` at its path in the model folder, and its
    read-only mount at ``/cache/tritonforge_cache``."""
    items = [{"key": _key(path), "path": path} for path in files]
    volume = {
        "name": "cache",
        "configMap": {"name": config_map["metadata"]["name"], "items": items, "defaultMode": 0o444},
    }
    mount = {"name": "cache", "mountPath": f"{CACHE_MOUNT_PATH}/{CACHE_MODEL}", "readOnly": True}
    return volume, mount


def check_cache_fits(budget: CacheBudget, memory_limit: str) -> None:
    """A memory budget must leave a margin below the pods' memory limit: 1 GiB for the memory-backed
    /dev/shm and 10 % of the limit for a model loading past the budget before the cache evicts.

    Raises:
        DeployError: the budget is above what the limit leaves it; the message names the limit that fits.
    """
    if budget.max_memory_bytes is None:
        return
    limit = quantity_bytes(memory_limit, what="memory limit")
    room = int(limit * (1 - LOAD_MARGIN_SHARE)) - SHM_MARGIN_BYTES
    if budget.max_memory_bytes <= room:
        return
    needed = (budget.max_memory_bytes + SHM_MARGIN_BYTES) / (1 - LOAD_MARGIN_SHARE)
    raise DeployError(
        f"--cache-max-memory {budget.max_memory_bytes / 2**30:.2f} GiB does not fit the pods' memory limit "
        f"{memory_limit} (it leaves the cache {max(room, 0) / 2**30:.2f} GiB after 1 GiB for /dev/shm and "
        f"10 % for a load past the budget): give --memory {_mebibytes(int(needed / 2) + 1)} or more "
        "(the limit is twice it), or a smaller budget"
    )


def cache_memory_request(budget: CacheBudget, memory_request: str) -> str:
    """The pods' memory request with a memory budget: at least the budget (what a full cache holds, so the
    scheduler places the pod where it fits), else ``memory_request`` unchanged."""
    if budget.max_memory_bytes is None:
        return memory_request
    if quantity_bytes(memory_request, what="memory request") >= budget.max_memory_bytes:
        return memory_request
    return _mebibytes(budget.max_memory_bytes)
