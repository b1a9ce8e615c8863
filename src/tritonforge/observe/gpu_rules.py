"""The SLO file's GPU objectives as Prometheus rules, over Triton's per-GPU gauges.

Triton labels ``nv_gpu_utilization`` (0..1), ``nv_gpu_memory_used_bytes`` and ``nv_gpu_memory_total_bytes``
by ``gpu_uuid`` only (no model), so these objectives are per GPU, not per model; a server without a GPU
exports none of them and the rules then record nothing. :func:`tritonforge.observe.slo.rules` adds these.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["GPU_OBJECTIVES", "gpu_rules"]

# the SLO file's top-level keys, shares in (0, 1]
GPU_OBJECTIVES = ("gpu_utilization_max", "gpu_memory_max")

# objective: (alert, recorded series, its expression, what it measures)
_GPU = {
    "gpu_utilization_max": (
        "TritonGPUUtilizationHigh",
        "gpu:tritonforge_utilization:avg{w}",
        "avg by (instance, gpu_uuid) (avg_over_time(nv_gpu_utilization{s}[{w}]))",
        "GPU utilization",
    ),
    "gpu_memory_max": (
        "TritonGPUMemoryHigh",
        "gpu:tritonforge_memory_used_ratio:max",
        "max by (instance, gpu_uuid) (nv_gpu_memory_used_bytes{s})"
        " / max by (instance, gpu_uuid) (nv_gpu_memory_total_bytes{s})",
        "GPU memory used",
    ),
}


def gpu_rules(
    selector: str, window: str, for_: str, severity: str, limits: Mapping[str, float | None]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The recording rule and alert of each GPU objective in ``limits`` that is set (not None), per GPU
    (``instance`` and ``gpu_uuid``); ``selector`` is ``{matchers}`` or empty, added to every series read."""
    recording: list[dict[str, Any]] = []
    alerts: list[dict[str, Any]] = []
    for objective, (alert, record, expr, what) in _GPU.items():
        threshold = limits.get(objective)
        if threshold is None:
            continue
        name = record.replace("{w}", window)
        recording.append({"record": name, "expr": expr.replace("{s}", selector).replace("{w}", window)})
        gpu = "{{ $labels.gpu_uuid }} on {{ $labels.instance }}"
        alerts.append(
            {
                "alert": alert,
                "expr": f"{name} > {threshold:g}",
                "for": for_,
                "labels": {"severity": severity, "slo": objective},
                "annotations": {
                    "summary": f"{gpu}: {what} above its objective ({threshold:g})",
                    "description": f'{what} of {gpu} is {{{{ $value | printf "%.3g" }}}} '
                    f"(objective {threshold:g}) for {for_}.",
                },
            }
        )
    return recording, alerts
