"""The autoscaling objects as plain data: the HPA on a Triton metric through prometheus-adapter (with the
adapter's rules), and KEDA's ScaledObject querying Prometheus directly.
"""

from __future__ import annotations

from tritonforge.deploy.kube import Obj, _meta
from tritonforge.deploy.metrics import ADAPTER_METRIC_NAMES, adapter_rule, keda_query, target_value, threshold
from tritonforge.deploy.spec import (
    DeploySpec,
)

__all__ = ["hpa", "keda_scaled_object", "prometheus_adapter_configmap"]


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
                        "threshold": threshold(spec),
                        "ignoreNullValues": "false",
                    },
                }
            ],
        },
    }


#: where a tool pod finds the server's CA and (mTLS) its own client certificate
