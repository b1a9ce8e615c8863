"""The error accounting of our Python models: run by our backends, shipped beside generated models.

Every Python model tritonforge runs or generates answers a failed request with an error *response* and
never raises from ``execute``: Triton 2.51's Python backend now and then loses a request of an ``execute``
that raises while other requests are in flight (never answered: its caller waits for its deadline; never
released: once the model is reloaded or unloaded, that version stays UNLOADING for good, and the server is
not ready under strict readiness). ``tools/async_raise_unload.py`` shows it.

Triton counts an error response as a success (``nv_inference_request_success``, and ``success`` in its
statistics API); only a raise counts in ``nv_inference_request_failure``. So :func:`settle_errors` counts
each error response in :data:`ERROR_RESPONSES` ``{model, version}`` (the labels of Triton's own counters),
and every verdict tritonforge gives on failures (``monitor``, the SLO rules and dashboard, the KServe
canary queries) adds it to Triton's failures and takes it out of Triton's successes.

Two homes, one piece of code. Our Python-based backends (:mod:`tritonforge.server.runtime`) import it from
the package. The Python models tritonforge generates (pipeline blocks, routers, the rollout's splitter)
run on NVIDIA's image, whose Python backend has the standard library and numpy only, not tritonforge: the
repository writer copies this file beside each Python model whose code imports it, as
``tritonforge_error_accounting.py`` (:data:`SHIPPED_AS`), and the model imports it from its own folder::

    import triton_python_backend_utils as pb_utils
    from tritonforge_error_accounting import error_counter, settle_errors

    class TritonPythonModel:
        def initialize(self, args):
            self.error_counter = error_counter(pb_utils, args)

        def execute(self, requests):
            return settle_errors(pb_utils, self._execute(requests), self.error_counter)

Standard library only, and it imports nothing of tritonforge: keep it so.
``pb_utils`` is handed in rather than imported, so the file also loads where Triton's stub is absent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["ERROR_RESPONSES", "SHIPPED_AS", "error_counter", "settle_errors"]

#: Error responses a Python model answered, per model and version (Triton counts them as successes)
ERROR_RESPONSES = "tritonforge_error_responses_total"
#: the module name this file has beside a generated Python model (what the model imports)
SHIPPED_AS = "tritonforge_error_accounting"
# the stub appends a raise's traceback ("At: ...") to its message; settle_errors drops it
_TRACEBACK = re.compile(r"\n+At:\n(?:  .*\n?)*")


def error_counter(pb_utils: Any, args: Mapping[str, str]) -> Any:
    """The :data:`ERROR_RESPONSES` counter of this model version (``None`` where metrics are off)."""
    try:
        family = pb_utils.MetricFamily(
            name=ERROR_RESPONSES,
            description="Error responses a Python model answered (Triton counts them as successes)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        return family, family.Metric(labels={"model": args["model_name"], "version": args["model_version"]})
    except Exception:  # metrics are off on this server: nothing reads the counter
        return None


def settle_errors(pb_utils: Any, responses: list[Any], counter: Any) -> list[Any]:
    """``responses``, with each error response among them counted in ``counter``; never raises.

    An error message that carries a traceback the stub appended to a raise of another model (a BLS call's
    answer, ``"At: ..."``) is answered without it.
    """
    errors = 0
    for i, response in enumerate(responses):
        if response is None or not response.has_error():
            continue
        errors += 1
        error = response.error()
        message = error.message()
        bare = _TRACEBACK.sub("", message)
        if bare != message:
            code = error.code() if hasattr(error, "code") else None
            kept = pb_utils.TritonError(bare) if code is None else pb_utils.TritonError(bare, code)
            responses[i] = pb_utils.InferenceResponse(output_tensors=[], error=kept)
    if errors and counter is not None:
        counter[1].increment(errors)
    return responses
