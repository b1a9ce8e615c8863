"""Changing models safely: canary rollouts judged on live evidence, evaluation gates, retraining hooks."""

from tritonforge.rollout.controller import DEFAULT_STEPS, Outcome, Rollout, parse_steps
from tritonforge.rollout.evidence import Evidence, judge
from tritonforge.rollout.state import RolloutError, RolloutState, Thresholds

__all__ = [
    "DEFAULT_STEPS",
    "Evidence",
    "Outcome",
    "Rollout",
    "RolloutError",
    "RolloutState",
    "Thresholds",
    "judge",
    "parse_steps",
]
