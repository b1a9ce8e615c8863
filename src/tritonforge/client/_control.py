"""Flows of the control plane: one call across endpoints under the retry, fallback and deadline decisions
(which inference uses too), health, metadata, config, statistics, the repository index, model load and
unload on every endpoint, capability probes and the shared-memory goodbye at close. No I/O: each flow
yields the calls to make.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

from google.protobuf import json_format
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb

from tritonforge.client._codec import (
    ModelMetadata,
)
from tritonforge.client._flow import Attempt, Each, Load, Rpc, Sleep, call_flow, one
from tritonforge.client._inputs import (
    as_version,
    check_model_name,
)
from tritonforge.client._misses import cache_miss_flow
from tritonforge.client._options import (
    DEFAULT_CONTROL_TIMEOUT_S,
    Flow,
)
from tritonforge.client._pool import Capabilities, Endpoint
from tritonforge.errors import (
    AuthenticationError,
    ClientError,
    NotOffered,
    TransportError,
)

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb2
from tritonforge.client._events import Events

__all__ = ["ControlFlows"]


# What a server that is not Triton may lack, and what to use instead.
_NOT_OFFERED_HINT = {
    "model_config": "ModelConfig is Triton's own call; client.model_metadata() works on every v2 server",
    "statistics": "ModelStatistics is Triton's own call; read the server's own metrics instead",
    "shared_memory": "tensors go in the message instead",
    "streaming": "use infer()",
}


def _as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


class ControlFlows(Events):
    """The control-plane flows (each public control method of the faces drives one)."""

    def _call_flow(
        self,
        targets: Sequence[tuple[str, str | None]],
        timeout_s: float | None,
        send: Callable[[Attempt], Flow[Any]],
        on_attempt: Callable[[Attempt], None] | None = None,
        resumed: tuple[float, Endpoint, ClientError] | None = None,
        misses: bool = False,
    ) -> Flow[Any]:
        """Run ``send`` (a flow per attempt) under the call's retry, fallback and deadline decisions
        (``resumed``: a first attempt already made and failed; ``misses``: a missing model is loaded by the
        endpoint's model cache and the call retried there; see :func:`call_flow`)."""
        self._check_open(targets[0][0] or None)
        flow = call_flow(
            targets,
            pool=self._pool,
            retry=self.retry,
            budget=self._budget,
            deadline=self.deadline,
            timeout_s=timeout_s,
            clock=time.monotonic,
            rng=self._rng,
            resumed=resumed,
            load_misses=misses,
        )
        try:
            step = next(flow)
            while True:
                if type(step) is Attempt:
                    if on_attempt is not None:
                        on_attempt(step)
                    try:
                        outcome = yield from send(step)
                    except ClientError as exc:
                        self._on_attempt_error(step, exc)
                        outcome = exc
                elif type(step) is Load:
                    try:
                        outcome = yield from cache_miss_flow(
                            step.endpoint, step.miss, step.model, step.timeout_s
                        )
                    except ClientError as exc:
                        outcome = exc
                    else:
                        outcome = None
                else:
                    yield cast(Sleep, step)
                    outcome = None
                step = flow.send(outcome)
        except StopIteration as stop:
            return stop.value
        finally:
            flow.close()

    def _control_flow(
        self,
        method: str,
        request: Message,
        *,
        model: str = "",
        version: str | None = None,
        timeout_s: float | None = None,
        feature: str | None = None,
    ) -> Flow[Any]:
        """One control-plane call on one endpoint (retried elsewhere like an inference).

        ``feature``: the :class:`Capabilities` field the call needs; an endpoint known not to offer it
        raises :class:`NotOffered` at once, and an UNIMPLEMENTED answer is remembered.
        """

        if model or not isinstance(model, str):
            check_model_name(model)

        def send(attempt: Attempt) -> Flow[Any]:
            caps = attempt.endpoint.capabilities
            if feature is not None and getattr(caps, feature) is False:
                raise self._not_offered(feature, attempt.endpoint, model or None)
            try:
                response = yield Rpc(
                    attempt.endpoint, method, request, attempt.timeout_s, model or None, version
                )
            except NotOffered:
                if feature is None:
                    raise
                setattr(caps, feature, False)
                raise self._not_offered(feature, attempt.endpoint, model or None) from None
            if feature is not None:
                setattr(caps, feature, True)
            return response

        return (yield from self._call_flow([(model, version)], timeout_s, send))

    @staticmethod
    def _not_offered(feature: str, ep: Endpoint, model: str | None) -> NotOffered:
        return NotOffered(
            f"the server at {ep.url} does not offer {feature.replace('_', ' ')} (it answered UNIMPLEMENTED: "
            f"likely not Triton); {_NOT_OFFERED_HINT[feature]}",
            model=model,
            endpoint=ep.url,
        )

    def _flag_flow(
        self, method: str, request: Message, field: str, model: str = "", version: str | None = None
    ) -> Flow[bool]:
        try:
            response = yield from self._control_flow(method, request, model=model, version=version)
        except AuthenticationError:
            raise  # "not ready" would hide that we lack the key
        except ClientError:
            if self._closed:
                raise
            return False
        return bool(getattr(response, field))

    def _is_server_live_flow(self) -> Flow[bool]:
        return self._flag_flow("ServerLive", pb.ServerLiveRequest(), "live")

    def _is_server_ready_flow(self) -> Flow[bool]:
        return self._flag_flow("ServerReady", pb.ServerReadyRequest(), "ready")

    def _is_model_ready_flow(self, model: str, version: str | int | None) -> Flow[bool]:
        check_model_name(model)  # a name that can't be sent is an error, not "not ready"
        v = as_version(version)
        return self._flag_flow(
            "ModelReady", pb.ModelReadyRequest(name=model, version=v or ""), "ready", model, v
        )

    def _server_metadata_flow(self) -> Flow[dict[str, Any]]:
        return _as_dict((yield from self._control_flow("ServerMetadata", pb.ServerMetadataRequest())))

    def _model_metadata_flow(self, model: str, version: str | int | None) -> Flow[ModelMetadata]:
        check_model_name(model)
        v = as_version(version)
        request = pb.ModelMetadataRequest(name=model, version=v or "")
        response = yield from self._control_flow("ModelMetadata", request, model=model, version=v)
        meta = ModelMetadata.from_proto(response)
        self._model_metadata[(model, v)] = meta
        return meta

    def _model_config_flow(self, model: str, version: str | int | None) -> Flow[pb2.ModelConfig]:
        check_model_name(model)
        v = as_version(version)
        request = pb.ModelConfigRequest(name=model, version=v or "")
        response = yield from self._control_flow(
            "ModelConfig", request, model=model, version=v, feature="model_config"
        )
        return response.config

    def _model_statistics_flow(self, model: str, version: str | int | None) -> Flow[dict[str, Any]]:
        if model != "":  # "": every model's
            check_model_name(model)
        v = as_version(version)
        request = pb.ModelStatisticsRequest(name=model, version=v or "")
        return _as_dict(
            (
                yield from self._control_flow(
                    "ModelStatistics", request, model=model, version=v, feature="statistics"
                )
            )
        )

    def _repository_index_flow(self) -> Flow[list[dict[str, Any]]]:
        response = yield from self._control_flow("RepositoryIndex", pb.RepositoryIndexRequest())
        return _as_dict(response).get("models", [])

    def _health_flow(self) -> Flow[dict[str, bool]]:
        """Ask every endpoint at once whether it is ready, and feed the answers to the pool."""
        self._check_open()
        timeout_s = self.health_check.timeout_s if self.health_check is not None else 1.0
        endpoints = list(self._pool.endpoints)
        answers = yield Each(
            [one(Rpc(ep, "ServerReady", pb.ServerReadyRequest(), timeout_s)) for ep in endpoints]
        )
        now = time.monotonic()
        result = {}
        for ep, answer in zip(endpoints, answers, strict=True):
            ready = not isinstance(answer, ClientError) and bool(answer.ready)
            if not isinstance(answer, AuthenticationError):  # refused us: the server is up, we lack a key
                self._pool.mark_health(ep, ready, now)
            result[ep.url] = ready
        return result

    def _load_model_flow(self, model: str, config: str | None, timeout_s: float | None) -> Flow[None]:
        check_model_name(model)
        request = pb.RepositoryModelLoadRequest(model_name=model)
        if config is not None:
            request.parameters["config"].string_param = config
        return self._every_endpoint_flow("RepositoryModelLoad", request, model, timeout_s)

    def _unload_model_flow(self, model: str, timeout_s: float | None) -> Flow[None]:
        check_model_name(model)
        request = pb.RepositoryModelUnloadRequest(model_name=model)
        return self._every_endpoint_flow("RepositoryModelUnload", request, model, timeout_s)

    def _every_endpoint_flow(
        self, method: str, request: Message, model: str, timeout_s: float | None
    ) -> Flow[None]:
        """One control call to every endpoint at once, each under ``timeout_s``; raises the first error."""
        self._check_open(model if isinstance(model, str) else None)
        check_model_name(model)
        timeout = DEFAULT_CONTROL_TIMEOUT_S if timeout_s is None else timeout_s
        endpoints = list(self._pool.endpoints)
        answers = yield Each([one(Rpc(ep, method, request, timeout, model)) for ep in endpoints])
        # only this model's cached metadata, config and request headers go: the others stay valid, and a
        # client loading and unloading models of a large repository keeps what it knows of the rest
        for cache in (self._model_metadata, self._batchable, self._headers):
            for key in [k for k in cache if k[0] == model]:
                del cache[key]
        errors = [a for a in answers if isinstance(a, ClientError)]
        if errors:
            raise errors[0]

    def _capabilities_flow(self) -> Flow[dict[str, Capabilities]]:
        """Probe what each endpoint offers that is not known yet; ``{url: Capabilities}`` (copies)."""
        self._check_open()
        probes: list[tuple[Endpoint, str]] = []
        rpcs: list[Rpc] = []
        asks = {
            "model_config": ("ModelConfig", pb.ModelConfigRequest(name="")),
            "statistics": ("ModelStatistics", pb.ModelStatisticsRequest(name="")),
            "shared_memory": ("SystemSharedMemoryStatus", pb.SystemSharedMemoryStatusRequest()),
            "streaming": ("ModelStreamInfer", ()),
        }
        for ep in self._pool.endpoints:
            for feature, (method, request) in asks.items():
                if getattr(ep.capabilities, feature) is None:
                    probes.append((ep, feature))
                    rpcs.append(Rpc(ep, method, request, 5.0))
        answers = (yield Each([one(r) for r in rpcs])) if rpcs else []
        for (ep, feature), answer in zip(probes, answers, strict=True):
            if isinstance(answer, NotOffered):
                setattr(ep.capabilities, feature, False)
            elif not isinstance(answer, TransportError):  # any other answer: the call exists
                setattr(ep.capabilities, feature, True)
        return {ep.url: replace(ep.capabilities) for ep in self._pool.endpoints}

    def _close_flow(self) -> Flow[None]:
        """Unregister our shared-memory regions from the servers that know them, then remove them."""
        pool = self._shm
        if pool is None:
            return
        rpcs = []
        for region in pool.regions():
            method, request = self._unregister_request(region)
            rpcs += [
                Rpc(ep, method, request, 2.0) for ep in self._pool.endpoints if ep.url in region.registered_on
            ]
        if rpcs:
            yield Each([one(r) for r in rpcs])
        pool.close()
