"""Rows through a model: requests of many rows, many in flight, and failures narrowed down to their rows.

A lane of a batch run sends its requests as messages of a ``ModelStreamInfer`` stream of its own
(:mod:`tritonforge.client.wire`) when it can; a request that can't go that way, or whose answer is an error,
goes through the :class:`~tritonforge.client.AsyncClient` like every other, so errors, retries and the
endpoint pool are the client's.

A request that the model refuses or fails on (:class:`InvalidRequestError`, :class:`InferenceFailed`) is
split in halves and retried until the failing rows stand alone; they are reported with the model's reason,
their neighbours answered. Transport failures (the server gone after the client's own retries) are not a
row's fault: they propagate, and the run stops with its finished shards kept.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from tritonforge.batch.columns import shape_groups, take
from tritonforge.client.wire import (
    Lane,
    Streams,
    decode_response,
    frame,
    prepare,
    request_header,
    signature_of,
)
from tritonforge.errors import InferenceFailed, InvalidRequestError

__all__ = ["Engine", "RowResult"]

ROW_ERRORS = (InvalidRequestError, InferenceFailed)


@dataclass
class RowResult:
    """The answer for a set of rows: outputs for ``rows`` (positions in the caller's arrays) in order,
    and ``failed``: position -> reason."""

    rows: np.ndarray
    outputs: dict[str, np.ndarray]
    failed: dict[int, str] = field(default_factory=dict)


class Engine:
    """Sends rows to ``model`` through an :class:`~tritonforge.client.AsyncClient`.

    Args:
        client: an open ``AsyncClient`` (one or several endpoints).
        model: the model (or ensemble) name; ``version``: None for the server's choice.
        batched: whether the model takes a batch dim (``max_batch_size > 0``); if not, rows go one by one.
        batch_size: rows per request (at most the model's ``max_batch_size``).
        outputs: the outputs to ask for (None: all).
        timeout_s: per-request timeout (None: the client's deadline).
        streams: the lanes' streams (:class:`~tritonforge.client.wire.Streams`); None: every request
            through the client.
    """

    def __init__(
        self,
        client: Any,
        model: str,
        *,
        version: str | None,
        batched: bool,
        batch_size: int,
        outputs: Sequence[str] | None = None,
        timeout_s: float | None = None,
        streams: Streams | None = None,
    ) -> None:
        self.client = client
        self.streams = streams
        self._headers: dict[Any, bytes] = {}  # request header per input signature, once it went through
        self.model = model
        self.version = version
        self.batched = batched
        self.batch_size = max(1, batch_size if batched else 1)
        self.outputs = list(outputs) if outputs else None
        self.timeout_s = timeout_s
        self.latencies_s: list[float] = []
        self.requests = 0
        self.streamed = 0  # of ``requests``, answered on a lane's stream

    def batches(self, arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Row positions of each request: rows of one shape together, ``batch_size`` at a time."""
        out: list[np.ndarray] = []
        for group in shape_groups(arrays):
            out.extend(group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size))
        return out

    async def _call(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.batched:
            inputs = {k: v[0] for k, v in inputs.items()}
        started = time.perf_counter()
        out = await self.client.infer(
            self.model, inputs, version=self.version, outputs=self.outputs, timeout_s=self.timeout_s
        )
        self.latencies_s.append(time.perf_counter() - started)
        self.requests += 1
        if not self.batched:
            out = {k: np.asarray(v)[None, ...] for k, v in out.items()}
        return out

    def lane(self, index: int) -> Lane | None:
        """Lane ``index``'s stream (None: no streams; the lane sends through the client)."""
        return None if self.streams is None else self.streams.lane(index)

    async def _streamed(self, inputs: dict[str, np.ndarray], lane: Lane) -> dict[str, np.ndarray] | None:
        """The outputs for ``inputs`` sent on the lane's stream; None when they have to go through the
        client (inputs it would refuse, a signature it hasn't checked yet, a broken stream, an error)."""
        if not self.batched:
            inputs = {k: v[0] for k, v in inputs.items()}
        try:
            call = prepare(self.model, inputs, self.outputs, None, self.client.allow_non_finite)
        except InvalidRequestError:
            return None  # the client says why, row by row
        header = self._headers.get(call.signature)
        if header is None:
            return None  # its first request goes through the client, which checks it against the model
        assert self.streams is not None
        started = time.perf_counter()
        answer = await self.streams.send(lane, frame(header, call.raws))
        if answer is None:
            return None
        response = pb.ModelStreamInferResponse.FromString(answer)
        if response.error_message:
            return None  # the client's call gets the error with its kind (and the rows are narrowed down)
        self.latencies_s.append(time.perf_counter() - started)
        self.requests += 1
        self.streamed += 1
        out = decode_response(response.infer_response)
        if not self.batched:
            out = {k: v[None, ...] for k, v in out.items()}
        return out

    def _learn(self, inputs: dict[str, np.ndarray]) -> None:
        """The request header of an input signature the client has sent (and so checked) once."""
        if not self.batched:
            inputs = {k: v[0] for k, v in inputs.items()}
        signature = signature_of(inputs)
        if signature not in self._headers:
            outputs = None if self.outputs is None else tuple(self.outputs)
            self._headers[signature] = request_header(self.model, self.version, signature, outputs)

    async def run(
        self, arrays: Mapping[str, np.ndarray], rows: np.ndarray, lane: Lane | None = None
    ) -> RowResult:
        """Answer ``rows`` (positions in ``arrays``), on ``lane``'s stream when it can; a row-level failure
        is narrowed down by halving (through the client)."""
        inputs = take(arrays, rows)
        out = None if lane is None else await self._streamed(inputs, lane)
        if out is not None:
            return self._checked(rows, out)
        try:
            out = await self._call(inputs)
        except ROW_ERRORS as exc:
            if len(rows) == 1:
                return RowResult(rows[:0], {}, {int(rows[0]): _reason(exc)})
            mid = len(rows) // 2
            left, right = await asyncio.gather(self.run(arrays, rows[:mid]), self.run(arrays, rows[mid:]))
            return _join(left, right)
        if self.streams is not None:
            self._learn(inputs)
        return self._checked(rows, out)

    def _checked(self, rows: np.ndarray, out: dict[str, np.ndarray]) -> RowResult:
        for name, value in out.items():
            if value.shape[:1] != (len(rows),):
                raise InferenceFailed(
                    f"model {self.model!r} answered {len(rows)} rows with output {name!r} of shape "
                    f"{list(value.shape)}; batch inference needs one output row per input row",
                    model=self.model,
                )
        return RowResult(rows, out)


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {getattr(exc, 'message', str(exc))}"


def _join(a: RowResult, b: RowResult) -> RowResult:
    failed = {**a.failed, **b.failed}
    if not len(a.rows):
        return RowResult(b.rows, b.outputs, failed)
    if not len(b.rows):
        return RowResult(a.rows, a.outputs, failed)
    return RowResult(np.concatenate([a.rows, b.rows]), join_outputs([a.outputs, b.outputs]), failed)


def join_outputs(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate outputs along the rows; a variable dim is padded to the longest (zeros/empty bytes)."""
    out = {}
    for name in parts[0]:
        arrays = [p[name] for p in parts]
        if len({a.shape[1:] for a in arrays}) > 1:
            arrays = _pad(arrays)
        out[name] = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    return out


def _pad(arrays: list[np.ndarray]) -> list[np.ndarray]:
    ndim = arrays[0].ndim
    longest = [max(a.shape[d] for a in arrays) for d in range(1, ndim)]
    padded = []
    for a in arrays:
        widths = [(0, 0)] + [(0, m - s) for m, s in zip(longest, a.shape[1:], strict=True)]
        fill: Any = b"" if a.dtype == object else 0
        padded.append(
            np.pad(a, widths, constant_values=fill) if a.dtype != object else _pad_object(a, longest, fill)
        )
    return padded


def _pad_object(a: np.ndarray, longest: list[int], fill: Any) -> np.ndarray:
    out = np.full((a.shape[0], *longest), fill, dtype=object)
    out[tuple(slice(0, s) for s in a.shape)] = a
    return out
