"""What a deployment is made of: the image, where the model repository comes from, the server's arguments.

The image tag follows the Triton we build and test with: the ``nvidia-pytriton`` 0.7.0 wheel carries Triton
2.51.0, which NVIDIA ships as the ``24.10`` container (NGC tags are ``YY.MM``; 2.46 is 24.05, 2.53 is 24.12).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Literal

from tritonforge.cache import CacheBudget
from tritonforge.deploy.cache import CACHE_READY_PATH, cache_args, check_cache_fits
from tritonforge.errors import DeployError
from tritonforge.server.access import RESTRICTABLE_GROUPS as TRITON_GROUPS

__all__ = [
    "DEFAULT_IMAGE",
    "GRPC_PORT",
    "HTTP_PORT",
    "METRICS_PORT",
    "PROBE_PATHS",
    "TLS_MOUNT_PATH",
    "TRITON_CONTAINER_TAGS",
    "TRITON_VERSION",
    "DeploySpec",
    "ModelStore",
    "Restriction",
    "image_for",
    "parse_model_store",
    "parse_restriction",
    "probe_paths",
    "triton_args",
]

#: the Triton version of the binary we run here (the nvidia-pytriton 0.7.0 wheel)
TRITON_VERSION = "2.51.0"
#: Triton release -> NGC container tag (checked against NVIDIA's release notes)
TRITON_CONTAINER_TAGS: Mapping[str, str] = {"2.46.0": "24.05", "2.51.0": "24.10", "2.53.0": "24.12"}
DEFAULT_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_CONTAINER_TAGS[TRITON_VERSION]}-py3"

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
#: Triton's health endpoints, as the probes use them
PROBE_PATHS: Mapping[str, str] = {
    "startup": "/v2/health/ready",
    "readiness": "/v2/health/ready",
    "liveness": "/v2/health/live",
}
#: where the repository sits inside the pod for the PVC and baked-image sources
MOUNT_PATH = "/models"

#: where the gRPC TLS files of ``--tls-secret`` are mounted (a ``kubernetes.io/tls`` Secret's keys)
TLS_MOUNT_PATH = "/etc/triton/tls"
#: Triton's protocol groups for ``--grpc-restricted-protocol`` / ``--http-restricted-api``; ``health`` is
#: left out on purpose: the kubelet's probes send no header, so health must stay unrestricted
RESTRICTABLE_GROUPS = tuple(g for g in TRITON_GROUPS if g != "health")
_HEADER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")

StoreKind = Literal["s3", "gs", "as", "pvc", "image"]
Metric = Literal["queue_time", "queue_ratio", "gpu_utilization"]
KServeMode = Literal["RawDeployment", "Serverless", "ModelMesh"]
#: the label a client pod carries to reach the server's ports through the NetworkPolicy
CLIENT_LABEL = "tritonforge.io/client-of"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def image_for(triton_version: str) -> str:
    """NVIDIA's container image for a Triton release.

    Raises:
        DeployError: a release we have no container tag for (give ``--image`` instead).
    """
    tag = TRITON_CONTAINER_TAGS.get(triton_version)
    if tag is None:
        known = ", ".join(f"{v} -> {t}" for v, t in TRITON_CONTAINER_TAGS.items())
        raise DeployError(f"no known NGC tag for Triton {triton_version} (known: {known}); pass --image")
    return f"nvcr.io/nvidia/tritonserver:{tag}-py3"


@dataclasses.dataclass(frozen=True)
class ModelStore:
    """Where the pods read the model repository from.

    ``s3``/``gs``/``as``: an object store URI that Triton reads itself (NVIDIA's image is built with all
    three), downloading into the pod's size-limited ``/tmp``; credentials come from the Secret named
    ``secret`` (never inline) or from workload identity. ``image`` (the default): an image holding the
    repository at ``/models``, copied by an init container into a size-limited ``emptyDir`` (schedules on
    any cluster, no storage class needed). ``pvc``: a claim mounted read-only at ``/models``; the claim is
    the user's, unless ``storage_class`` names a class offering ``ReadOnlyMany`` (then it is generated).
    """

    kind: StoreKind
    uri: str
    #: the PVC's claim name, or the image reference
    claim_or_image: str = ""
    subpath: str = ""
    secret: str = ""
    #: the copy's emptyDir size limit (image), or the generated claim's size (pvc with a storage class)
    size: str = "20Gi"
    #: pvc only: a storage class offering ReadOnlyMany (EFS, Filestore, Azure Files ...); empty: the claim
    #: already exists and is not generated
    storage_class: str = ""

    @property
    def object_store(self) -> bool:
        return self.kind in ("s3", "gs", "as")

    @property
    def repository_arg(self) -> str:
        """The value of ``--model-repository`` inside the pod."""
        if self.kind in ("s3", "gs", "as"):
            return self.uri
        return MOUNT_PATH if not self.subpath else f"{MOUNT_PATH}/{self.subpath}"

    @property
    def kserve_uri(self) -> str:
        """The same place as a KServe ``storageUri`` (KServe reads Azure blobs over https)."""
        if self.kind == "as":
            account, _, rest = self.uri[len("as://") :].partition("/")
            return f"https://{account}.blob.core.windows.net/{rest}"
        if self.kind == "image":
            return f"oci://{self.claim_or_image}"
        return self.uri


def default_store(name: str, registry: str = "") -> ModelStore:
    """The store that schedules anywhere: the repository in an image (``NAME-models:<version>``), copied
    into an emptyDir by an init container."""
    from tritonforge.deploy.images import image_set

    ref = image_set(name, base_image=DEFAULT_IMAGE, registry=registry, requirements={}).models
    return ModelStore(kind="image", uri=f"image://{ref}", claim_or_image=ref)


def parse_model_store(
    uri: str, *, name: str, secret: str = "", storage_class: str = "", size: str = "20Gi"
) -> ModelStore:
    """``s3://bucket/path``, ``gs://bucket/path``, ``as://account/container/path``, ``pvc://claim[/sub]``,
    or ``image://registry/repo:tag``.

    Raises:
        DeployError: an unknown scheme, a URI with no bucket/path, or credentials given inline.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep or not rest.strip("/"):
        raise DeployError(
            f"model store {uri!r} is not a URI: use s3://bucket/path, gs://bucket/path, "
            "as://account/container/path, pvc://claim[/subpath] or image://registry/repo:tag"
        )
    if scheme in ("s3", "gs", "as"):
        if "@" in rest.split("/", 1)[0] or "?" in rest:
            raise DeployError(
                f"model store {uri!r} carries credentials or parameters; put credentials in a Secret and "
                "name it with --credentials-secret"
            )
        if scheme == "as" and rest.count("/") < 1:
            raise DeployError(f"model store {uri!r}: Azure needs as://account/container[/path]")
        if storage_class:
            raise DeployError(f"--storage-class is for pvc:// stores; {uri!r} is read by Triton itself")
        return ModelStore(kind=scheme, uri=uri.rstrip("/"), secret=secret or f"{name}-model-store")  # type: ignore[arg-type]
    if storage_class:
        _check_name(storage_class, "storage class")
    if scheme == "pvc":
        claim, _, sub = rest.partition("/")
        _check_name(claim, "PVC claim name")
        return ModelStore(
            kind="pvc",
            uri=uri,
            claim_or_image=claim,
            subpath=sub.strip("/"),
            storage_class=storage_class,
            size=size,
        )
    if storage_class:
        raise DeployError(f"--storage-class is for pvc:// stores, not {uri!r}")
    if scheme == "image":
        if rest.rsplit("/", 1)[-1].partition(":")[2] in ("", "latest") and "@sha256:" not in rest:
            raise DeployError(
                f"model store {uri!r}: give the image a version tag (image://REGISTRY/REPO:TAG); "
                "an untagged or :latest image is pulled anew and names nothing in particular"
            )
        return ModelStore(kind="image", uri=uri, claim_or_image=rest, size=size)
    raise DeployError(f"model store scheme {scheme!r} is not supported: use s3, gs, as, pvc or image")


