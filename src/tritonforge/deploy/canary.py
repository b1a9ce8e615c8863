"""A KServe canary plan: the steps of ``tritonforge rollout`` as InferenceService patches.

KServe moves traffic to the newest revision of an InferenceService by its predictor's
``canaryTrafficPercent``. The plan is one merge patch per step (built by the ``kserve`` SDK's models, like
the InferenceService itself), and a plan file: the steps, how long each is held, the thresholds to watch
and, per step, the PromQL that judges the canary on Triton's per-version metrics.
"""

from __future__ import annotations

import re
from typing import Any

from tritonforge.deploy.spec import DeploySpec
from tritonforge.error_accounting import ERROR_RESPONSES
from tritonforge.errors import DeployError

__all__ = ["DEFAULT_CANARY_THRESHOLDS", "canary_patches", "canary_plan", "parse_canary_steps"]

#: what a step must stay within to go on (the names of `tritonforge rollout`'s thresholds)
DEFAULT_CANARY_THRESHOLDS: dict[str, float] = {"max_error_rate": 0.01, "min_requests": 100}


def parse_canary_steps(text: str) -> tuple[int, ...]:
    """``5,25,50,100``: increasing whole percentages ending at 100 (as ``tritonforge rollout --steps``).

    Raises:
        DeployError: not whole numbers, not increasing, outside (0, 100] or not ending at 100.
    """
    try:
        steps = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise DeployError(
            f"--canary-steps must be whole percentages like 5,25,50,100, not {text!r}"
        ) from None
    if not steps or any(not 0 < s <= 100 for s in steps) or list(steps) != sorted(set(steps)):
        raise DeployError(f"--canary-steps must be increasing percentages in (0, 100], not {text!r}")
    if steps[-1] != 100:
        raise DeployError(f"--canary-steps must end at 100 (the canary takes all traffic), not {text!r}")
    return steps


def step_file(index: int, percent: int) -> str:
    """The patch file of step ``index`` (1-based), e.g. ``step-1-5pct.yaml``."""
    return f"step-{index}-{percent}pct.yaml"


def canary_patches(spec: DeploySpec) -> list[dict[str, Any]]:
    """One InferenceService merge patch per step of ``spec.canary_steps``, setting only the predictor's
    ``canaryTrafficPercent``, then the rollback (0) last; built by the kserve SDK's models in their own
    interpreter.

    Raises:
        DeployError: no steps, or the kserve SDK is missing or failed.
    """
    from tritonforge.deploy.extras import kserve_sdk

    if not spec.canary_steps:
        raise DeployError("no canary steps: pass --canary-steps, e.g. 5,25,50,100")
    answer = kserve_sdk({"op": "canary", "name": spec.name, "steps": list(spec.canary_steps)})
    return list(answer["objects"])


def _window(hold_s: int) -> str:
    return f"{max(hold_s, 60)}s"


def step_queries(spec: DeploySpec, namespace: str) -> dict[str, str]:
    """PromQL over one hold window, per model and version (the canary serves the new version): error rate,
    mean latency (ms) and requests."""
    # each name a literal (a `.` in "m.1" must not match "mx1"), its backslashes doubled in the PromQL string
    models = "|".join(re.escape(m).replace("\\", "\\\\") for m in spec.models) or ".+"
    where = f'namespace="{namespace}",model=~"{models}"'
    w = _window(spec.canary_hold_s)
    by = "sum by (model, version)"
    ok = f"{by} (increase(nv_inference_request_success{{{where}}}[{w}]))"
    raised = f"({by} (increase(nv_inference_request_failure{{{where}}}[{w}])) or {ok} * 0)"
    # a Python model's error responses, which Triton counts among its successes (a version without any:
    # 0, not an empty result)
    answered = f"({by} (increase({ERROR_RESPONSES}{{{where}}}[{w}])) or {ok} * 0)"
    duration = f"{by} (increase(nv_inference_request_duration_us{{{where}}}[{w}]))"
    return {
        "error_rate": f"({raised} + {answered}) / clamp_min({ok} + {raised}, 1)",
        "mean_latency_ms": f"{duration} / clamp_min({ok}, 1) / 1000",
        "requests": f"{ok} + {raised}",
    }


def canary_plan(
    spec: DeploySpec, *, namespace: str, thresholds: dict[str, float] | None = None
) -> dict[str, Any]:
    """The plan file's content: steps (percent, patch file, hold, queries), thresholds, how to apply.

    Raises:
        DeployError: no steps.
    """
    if not spec.canary_steps:
        raise DeployError("no canary steps: pass --canary-steps, e.g. 5,25,50,100")
    limits = {**DEFAULT_CANARY_THRESHOLDS, **(thresholds or {})}
    queries = step_queries(spec, namespace)
    return {
        "inference_service": spec.name,
        "namespace": namespace,
        "hold_s": spec.canary_hold_s,
        "thresholds": limits,
        "judge": (
            "after holding a step, each query is read for the canary's version: go on when requests >= "
            "min_requests and error_rate <= max_error_rate (and mean_latency_ms <= max_mean_latency_ms if "
            "set); otherwise roll back with rollback.yaml (canaryTrafficPercent 0)"
        ),
        "steps": [
            {
                "step": i,
                "canary_traffic_percent": percent,
                "patch": step_file(i, percent),
                "apply": f"kubectl patch inferenceservice {spec.name} -n {namespace} --type merge "
                f"--patch-file kserve/canary/{step_file(i, percent)}",
                "hold_s": spec.canary_hold_s,
                "queries": queries,
            }
            for i, percent in enumerate(spec.canary_steps, 1)
        ],
        "rollback": f"kubectl patch inferenceservice {spec.name} -n {namespace} --type merge "
        "--patch-file kserve/canary/rollback.yaml",
    }
