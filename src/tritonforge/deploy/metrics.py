"""The autoscaling metric, written once: the PromQL behind the HPA (via prometheus-adapter) and KEDA.

Triton exports cumulative counters per model: ``nv_inference_queue_duration_us`` (time requests waited in
the scheduler queue), ``nv_inference_compute_infer_duration_us`` (time the model ran) and
``nv_inference_request_success``. Their rates per pod give

- *queue time per request* (us): ``rate(queue) / rate(requests)`` -- grows as soon as a pod can't keep up;
- *queue-to-compute ratio*: ``rate(queue) / rate(compute)`` -- the same signal, independent of model speed.

On GPU pods, *GPU utilisation* (``nv_gpu_utilization``, 0..1 per GPU, averaged per pod) is a third
choice; ``nv_gpu_memory_used_bytes`` is read beside it by the SLO rules (:func:`gpu_queries`).

The queue metrics are 0 on an idle pod (the denominator is clamped, so "no traffic" is 0, not NaN, and the
HPA never sees a missing metric -- the "unable to get metric" of server#6247 came from a rule that matched
no series).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tritonforge.deploy.spec import DeploySpec
from tritonforge.errors import DeployError

__all__ = [
    "ADAPTER_METRIC_NAMES",
    "adapter_rule",
    "gpu_queries",
    "keda_query",
    "pod_query",
    "render_adapter_query",
]

RATE_WINDOW = "1m"
QUEUE = "nv_inference_queue_duration_us"
REQUESTS = "nv_inference_request_success"
COMPUTE = "nv_inference_compute_infer_duration_us"
#: the custom-metrics API names the adapter serves (what the HPA asks for)
ADAPTER_METRIC_NAMES: Mapping[str, str] = {
    "queue_time": "triton_queue_us_per_request",
    "queue_ratio": "triton_queue_compute_ratio",
    "gpu_utilization": "triton_gpu_utilization",
}
GPU_UTILIZATION = "nv_gpu_utilization"
GPU_MEMORY_USED = "nv_gpu_memory_used_bytes"
_DENOMINATOR = {"queue_time": REQUESTS, "queue_ratio": COMPUTE}


def _ratio(metric: str, matchers: str, group_by: str, window: str) -> str:
    if metric == "gpu_utilization":  # a gauge per GPU: the mean over a pod's GPUs (or all pods)
        by = f" by ({group_by})" if group_by else ""
        return f"avg{by} (avg_over_time({GPU_UTILIZATION}{{{matchers}}}[{window}]))"
    denominator = _DENOMINATOR[metric]
    by = f" by ({group_by})" if group_by else ""
    return (
        f"sum{by} (rate({QUEUE}{{{matchers}}}[{window}]))"
        f" / clamp_min(sum{by} (rate({denominator}{{{matchers}}}[{window}])), 1e-9)"
    )


def adapter_rule(spec: DeploySpec) -> dict[str, Any]:
    """The prometheus-adapter ``rules`` entry that serves the metric per pod to the HPA.

    ``<<.LabelMatchers>>`` and ``<<.GroupBy>>`` are filled in by the adapter (namespace, and the pods the
    HPA asks about); :func:`render_adapter_query` does the same for a check against a real Prometheus.
    """
    series = GPU_UTILIZATION if spec.metric == "gpu_utilization" else QUEUE
    return {
        "seriesQuery": f'{series}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{series}$", "as": ADAPTER_METRIC_NAMES[spec.metric]},
        "metricsQuery": _ratio(spec.metric, "<<.LabelMatchers>>", "<<.GroupBy>>", RATE_WINDOW),
    }


def render_adapter_query(
    metrics_query: str, *, namespace: str, pods: Sequence[str], group_by: str = "pod"
) -> str:
    """Fill a ``metricsQuery`` template as prometheus-adapter does for ``pods/<metric>`` in ``namespace``
    (its ``metricsQuery.Build``): ``<<.LabelMatchers>>`` -> ``namespace="ns",pod=~"a|b"`` (``pod="a"`` for
    one pod; the names joined as they are), ``<<.GroupBy>>`` -> ``pod``.

    Raises:
        DeployError: no pods, or a template field this filler doesn't fill (the check would be wrong).
    """
    if not pods:
        raise DeployError("the adapter asks about at least one pod")
    pod_matcher = f'pod="{pods[0]}"' if len(pods) == 1 else f'pod=~"{"|".join(pods)}"'
    matchers = f'namespace="{namespace}",{pod_matcher}'
    filled = metrics_query.replace("<<.LabelMatchers>>", matchers).replace("<<.GroupBy>>", group_by)
    if "<<" in filled:
        raise DeployError(f"metricsQuery uses a template field not filled here: {filled}")
    return filled


def pod_query(spec: DeploySpec, namespace: str) -> str:
    """The per-pod metric for every pod of the deployment in ``namespace`` (what the HPA averages)."""
    return _ratio(spec.metric, _selector(spec, namespace), "pod", RATE_WINDOW)


def keda_query(spec: DeploySpec, namespace: str) -> str:
    """KEDA's Prometheus trigger query: the deployment-wide mean, compared with the target as a Value
    (KEDA then scales replicas by current/target, as the HPA does with a per-pod average)."""
    return _ratio(spec.metric, _selector(spec, namespace), "", RATE_WINDOW)


def gpu_queries(spec: DeploySpec, namespace: str) -> dict[str, str]:
    """Per-pod GPU utilisation (0..1) and GPU memory used (bytes): what the README and the SLO rules
    offer beside the queue metrics on GPU pods."""
    where = _selector(spec, namespace)
    return {
        "gpu_utilization": f"avg by (pod) ({GPU_UTILIZATION}{{{where}}})",
        "gpu_memory_used_bytes": f"sum by (pod) ({GPU_MEMORY_USED}{{{where}}})",
    }


def _target(spec: DeploySpec) -> float:
    if spec.metric == "queue_time":
        return spec.target_queue_us
    return spec.target_gpu_utilization if spec.metric == "gpu_utilization" else spec.target_queue_ratio


def threshold(spec: DeploySpec) -> str:
    """KEDA's threshold for the metric (its query returns the same unit)."""
    return f"{_target(spec):g}"


def _selector(spec: DeploySpec, namespace: str) -> str:
    return f'namespace="{namespace}",pod=~"{spec.name}-[a-z0-9]+-[a-z0-9]+"'


def target_value(spec: DeploySpec) -> str:
    """The target as a Kubernetes quantity (queue time in us, or the ratio in milli-units)."""
    if spec.metric == "queue_time":
        return str(spec.target_queue_us)
    return f"{round(_target(spec) * 1000)}m"
