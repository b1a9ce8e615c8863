"""Deploy a model repository: Kubernetes (kustomize base + overlays, HPA on Triton's metrics via
prometheus-adapter or KEDA), KServe, distributed locust, a sharded batch Job, docker-compose; and sizing
from a measured sweep. Every object is data (dicts or the kserve SDK's models), dumped with safe_dump.

Example:
    >>> from tritonforge.deploy import DeploySpec, generate, check_tree
    >>> generated = generate("model_repository", "deploy", DeploySpec(gpus=0))  # doctest: +SKIP
    >>> [f for f in check_tree("deploy") if not f.ok]                            # doctest: +SKIP
    []
"""

from __future__ import annotations

from tritonforge.deploy.canary import canary_patches, canary_plan, parse_canary_steps
from tritonforge.deploy.check import KUBERNETES_VERSION, Finding, check_tree, validate_object
from tritonforge.deploy.generate import Generated, generate, overlay_patches, repository_models
from tritonforge.deploy.metrics import (
    ADAPTER_METRIC_NAMES,
    adapter_rule,
    keda_query,
    pod_query,
    render_adapter_query,
)
from tritonforge.deploy.sizing import Sizing, load_measurement, size_for
from tritonforge.deploy.spec import (
    DEFAULT_IMAGE,
    PROBE_PATHS,
    TRITON_VERSION,
    DeploySpec,
    ModelStore,
    Restriction,
    image_for,
    parse_model_store,
    parse_restriction,
    probe_paths,
    triton_args,
)

__all__ = [
    "ADAPTER_METRIC_NAMES",
    "DEFAULT_IMAGE",
    "KUBERNETES_VERSION",
    "PROBE_PATHS",
    "TRITON_VERSION",
    "DeploySpec",
    "Finding",
    "Generated",
    "ModelStore",
    "Restriction",
    "Sizing",
    "adapter_rule",
    "canary_patches",
    "canary_plan",
    "check_tree",
    "generate",
    "image_for",
    "keda_query",
    "load_measurement",
    "overlay_patches",
    "parse_canary_steps",
    "parse_model_store",
    "parse_restriction",
    "pod_query",
    "probe_paths",
    "render_adapter_query",
    "repository_models",
    "size_for",
    "triton_args",
    "validate_object",
]
