"""Shadow traffic: which calls to mirror, the mirrored call's flow, and how its outputs compare with the
primary's (counted in ``shadow_stats``, a metric and a hook event). No I/O.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from tritonforge.client._flow import Attempt
from tritonforge.client._inputs import (
    PreparedCall,
)
from tritonforge.client._options import (
    Flow,
)
from tritonforge.client.observe import ClientEvent, ShadowStats
from tritonforge.client.policies import (
    Shadow,
)
from tritonforge.errors import (
    ClientError,
)

if TYPE_CHECKING:
    pass
from tritonforge.client._control import ControlFlows

__all__ = ["Shadows", "compare_outputs"]


def compare_outputs(
    primary: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray], rtol: float, atol: float
) -> tuple[bool, float]:
    """Whether the candidate's outputs differ from the primary's, and the largest absolute difference."""
    mismatch = set(primary) != set(candidate)
    worst = 0.0
    for name, want in primary.items():
        got = candidate.get(name)
        if got is None or got.shape != want.shape:
            mismatch = True
            continue
        if want.dtype.kind in "fiub" and got.dtype.kind in "fiub":
            a, b = want.astype(np.float64), got.astype(np.float64)
            if a.size:
                worst = max(worst, float(np.max(np.abs(a - b))))
            if not np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True):
                mismatch = True
        elif not np.array_equal(want, got):
            mismatch = True
    return mismatch, worst


class Shadows(ControlFlows):
    """Mirrors calls to a model's shadow and records the comparisons."""

    def _shadow_for(self, model: str) -> Shadow | None:
        shadow = self.shadows.get(model)
        if shadow is None or not shadow.should_mirror(self._rng):
            return None
        return shadow

    def _shadow_flow(
        self,
        model: str,
        shadow: Shadow,
        call: PreparedCall,
        primary: dict[str, np.ndarray],
        timeout_s: float | None,
    ) -> Flow[None]:
        started = time.perf_counter()
        try:
            result = yield from self._call_flow(
                [(shadow.model, shadow.version)], timeout_s, partial(self._attempt_flow, call), misses=True
            )
        except ClientError as exc:
            self._record_shadow(
                model, shadow, primary, None, exc, time.perf_counter() - started, call.request_id
            )
        else:
            self._record_shadow(
                model, shadow, primary, result, None, time.perf_counter() - started, call.request_id
            )

    def _record_shadow(
        self,
        model: str,
        shadow: Shadow,
        primary: Mapping[str, np.ndarray],
        candidate: Mapping[str, np.ndarray] | None,
        error: ClientError | None,
        latency_s: float,
        request_id: str | None = None,
    ) -> None:
        stats = self.shadow_stats.setdefault((model, shadow.model), ShadowStats())
        stats.mirrored += 1
        if error is not None:
            stats.errors += 1
            mismatch = True
        else:
            assert candidate is not None
            stats.compared += 1
            mismatch, diff = compare_outputs(primary, candidate, shadow.rtol, shadow.atol)
            stats.max_abs_diff = max(stats.max_abs_diff, diff)
            stats.mismatches += mismatch
        if self._metrics is not None:
            self._metrics.shadow(model, shadow.model, mismatch)
        if self.hooks:
            self._fire(
                ClientEvent(
                    "shadow",
                    shadow.model,
                    shadow.version,
                    None,
                    latency_s,
                    error,
                    mismatch=mismatch,
                    request_id=request_id,
                    outputs=candidate,
                )
            )

    def _attempt_flow(self, call: PreparedCall, attempt: Attempt) -> Flow[dict[str, np.ndarray]]:
        """One attempt of a call at one endpoint (defined by the inference flows, the layer above)."""
        raise NotImplementedError
