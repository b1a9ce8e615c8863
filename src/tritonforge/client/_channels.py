"""Each endpoint's gRPC channel: the client core's only network I/O (the flows yield the calls to make;
the faces, :mod:`~tritonforge.client._sync` and :mod:`~tritonforge.client._async`, make them on these
channels).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tritonforge.client._discovery import diff_endpoints
from tritonforge.client._options import (
    ClientCore,
)
from tritonforge.client._pool import Endpoint

if TYPE_CHECKING:
    pass

__all__ = ["INFER_METHOD", "Channels", "Transport"]


INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _pem(value: bytes | str | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class Transport:
    """One endpoint's channel and the inference service's calls on it (sync or grpc.aio alike)."""

    __slots__ = ("channel", "methods")

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.methods: dict[str, Any] = {
            name: value for name, value in vars(stub).items() if not name.startswith("_")
        }
        # Raw bytes in (the codec frames the request), a parsed response out; registered with the channel
        # once, as the generated stub does, so gRPC does not look the method up again for every call.
        self.methods["ModelInfer"] = channel.unary_unary(
            INFER_METHOD,
            request_serializer=None,
            response_deserializer=pb.ModelInferResponse.FromString,
            _registered_method=True,
        )


class Channels(ClientCore):
    """Opens a channel per endpoint (``grpc`` or ``grpc.aio``), with the client's TLS credentials."""

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.tls.root_certificates),
            private_key=_pem(self.tls.private_key),
            certificate_chain=_pem(self.tls.certificate_chain),
        )

    def _connect(self, grpc_module: Any) -> None:
        """A channel per endpoint from ``grpc`` or ``grpc.aio`` (they share these two functions)."""
        self._grpc_module = grpc_module
        self._credentials_cache = self._credentials()
        for ep in self._pool.endpoints:
            self._attach(ep)

    def _attach(self, ep: Endpoint) -> None:
        """Give one endpoint its channel (also for an endpoint that joins the pool later)."""
        channel = (
            self._grpc_module.insecure_channel(ep.url, options=self._channel_options)
            if self._credentials_cache is None
            else self._grpc_module.secure_channel(
                ep.url, self._credentials_cache, options=self._channel_options
            )
        )
        ep.handle = Transport(channel)

    def _rediscover(self) -> list[Endpoint]:
        """Bring the pool in line with the last resolution; the drained endpoints whose channels to close."""
        change = diff_endpoints([e.url for e in self._pool.endpoints], self._sources.current())
        return self._pool.apply(change.added, change.removed, self._attach)
