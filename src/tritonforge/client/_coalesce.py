"""Client-side batching: concurrent calls to one model merged into one request, answers split back.

No I/O here. :class:`AsyncClient` queues each eligible call under a key (endpoint, model, version,
requested outputs, and every input's name, dtype and non-batch dims); the calls queued by the time the
event loop comes round again go out as one request whose inputs are the calls' inputs joined along the
batch dim — in the wire format that is their raw bytes one after another, BYTES tensors included — and
each call gets its own rows of the answer. The merged request's ``id`` is the calls' request ids joined by
commas, so Triton's log line for it is found by any one of them.

Only models whose config has ``max_batch_size > 0`` and dynamic batching are merged: their owner has
declared that requests may be batched together, and the server would do the same merge, only after a
gRPC call per request. A merged request that fails for a reason other than the transport is re-sent call
by call, so a bad call fails alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tritonforge.client._flow import Attempt

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb2

__all__ = ["Batchable", "CallKey", "Group", "batch_rows", "key_of", "merge", "split"]

Signature = tuple[tuple[str, str, tuple[int, ...]], ...]
CallKey = tuple[str, str, str | None, tuple[str, ...] | None, Signature]


@dataclass(frozen=True, slots=True)
class Batchable:
    """What a model's config says about merging its calls: the most rows one request may carry."""

    max_rows: int  # 0: never merge

    @classmethod
    def from_config(cls, config: pb2.ModelConfig) -> Batchable:
        """From a ``ModelConfig`` message: merge only with ``max_batch_size > 0`` and dynamic batching."""
        if config.max_batch_size > 0 and config.HasField("dynamic_batching"):
            return cls(int(config.max_batch_size))
        return cls(0)


def batch_rows(signature: Signature) -> int | None:
    """The call's batch size when every input has the same first dim (else ``None``: not mergeable)."""
    rows = None
    for _, _, shape in signature:
        if not shape:
            return None
        if rows is None:
            rows = shape[0]
        elif shape[0] != rows:
            return None
    return rows


def key_of(
    url: str, model: str, version: str | None, outputs: tuple[str, ...] | None, sig: Signature
) -> CallKey:
    """Calls with the same key can go out together: same place, same outputs, same inputs but for rows."""
    return (url, model, version, outputs, tuple((n, d, s[1:]) for n, d, s in sig))


@dataclass(slots=True)
class Group:
    """Calls waiting to go out together."""

    key: CallKey
    members: list[tuple[Any, Attempt, Any]] = field(default_factory=list)  # (call, attempt, future)
    counts: list[int] = field(default_factory=list)  # each member's rows

    @property
    def rows(self) -> int:
        """The merged request's batch size."""
        return sum(self.counts)

    def add(self, call: Any, attempt: Attempt, future: Any, rows: int) -> None:
        self.members.append((call, attempt, future))
        self.counts.append(rows)

    def remove(self, future: Any) -> None:
        """Take out the member waiting on ``future`` (its call was cancelled before the group went out)."""
        index = next(i for i, (_, _, f) in enumerate(self.members) if f is future)
        del self.members[index], self.counts[index]

    def timeout_s(self) -> float | None:
        """The tightest of the members' timeouts: no call waits past its own deadline."""
        timeouts = [a.timeout_s for _, a, _ in self.members if a.timeout_s is not None]
        return min(timeouts) if timeouts else None


def merge(group: Group) -> tuple[Signature, list[bytes]]:
    """The merged call's signature and raw inputs: each input's bytes joined across the members."""
    first = group.members[0][0]
    signature = tuple((name, dtype, (group.rows, *shape[1:])) for name, dtype, shape in first.signature)
    raws = [b"".join(call.raws[i] for call, _, _ in group.members) for i in range(len(signature))]
    return signature, raws


def split(result: Mapping[str, np.ndarray], counts: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Each member's rows of the merged answer (views, no copies)."""
    total = sum(counts)
    for name, array in result.items():
        if not array.ndim or array.shape[0] != total:
            raise ValueError(
                f"output {name!r} has shape {list(array.shape)}, not {total} rows for the merged calls"
            )
    out = []
    start = 0
    for count in counts:
        end = start + count
        out.append({name: array[start:end] for name, array in result.items()})
        start = end
    return out
