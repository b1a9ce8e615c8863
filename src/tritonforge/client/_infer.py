"""Flows of inference: one call (its attempts, shared memory, client-side batching's merge limit), many
calls, batched rows (0 rows included), and the fast path that makes a plain call's first attempt without
the flow machinery. No I/O: each flow yields the calls to make.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from tritonforge.client._coalesce import Batchable, batch_rows
from tritonforge.client._codec import (
    ModelMetadata,
    decode_response,
    frame,
    numpy_dtype,
)
from tritonforge.client._flow import Attempt, Each, Rpc, Spawn
from tritonforge.client._inputs import (
    PreparedCall,
    join_batches,
    smaller_limit,
)
from tritonforge.client._inputs import batches as split_under
from tritonforge.client._mapping import too_large
from tritonforge.client._options import (
    _INFER_OPTIONS,
    Flow,
    InferOptions,
    Outputs,
)
from tritonforge.client.shm import (
    CudaRegion,
    SystemRegion,
)
from tritonforge.errors import (
    AuthenticationError,
    ClientError,
    InvalidRequestError,
    NotOffered,
    RequestTooLarge,
    TransportError,
)

if TYPE_CHECKING:
    pass
from tritonforge.client._shadows import Shadows

__all__ = ["FastCall", "InferFlows"]


@dataclass(slots=True)
class FastCall:
    """A call on the fast path (:meth:`BaseClient._fast_infer`): its first attempt, ready to send."""

    model: str
    call: PreparedCall
    targets: list[tuple[str, str | None]]
    timeout_s: float | None
    attempt: Attempt
    rpc: Rpc
    started: float  # perf_counter: the call's latency
    start: float  # monotonic: the deadline's start


def _empty_output(tensor: Any) -> np.ndarray:
    """0 rows of an output (``TensorMetadata``): its dims after the batch one, a variable dim as 0."""
    dtype = np.dtype(numpy_dtype(tensor.datatype))
    return np.empty((0, *(max(0, int(d)) for d in tensor.shape[1:])), dtype=dtype)


def _merge_rows(call: PreparedCall, limit: int) -> int | None:
    """The call's rows when a merged request of at most ``limit`` rows has room for others (else ``None``)."""
    rows = batch_rows(call.signature) if limit else None
    return rows if rows is not None and 0 < rows < limit else None