@dataclasses.dataclass(frozen=True)
class Restriction:
    """Protocol groups that need ``header`` to carry the value of key ``key`` in Secret ``secret``. The pod
    reads the value into env var ``env`` and Triton gets it as ``$(ENV)``: no key is ever written out."""

    groups: tuple[str, ...]
    header: str
    secret: str
    key: str
    env: str

    def spec_arg(self) -> str:
        """Triton's ``<groups>:<header>=<value>`` with the value left for Kubernetes to expand."""
        return f"{','.join(self.groups)}:{self.header}=$({self.env})"


def parse_restriction(text: str, *, index: int = 0) -> Restriction:
    """``GROUPS:HEADER=SECRET_NAME/KEY`` (groups comma-separated), e.g.
    ``inference,model-repository:x-api-key=triton-keys/admin``.

    Raises:
        DeployError: a malformed value, an unknown or the ``health`` group, or bad Secret/key names.
    """
    form = "GROUPS:HEADER=SECRET_NAME/KEY, e.g. inference:x-api-key=triton-keys/api-key"
    groups_text, sep, rest = text.partition(":")
    header, sep2, ref = rest.partition("=")
    secret, sep3, key = ref.partition("/")
    if not (sep and sep2 and sep3) or not groups_text or not header or not secret or not key:
        raise DeployError(f"--restrict {text!r} must be {form}")
    groups = tuple(g.strip() for g in groups_text.split(","))
    if "health" in groups:
        raise DeployError(
            f"--restrict {text!r}: the health group must stay unrestricted (the kubelet's probes send no "
            "header); restrict the other groups"
        )
    unknown = [g for g in groups if g not in RESTRICTABLE_GROUPS]
    if unknown:
        raise DeployError(
            f"--restrict {text!r}: unknown group(s) {', '.join(unknown)}; "
            f"use {', '.join(RESTRICTABLE_GROUPS)}"
        )
    if not _HEADER.match(header):
        raise DeployError(f"--restrict {text!r}: header {header!r} must be letters, digits and '-'")
    _check_name(secret, "Secret name")
    if not _SECRET_KEY.match(key):
        raise DeployError(f"--restrict {text!r}: Secret key {key!r} must be letters, digits, '-', '_' or '.'")
    return Restriction(groups, header.lower(), secret, key, env=f"TRITON_RESTRICT_KEY_{index}")


