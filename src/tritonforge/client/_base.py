"""The client's core, shared by :class:`~tritonforge.client.Client` and
:class:`~tritonforge.client.AsyncClient`, assembled from its layers, each in its own module:

- :mod:`~tritonforge.client._options`: options and state, the decisions every layer asks (no network
  I/O; a shared-memory request copies its tensors into a region of the client's pool);
- :mod:`~tritonforge.client._channels`: each endpoint's gRPC channel, the core's only network I/O;
- :mod:`~tritonforge.client._events`: metrics and hooks;
- :mod:`~tritonforge.client._control`: one call across endpoints (retries, fallbacks, deadline) and the
  control-plane flows;
- :mod:`~tritonforge.client._shadows`: shadow traffic and its comparisons;
- :mod:`~tritonforge.client._infer`: the inference flows and the fast path.

Every public method of :class:`Client` and :class:`AsyncClient` is one line: it drives the matching
``_<name>_flow`` generator, which yields the I/O to do (:class:`~tritonforge.client._flow.Rpc`,
``Each``, ``Sleep``, ``Spawn``) and is sent the answers. So a decision, a request or a response is shaped
in one place, and the two faces cannot drift apart.
"""

from __future__ import annotations

from tritonforge.client._channels import INFER_METHOD, Transport
from tritonforge.client._infer import FastCall, InferFlows
from tritonforge.client._inputs import PreparedCall
from tritonforge.client._options import DEFAULT_CONTROL_TIMEOUT_S, Flow, InferOptions, ManyOptions, Outputs
from tritonforge.client._shadows import compare_outputs

__all__ = [
    "DEFAULT_CONTROL_TIMEOUT_S",
    "INFER_METHOD",
    "BaseClient",
    "FastCall",
    "Flow",
    "InferOptions",
    "ManyOptions",
    "Outputs",
    "PreparedCall",
    "Transport",
    "compare_outputs",
]


class BaseClient(InferFlows):
    """Options and decisions shared by :class:`Client` and :class:`AsyncClient` (see their docs).

    Args:
        urls: one ``host:port`` or a list of them (replicas serving the same models); a
            ``dns:///name:port`` URL stands for every address of ``name``, re-resolved in the background.
        discovery: :class:`Discovery`, how ``dns:///`` URLs are re-resolved (every 2 s by default).
        deadline: a :class:`Deadline` or a number of seconds for a whole call (``timeout_s`` per call wins).
        retry: :class:`RetryPolicy` for transient errors (``RetryPolicy.none()`` to disable).
        breaker: :class:`CircuitBreaker` per endpoint.
        placement: :class:`Placement`: each model goes to a few endpoints chosen by rendezvous hashing
            (stays loaded on few servers); without it every endpoint serves every model.
        health_check: :class:`HealthCheck` run in the background.
        routes: ``{model: TrafficSplit}`` (A/B, canary).
        fallbacks: ``{model: Fallback}``.
        shadows: ``{model: Shadow}``.
        shared_memory: :class:`SharedMemory` or its mode (``"auto"``, ``"system"``, ``"cuda"``, ``"off"``);
            a server that does not take a region gets the bytes in the message.
        headers: sent with every call (auth proxies; for Triton's restricted protocols prefer ``auth``).
        tls: :class:`TLSConfig`.
        auth: :class:`Auth`: each call sends only its protocol group's key (inference, model-repository,
            ...); its ``tls`` is the channel's when ``tls`` is not given.
        validate: check inputs against the model's metadata before sending (once per input signature).
        allow_non_finite: NaN and ±inf inputs are refused by default; ``True`` sends them for every input,
            a collection of input names (``"x"``, or ``"model/x"`` for one model's) for those inputs only.
        coalesce: client-side batching (:class:`Coalesce`); :class:`AsyncClient` only, on by default there.
        streams: inference requests as messages of long-lived streams instead of one gRPC call each;
            :class:`AsyncClient` only, off by default (plain-text gRPC only; see its doc).
        registry: prometheus registry for the client metrics.
        metrics: ``False`` turns the client metrics off.
        hooks: callables given a :class:`ClientEvent` for each call, retry, fallback and shadow comparison;
            a hook that raises never fails the call (counted in ``hook_errors``, warned about once per hook).
        channel_options: extra gRPC channel options.
        seed: seeds the client's randomness (routing, jitter) for reproducible runs.
    """
