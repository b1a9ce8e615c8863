"""The client's request path in pieces, for callers that send many requests of one shape themselves
(batch runs): check and encode inputs, frame a request, decode an answer, and the lanes' streams.

A plain call needs none of this (``Client.infer`` does all of it); these are what it is made of, public
so that a layer above the client builds on them instead of on its private modules::

    call = prepare("clf", {"x": rows})                          # inputs checked, tensors encoded
    header = request_header("clf", None, call.signature, None)   # the request without its tensors
    body = frame(header, call.raws)                              # ModelInferRequest's bytes
    outputs = decode_response(response)                          # a ModelInferResponse's outputs

:func:`bytes_tensor` is the BYTES serializer every request of the client uses: ``bytes`` (``np.bytes_``
too) as they are, ``str`` as UTF-8, anything else refused by name (tritonclient's
``set_data_from_numpy`` sends ``np.bytes_(b"xy")`` as ``b"b'xy'"``).

:func:`streams_for` gives a batch run's lanes their ``ModelStreamInfer`` streams
(:class:`Streams`, one :class:`Lane` each), with the client's headers and auth key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tritonforge.client._codec import (
    bytes_tensor,
    decode_response,
    frame,
    request_header,
    signature_of,
    tensor_bytes,
)
from tritonforge.client._inputs import PreparedCall, prepare
from tritonforge.client._wire import Lane, Streams

if TYPE_CHECKING:
    from tritonforge.client._base import BaseClient

__all__ = [
    "Lane",
    "PreparedCall",
    "Streams",
    "bytes_tensor",
    "decode_response",
    "frame",
    "prepare",
    "request_header",
    "signature_of",
    "streams_for",
    "tensor_bytes",
]


def streams_for(client: BaseClient, urls: Sequence[str], timeout_s: float | None) -> Streams | None:
    """The lanes' streams to ``urls`` where the wire path can go: plain ``host:port`` endpoints without
    TLS, and a client not told to put tensors in shared memory (``None`` otherwise: every request through
    the client). Each stream sends the client's headers and its inference auth key; an answer later than
    ``timeout_s`` (the client's deadline when ``None``) is given up on.
    """
    if client.shared_memory.mode in ("system", "cuda"):
        return None
    plain = []
    for url in urls:
        url = url[len("grpc://") :] if url.startswith("grpc://") else url
        if client.tls is not None or "/" in url or ":" not in url:
            return None
        plain.append(url)
    limit = timeout_s if timeout_s is not None else client.deadline.total_s
    return Streams(plain, client._metadata("ModelStreamInfer") or (), limit)