def _check_name(value: str, what: str) -> None:
    if not _NAME.match(value) or len(value) > 63:
        raise DeployError(
            f"{what} {value!r} is not a valid Kubernetes name (lower-case letters, digits and '-', "
            "at most 63 characters, starting and ending alphanumeric)"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeploySpec:
    """Everything the generated manifests are made from. Sizes are Kubernetes quantities."""

    name: str = "triton"
    image: str = DEFAULT_IMAGE
    #: where the repository comes from (default: ``image://NAME-models:<version>``, see default_store)
    store: ModelStore = dataclasses.field(default_factory=lambda: ModelStore(kind="image", uri=""))
    models: Sequence[str] = ()
    #: instances per model (from the repository's configs or a tune result), for sizing and the notes
    instances: Mapping[str, int] = dataclasses.field(default_factory=dict)
    replicas: int = 2
    min_replicas: int = 2
    max_replicas: int = 8
    cpu_request: str = "2"
    cpu_limit: str = "4"
    memory_request: str = "4Gi"
    memory_limit: str = "8Gi"
    #: GPUs per server pod (base, both overlays, KServe, compose); the deployed configs follow them
    gpus: int = 0
    #: ONNX Runtime's GPU accelerator: its CUDA provider, or TensorRT (FP32 or FP16, opt-in)
    gpu_accelerator: str = "cuda"
    #: node labels a GPU pod must match (NVIDIA's GPU operator labels GPU nodes nvidia.com/gpu.present)
    gpu_node_selector: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    metric: Metric = "queue_time"
    #: HPA/KEDA target of the gpu_utilization metric (Triton's nv_gpu_utilization, 0..1)
    target_gpu_utilization: float = 0.8
    #: HPA/KEDA target: mean queue time per request (us), or queue/compute ratio
    target_queue_us: int = 20_000
    target_queue_ratio: float = 1.0
    scale_down_window_s: int = 300
    #: gRPC connections are closed after this age so clients rebalance over new replicas (server#6177)
    grpc_max_connection_age_ms: int = 60_000
    exit_timeout_s: int = 30
    dev_namespace: str = "tritonforge-dev"
    prod_namespace: str = "tritonforge-prod"
    #: the images (see :mod:`tritonforge.deploy.images`): the server image built FROM ``image`` when the
    #: Python models need more than it has (set by generate), and the tools (locust, batch-infer)
    server_image: str = ""
    tools_image: str = ""
    registry: str = ""
    image_pull_secrets: tuple[str, ...] = ()
    priority_class: str = ""
    #: labels the ServiceMonitor / PodMonitor carry (kube-prometheus-stack selects on release=<its name>)
    monitor_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: the namespace Prometheus scrapes from (the NetworkPolicy lets it reach the metrics port)
    monitoring_namespace: str = "monitoring"
    #: a cloud identity for the pods' ServiceAccount instead of static keys (IRSA role ARN, GKE service
    #: account e-mail, Azure client id)
    workload_identity: str = ""
    #: a gRPC Ingress (L7, one backend pick per request) for this host, with this ingress class
    ingress_host: str = ""
    ingress_class: str = "nginx"
    ingress_namespace: str = "ingress-nginx"
    #: /tmp (Triton's object-store downloads, the Python backend's scratch): its emptyDir size limit
    scratch_size: str = "20Gi"
    kserve_mode: KServeMode = "RawDeployment"
    #: with --mtls: the kubernetes.io/tls Secret of the tool pods' client certificate
    client_tls_secret: str = ""
    locustfile: str = "any_model.py"
    locust_workers: int = 2
    #: the batch Job: ``tritonforge batch-infer MODEL --input IN --out OUT --shard K/N``
    batch_model: str = ""
    batch_input: str = ""
    batch_output: str = ""
    batch_shards: int = 4
    #: KServe canary plan: traffic percent at each step (empty: no plan) and how long each is held
    canary_steps: tuple[int, ...] = ()
    canary_hold_s: int = 300
    #: access control: restricted protocol groups (keys from Secrets), gRPC TLS from a kubernetes.io/tls
    #: Secret, and client certificates required (mTLS, the Secret's ca.crt)
    restrictions: tuple[Restriction, ...] = ()
    tls_secret: str = ""
    mtls: bool = False
    #: the Prometheus that KEDA queries and prometheus-adapter reads (prometheus-operator's default Service)
    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    #: the model cache on every server pod (see :mod:`tritonforge.deploy.cache`); ``None``: every model
    #: loads at start
    cache: CacheBudget | None = None
    #: with the cache, the models loaded at start besides the coordinator: the pins, each after the
    #: companions its config names (``tritonforge_load_with``, as ``serve`` loads them); empty: the pins
    cache_loads: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name(self.name, "deployment name")
        if not self.store.uri:  # the default store, named after the deployment
            object.__setattr__(self, "store", default_store(self.name, self.registry))
        if not self.tools_image:
            from tritonforge.deploy.images import image_set

            tools = image_set(self.name, base_image=self.image, registry=self.registry, requirements={}).tools
            object.__setattr__(self, "tools_image", tools)
        for image in (self.image, self.tools_image):
            if image.rsplit("/", 1)[-1].partition(":")[2] in ("", "latest") and "@sha256:" not in image:
                raise DeployError(f"image {image!r} needs a version tag (never :latest, it is always pulled)")
        for secret in (*self.image_pull_secrets, self.client_tls_secret):
            if secret:
                _check_name(secret, "Secret name")
        if self.priority_class:
            _check_name(self.priority_class, "priority class")
        _check_name(self.monitoring_namespace, "monitoring namespace")
        if self.mtls and not self.client_tls_secret:
            object.__setattr__(self, "client_tls_secret", f"{self.name}-client-tls")
        if self.kserve_mode not in ("RawDeployment", "Serverless", "ModelMesh"):
            raise DeployError(
                f"KServe mode must be RawDeployment, Serverless or ModelMesh, not {self.kserve_mode!r}"
            )
        if self.gpu_accelerator not in ("cuda", "tensorrt", "tensorrt-fp16"):
            raise DeployError(
                f"GPU accelerator {self.gpu_accelerator!r} is not one of cuda, tensorrt, tensorrt-fp16"
            )
        if self.gpu_accelerator != "cuda" and not self.gpus:
            raise DeployError("--gpu-accelerator applies to GPU pods: give --gpus N too")
        if self.metric == "gpu_utilization" and not self.gpus:
            raise DeployError("the gpu-utilization metric needs GPU pods: give --gpus N too")
        if not 0 < self.target_gpu_utilization <= 1:
            raise DeployError("the GPU utilisation target is a share in (0, 1], e.g. 0.8")
        if self.ingress_host and not re.match(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", self.ingress_host):
            raise DeployError(
                f"ingress host {self.ingress_host!r} is not a DNS name such as triton.example.com"
            )
        for key, value in self.monitor_labels.items():
            if not re.match(
                r"^([a-z0-9.-]+/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$", key
            ) or not re.match(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$", value):
                raise DeployError(
                    f"monitor label {key}={value!r} is not a Kubernetes label "
                    "(e.g. release=kube-prometheus-stack)"
                )
        for namespace in (self.dev_namespace, self.prod_namespace):
            _check_name(namespace, "namespace")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise DeployError(
                f"need 1 <= min replicas ({self.min_replicas}) <= max replicas ({self.max_replicas})"
            )
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise DeployError(
                f"replicas ({self.replicas}) must lie within [{self.min_replicas}, {self.max_replicas}]"
            )
        if self.gpus < 0:
            raise DeployError("GPU counts can't be negative")
        if self.target_queue_us <= 0 or self.target_queue_ratio <= 0:
            raise DeployError("the autoscaling target must be positive")
        if self.metric not in ("queue_time", "queue_ratio", "gpu_utilization"):
            raise DeployError(
                f"metric must be 'queue_time', 'queue_ratio' or 'gpu_utilization', not {self.metric!r}"
            )
        if self.canary_steps and (
            any(not 0 < s <= 100 for s in self.canary_steps)
            or list(self.canary_steps) != sorted(set(self.canary_steps))
            or self.canary_steps[-1] != 100
        ):
            raise DeployError(
                f"canary steps {list(self.canary_steps)} must be increasing percentages in (0, 100] "
                "ending at 100, e.g. 5,25,50,100"
            )
        if self.canary_hold_s <= 0:
            raise DeployError("the canary hold must be a positive number of seconds")
        if self.tls_secret:
            _check_name(self.tls_secret, "TLS Secret name")
        if self.mtls and not self.tls_secret:
            raise DeployError("--mtls needs --tls-secret (a kubernetes.io/tls Secret with ca.crt)")
        if len({r.env for r in self.restrictions}) != len(self.restrictions):
            raise DeployError("two restrictions share one env var; parse them with distinct indexes")
        if self.batch_shards < 1:
            raise DeployError("batch shards must be >= 1")
        if not re.match(r"^https?://[^/:]+(:\d+)?/?$", self.prometheus_url):
            raise DeployError(
                f"Prometheus URL {self.prometheus_url!r} must be http(s)://host[:port], e.g. "
                "http://prometheus-operated.monitoring.svc:9090"
            )
        if self.cache is not None:
            self._check_cache(self.cache)

    def _check_cache(self, cache: CacheBudget) -> None:
        options = "--cache-max-models/--cache-max-memory"
        if self.kserve_mode == "ModelMesh":
            raise DeployError(
                f"{options}: ModelMesh places, loads and evicts the models itself; drop the cache options "
                "or --kserve-mode modelmesh (raw and serverless KServe carry the cache)"
            )
        if self.store.object_store:
            raise DeployError(
                f"{options}: the cache reads the models' configs from the pod's disk, and Triton reads "
                f"{self.store.uri} itself; give --model-store image://REF:TAG or pvc://CLAIM instead"
            )
        needed = {"model-repository", "statistics"}
        for restriction in self.restrictions:
            if needed & set(restriction.groups):
                raise DeployError(
                    f"{options}: the cache's coordinator calls Triton's HTTP "
                    f"{' and '.join(sorted(needed & set(restriction.groups)))} API without a header; "
                    "leave those groups out of --restrict (the NetworkPolicy still fences them)"
                )
        check_cache_fits(cache, self.memory_limit)

    @property
    def serving_image(self) -> str:
        """The image the Triton containers run: the built server image, or ``image`` itself."""
        return self.server_image or self.image

    def replace(self, **changes: object) -> DeploySpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def triton_args(spec: DeploySpec, *, gpus: int | None = None) -> list[str]:
    """``tritonserver``'s arguments in the pod (the tests run exactly these on the real binary, with the
    repository, ports and addresses swapped for loopback ones)."""
    gpus = spec.gpus if gpus is None else gpus
    args = [
        f"--model-repository={spec.store.repository_arg}",
        "--model-control-mode=none",
        f"--http-port={HTTP_PORT}",
        f"--grpc-port={GRPC_PORT}",
        f"--metrics-port={METRICS_PORT}",
        "--allow-metrics=true",
        "--allow-cpu-metrics=true",
        f"--allow-gpu-metrics={'true' if gpus else 'false'}",
        "--metrics-interval-ms=2000",
        # readiness means every model is ready, so a pod gets traffic only once it can serve all of them
        "--strict-readiness=true",
        f"--exit-timeout-secs={spec.exit_timeout_s}",
        f"--grpc-max-connection-age={spec.grpc_max_connection_age_ms}",
        "--log-verbose=0",
        *access_args(spec),
    ]
    if spec.cache is not None:
        # the cache loads models on requests: explicit control, and readiness that needs no model but its own
        args = [a for a in args if not a.startswith(("--model-control-mode=", "--strict-readiness="))]
        args[1:1] = cache_args(spec.cache, spec.cache_loads)
    return args


def probe_paths(spec: DeploySpec) -> Mapping[str, str]:
    """The probes' paths: Triton's health endpoints, or with the cache the coordinator's readiness for the
    startup and readiness probes (a pod is ready once it can load models; none other need be loaded)."""
    if spec.cache is None:
        return PROBE_PATHS
    return {**PROBE_PATHS, "startup": CACHE_READY_PATH, "readiness": CACHE_READY_PATH}


def access_args(spec: DeploySpec) -> list[str]:
    """The restricted-protocol flags (gRPC and HTTP alike, values as ``$(ENV)``) and the gRPC TLS flags."""
    args: list[str] = []
    for restriction in spec.restrictions:
        args += [
            f"--grpc-restricted-protocol={restriction.spec_arg()}",
            f"--http-restricted-api={restriction.spec_arg()}",
        ]
    if spec.tls_secret:
        args += [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={TLS_MOUNT_PATH}/tls.crt",
            f"--grpc-server-key={TLS_MOUNT_PATH}/tls.key",
        ]
        if spec.mtls:
            args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={TLS_MOUNT_PATH}/ca.crt"]
    return args