class InferFlows(Shadows):
    """The inference flows (``infer``, ``infer_many``, ``infer_batched`` and the fast path)."""

    def _infer_flow(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        key: str | bytes | None = None,
        request_id: str | None = None,
    ) -> Flow[dict[str, np.ndarray]]:
        started = time.perf_counter()
        call = self._prepare(model, inputs, outputs, timeout_s)
        call.request_id = self._request_id(model, request_id)
        targets = self._targets(model, version, key)
        return (yield from self._prepared_infer_flow(model, call, targets, timeout_s, started))

    def _prepared_infer_flow(
        self,
        model: str,
        call: PreparedCall,
        targets: list[tuple[str, str | None]],
        timeout_s: float | None,
        started: float,
        first: tuple[Attempt, float, ClientError] | None = None,
    ) -> Flow[dict[str, np.ndarray]]:
        """A call whose inputs are checked and targets chosen (``first``: its first attempt, made on the
        fast path, failed: ``(attempt, start, error)``)."""
        rid = call.request_id
        last: list[Attempt] = [first[0]] if first is not None else []

        def on_attempt(attempt: Attempt) -> None:
            last[:] = (attempt,)
            self._on_attempt(model, attempt, rid)

        resumed = None if first is None else (first[1], first[0].endpoint, first[2])
        try:
            # misses=True: a model a server's cache can load is loaded there and the call retried there
            result = yield from self._call_flow(
                targets, timeout_s, partial(self._attempt_flow, call), on_attempt, resumed, misses=True
            )
        except ClientError as exc:
            self._on_done(model, targets[0][1], started, exc, last[0] if last else None, call, None)
            raise
        self._on_done(model, targets[0][1], started, None, last[0] if last else None, call, result)
        if self.shadows and not self._closed:
            shadow = self._shadow_for(model)
            if shadow is not None:
                # Own copies: the caller may reuse its arrays as soon as we return.
                yield Spawn(self._shadow_flow(model, shadow, call.mirror(rid + ".shadow"), result, timeout_s))
        return result

    def _fast_infer(
        self, model: str, inputs: Mapping[str, Any], options: InferOptions
    ) -> FastCall | Flow[Outputs]:
        """``infer``'s call as a :class:`FastCall` when its first attempt needs no decision the flows make
        (one target, one usable endpoint, inputs already validated, no shared memory, no shadow, nothing
        client-side batching could merge it with); otherwise the call's flow, to drive as usual.

        The face sends ``FastCall.rpc`` itself, then hands the answer to :meth:`_fast_done`, or its error to
        :meth:`_fast_failed` (which returns the flow that carries on with retries and fallbacks exactly as
        if it had made the attempt), or calls :meth:`_fast_abandoned` when the call is cancelled. The
        generator layers of the flows cost tens of microseconds a call, a sizeable share of a ~100 us
        request; this path does what they do for a first attempt, in one place.

        Raises:
            InvalidRequestError: as ``infer``, for bad inputs, options or request ids.
        """
        if not _INFER_OPTIONS.issuperset(options):
            return self._infer_flow(model, inputs, **options)  # TypeError names the unknown option
        started = time.perf_counter()
        timeout_s = options.get("timeout_s")
        call = self._prepare(model, inputs, options.get("outputs"), timeout_s)
        call.request_id = self._request_id(model, options.get("request_id"))
        targets = self._targets(model, options.get("version"), options.get("key"))
        ep = self._pool.only()
        if ep is None or len(targets) > 1 or model in self.shadows or self._may_merge(call, targets[0]):
            return self._prepared_infer_flow(model, call, targets, timeout_s, started)
        target_model, target_version = targets[0]
        header = self._headers.get((target_model, target_version, call.outputs, call.signature))
        total_s = self.deadline.total_s if timeout_s is None else timeout_s
        if (
            header is None  # the first call of this signature: checked against the metadata in the flow
            or (total_s is not None and total_s <= 0)
            or self._use_shm(call, ep)
        ):
            return self._prepared_infer_flow(model, call, targets, timeout_s, started)
        body = frame(header, call.raws, call.request_id)
        limit_bytes = ep.capabilities.max_message_bytes
        start = time.monotonic()
        if (limit_bytes is not None and len(body) > limit_bytes) or self._pool.acquire(start) is not ep:
            return self._prepared_infer_flow(model, call, targets, timeout_s, started)
        self._budget.deposit()
        attempt = Attempt(
            ep, target_model, target_version, self.deadline.attempt_timeout_s(total_s), 1, False, False
        )
        self._on_attempt(model, attempt, call.request_id)
        rpc = Rpc(
            ep,
            "ModelInfer",
            body,
            attempt.timeout_s,
            target_model,
            target_version,
            request_id=call.request_id,
        )
        return FastCall(model, call, targets, timeout_s, attempt, rpc, started, start)

    def _fast_done(self, fast: FastCall, response: Any) -> Outputs:
        """The fast call's answer: the endpoint released, the outputs decoded, the call recorded."""
        self._pool.release(fast.attempt.endpoint, time.monotonic(), transport_failure=False)
        result = decode_response(response)
        self._on_done(fast.model, fast.targets[0][1], fast.started, None, fast.attempt, fast.call, result)
        return result

    def _fast_failed(self, fast: FastCall, error: ClientError) -> Flow[Outputs]:
        """The flow that carries on after the fast call's first attempt failed with ``error``."""
        attempt = fast.attempt
        if isinstance(error, RequestTooLarge) and error.limit_bytes:
            attempt.endpoint.capabilities.max_message_bytes = error.limit_bytes
        self._on_attempt_error(attempt, error)
        return self._prepared_infer_flow(
            fast.model, fast.call, fast.targets, fast.timeout_s, fast.started, (attempt, fast.start, error)
        )

    def _fast_abandoned(self, fast: FastCall) -> None:
        """The fast call was cancelled mid-attempt: its endpoint is no longer in use."""
        self._pool.release(fast.attempt.endpoint, time.monotonic(), transport_failure=False)

    def _infer_many_flow(
        self,
        model: str,
        requests: Sequence[Mapping[str, Any]],
        concurrency: int = 16,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Flow[list[dict[str, np.ndarray]]]:
        """Every request as its own call, ``concurrency`` at a time; the first error raised after all ran.

        ``request_id``: a prefix; request ``i`` gets the id ``<request_id>-<i>``.
        """
        if isinstance(requests, (str, bytes, Mapping)) or not isinstance(requests, Sequence):
            raise InvalidRequestError(
                f"requests for model {model!r} must be a list of {{input name: array}} mappings, not "
                f"{type(requests).__name__}",
                model=model,
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, not {concurrency!r}")
        if request_id is not None:
            self._request_id(model, request_id)  # checked once, here
        if not requests:
            return []
        ids = (
            [None] * len(requests)
            if request_id is None
            else [f"{request_id}-{i}" for i in range(len(requests))]
        )
        flows = [
            self._infer_flow(model, r, version, outputs, timeout_s, request_id=rid)
            for r, rid in zip(requests, ids, strict=True)
        ]
        answers = yield Each(flows, concurrency)
        for answer in answers:
            if isinstance(answer, ClientError):
                raise answer
        return answers

    def _infer_batched_flow(
        self,
        model: str,
        inputs: Mapping[str, Any],
        batch_size: int,
        concurrency: int = 4,
        version: str | int | None = None,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        request_id: str | None = None,
    ) -> Flow[dict[str, np.ndarray]]:
        """Batches of ``batch_size`` rows, fewer under a message limit (learnt from a refusal if need be).

        ``request_id``: a prefix; batch ``i`` gets the id ``<request_id>-<i>``.
        """
        limit = self._known_limit()
        while True:
            batches = split_under(model, inputs, batch_size, limit)
            if not batches:
                return (yield from self._no_rows_flow(model, inputs, version, outputs, timeout_s))
            try:
                answers = yield from self._infer_many_flow(
                    model, batches, concurrency, version, outputs, timeout_s, request_id
                )
            except RequestTooLarge as exc:
                limit = smaller_limit(exc, limit)
            else:
                return join_batches(answers)

    def _no_rows_flow(
        self,
        model: str,
        inputs: Mapping[str, Any],
        version: str | int | None,
        outputs: Sequence[str] | None,
        timeout_s: float | None,
    ) -> Flow[dict[str, np.ndarray]]:
        """``infer_batched``'s answer to 0 rows: each output empty, of the shape and dtype the model's
        metadata gives it (no inference is sent; the inputs are checked against the metadata all the same).

        Raises:
            InvalidRequestError: inputs that don't fit the model, outputs it lacks, or a model whose
                metadata can't shape an empty answer (no batch dimension, no outputs declared).
        """
        call = self._prepare(model, inputs, outputs, timeout_s)
        target, target_version = self._targets(model, version, None)[0]
        meta = self._model_metadata.get((target, target_version))
        if meta is None:
            meta = yield from self._model_metadata_flow(target, target_version)
        if meta.inputs:
            meta.check_inputs(call.signature, target_version, None)
        wanted = list(call.outputs) if call.outputs is not None else [t.name for t in meta.outputs]
        declared = {t.name: t for t in meta.outputs}
        unknown = sorted(set(wanted) - set(declared))
        if declared and unknown:
            raise InvalidRequestError(
                f"model {model!r} has no output {unknown}; it has {sorted(declared)}", model=model
            )
        why = None
        if not declared:
            why = "its metadata declares no outputs"
        elif any(not declared[name].shape or declared[name].shape[0] != -1 for name in wanted):
            why = "its outputs have no batch dimension (max_batch_size 0)"
        if why is not None:
            raise InvalidRequestError(
                f"infer_batched on 0 rows of model {model!r}: an empty answer can't be shaped, {why}; "
                "skip the call when there are no rows",
                model=model,
            )
        return {name: _empty_output(declared[name]) for name in wanted}

    def _attempt_flow(self, call: PreparedCall, attempt: Attempt) -> Flow[dict[str, np.ndarray]]:
        """One attempt of a call at one endpoint: metadata first (once), then shared memory or bytes."""
        ep = attempt.endpoint
        model, version = attempt.model, attempt.version
        if self.validate and (model, version) not in self._model_metadata:
            response = yield Rpc(
                ep,
                "ModelMetadata",
                pb.ModelMetadataRequest(name=model, version=version or ""),
                attempt.timeout_s,
                model,
                version,
            )
            self._model_metadata[(model, version)] = ModelMetadata.from_proto(response)
        if self._use_shm(call, ep):
            answer = yield from self._shm_attempt_flow(call, attempt)
            if answer is not None:
                return answer
        merge = None
        if self._coalescing and call.nbytes <= self.coalesce.max_call_bytes:
            limit = yield from self._merge_limit_flow(attempt)
            rows = _merge_rows(call, limit)
            if rows is not None:
                merge = (call, attempt, rows, limit)
        body = self._encode(call, attempt)
        limit_bytes = ep.capabilities.max_message_bytes
        if limit_bytes is not None and len(body) > limit_bytes:
            where = f"model {model!r}" + (f" version {version}" if version else "") + f" at {ep.url}"
            raise too_large(
                where,
                f"message larger than max ({len(body)} vs. {limit_bytes})",
                model=model,
                version=version,
                endpoint=ep.url,
            )
        try:
            answer = yield Rpc(
                ep, "ModelInfer", body, attempt.timeout_s, model, version, merge, request_id=call.request_id
            )
        except RequestTooLarge as exc:
            if exc.limit_bytes:
                ep.capabilities.max_message_bytes = exc.limit_bytes
            raise
        # A merged call (AsyncClient) comes back already decoded: its rows of the merged answer.
        return answer if type(answer) is dict else decode_response(answer)

    def _shm_attempt_flow(self, call: PreparedCall, attempt: Attempt) -> Flow[dict[str, np.ndarray] | None]:
        """Send the inputs through a shared-memory region; ``None`` when the endpoint won't take one."""
        ep = attempt.endpoint
        self._check_inputs(call, attempt)
        pool = self._shm
        assert pool is not None
        body, taken = self._shm_request(call, attempt.model, attempt.version)
        region: SystemRegion | CudaRegion | None = taken
        try:
            if ep.url not in taken.registered_on:
                method, request = self._register_request(taken)
                try:
                    yield Rpc(ep, method, request, attempt.timeout_s, attempt.model, attempt.version)
                except TransportError:
                    raise
                except ClientError:
                    # Not offered (not Triton), or the server can't open it (another host, a container
                    # without our /dev/shm): never ask this endpoint again, send bytes.
                    ep.capabilities.shared_memory = False
                    pool.discard(taken)
                    region = None
                    return None
                taken.registered_on.add(ep.url)
                ep.capabilities.shared_memory = True
            response = yield Rpc(ep, "ModelInfer", body, attempt.timeout_s, attempt.model, attempt.version)
        finally:
            if region is not None:
                pool.release(region)
        return decode_response(response)

    def _merge_limit_flow(self, attempt: Attempt) -> Flow[int]:
        """The most rows a merged request for the attempt's model may carry (0: don't merge).

        Asks for the model's config once; a server without configs (not Triton) is never asked again,
        and while the question is out other calls go alone instead of asking too.
        """
        key = (attempt.model, attempt.version)
        batchable = self._batchable.get(key)
        if batchable is None:
            ep = attempt.endpoint
            if ep.capabilities.model_config is False or key in self._probing:
                return 0
            self._probing.add(key)
            try:
                response = yield Rpc(
                    ep,
                    "ModelConfig",
                    pb.ModelConfigRequest(name=attempt.model, version=attempt.version or ""),
                    attempt.timeout_s,
                    attempt.model,
                    attempt.version,
                )
            except (NotOffered, AuthenticationError):  # not offered, or not to us (restricted protocol)
                ep.capabilities.model_config = False
                return 0
            finally:
                self._probing.discard(key)
            ep.capabilities.model_config = True
            batchable = Batchable.from_config(response.config)
            self._batchable[key] = batchable
        return self._merge_limit(batchable)

    def _merge_limit(self, batchable: Batchable) -> int:
        cap = self.coalesce.max_rows
        return batchable.max_rows if cap is None else min(cap, batchable.max_rows)

    def _may_merge(self, call: PreparedCall, target: tuple[str, str | None]) -> bool:
        """Whether client-side batching may merge ``call`` (``True`` while the model's config is unknown:
        the flow asks for it)."""
        if not self._coalescing or call.nbytes > self.coalesce.max_call_bytes:
            return False
        batchable = self._batchable.get(target)
        return batchable is None or _merge_rows(call, self._merge_limit(batchable)) is not None
