"""The error accounting of our Python models: run by our backends, shipped beside generated models.

Triton 2.51's Python backend counts an error *response* as a success (``nv_inference_request_success``);
only an exception raised from ``execute`` counts in ``nv_inference_request_failure``, and it fails every
request of that execute. So :func:`settle_errors` raises when every response of an execute is the same
error (Triton then counts each request as a failure), and counts an error answered beside successful
responses in :data:`ERROR_RESPONSES` ``{model, version}``, which tritonforge's SLO rules add to Triton's
failures.

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

#: Error responses a Python model answered beside successful ones, per model and version (see above)
ERROR_RESPONSES = "tritonforge_error_responses_total"
#: the module name this file has beside a generated Python model (what the model imports)
SHIPPED_AS = "tritonforge_error_accounting"
# the stub appends a raise's traceback ("At: ..."); the nested ones inside a message are dropped
_TRACEBACK = re.compile(r"\n+At:\n(?:  .*\n?)*")


def error_counter(pb_utils: Any, args: Mapping[str, str]) -> Any:
    """The :data:`ERROR_RESPONSES` counter of this model version (``None`` where metrics are off)."""
    try:
        family = pb_utils.MetricFamily(
            name=ERROR_RESPONSES,
            description="Error responses a Python model answered beside successful ones (Triton counts "
            "them as successes)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        return family, family.Metric(labels={"model": args["model_name"], "version": args["model_version"]})
    except Exception:  # metrics are off on this server: nothing reads the counter
        return None


def settle_errors(
    pb_utils: Any, responses: list[Any], counter: Any, *, raise_alike: bool = True
) -> list[Any]:
    """``responses``, after raising when every one is an error with the same message (Triton then counts
    each as a failure), or adding the error responses among them to ``counter``.

    ``raise_alike=False`` never raises (every error response is counted in ``counter``): Triton 2.51's
    Python backend now and then loses a request of an execute that raises while other requests are in
    flight (never answered: its caller waits for its deadline; never released: once the model is
    reloaded, that version stays UNLOADING for good). ``tools/async_raise_unload.py`` shows it.
    """
    errors = [r.error().message() for r in responses if r is not None and r.has_error()]
    if raise_alike and errors and len(errors) == len(responses) and len(set(errors)) == 1:
        raise pb_utils.TritonModelException(_TRACEBACK.sub("", errors[0]))
    if errors and counter is not None:
        counter[1].increment(len(errors))
    return responses
