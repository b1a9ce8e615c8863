"""Raw ``tritonclient`` clients that carry an :class:`~tritonforge.client.Auth`: each call sends its protocol
group's key, and the channel its TLS credentials — for the tools that talk to Triton through tritonclient
(load generators, statistics readers) rather than through :class:`~tritonforge.client.Client`.

Example:
    >>> raw = tritonclient_for("triton:8001", auth, aio=True)                        # doctest: +SKIP
    >>> await raw.get_inference_statistics("clf")      # sent with the 'statistics' group's key
"""

from __future__ import annotations

import functools
from typing import Any

from tritonforge.client.policies import Auth

__all__ = ["TRITONCLIENT_RPCS", "tritonclient_for"]

#: tritonclient's method names and the gRPC call each makes (whose protocol group decides the key).
TRITONCLIENT_RPCS = {
    "is_server_live": "ServerLive",
    "is_server_ready": "ServerReady",
    "is_model_ready": "ModelReady",
    "get_server_metadata": "ServerMetadata",
    "get_model_metadata": "ModelMetadata",
    "get_model_config": "ModelConfig",
    "get_model_repository_index": "RepositoryIndex",
    "load_model": "RepositoryModelLoad",
    "unload_model": "RepositoryModelUnload",
    "get_inference_statistics": "ModelStatistics",
    "infer": "ModelInfer",
    "async_infer": "ModelInfer",
    "get_system_shared_memory_status": "SystemSharedMemoryStatus",
    "register_system_shared_memory": "SystemSharedMemoryRegister",
    "unregister_system_shared_memory": "SystemSharedMemoryUnregister",
    "get_cuda_shared_memory_status": "CudaSharedMemoryStatus",
    "register_cuda_shared_memory": "CudaSharedMemoryRegister",
    "unregister_cuda_shared_memory": "CudaSharedMemoryUnregister",
    "get_trace_settings": "TraceSetting",
    "update_trace_settings": "TraceSetting",
    "get_log_settings": "LogSettings",
    "update_log_settings": "LogSettings",
}


class _Authorized:
    """A tritonclient client whose calls carry their group's header (the rest passes through)."""

    def __init__(self, raw: Any, auth: Auth) -> None:
        self._raw = raw
        self._auth = auth

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._raw, name)
        rpc = TRITONCLIENT_RPCS.get(name)
        pair = self._auth.grpc_metadata(rpc) if rpc is not None else None
        if pair is None:
            return attr

        @functools.wraps(attr)
        def call(*args: Any, headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
            return attr(*args, headers={**(headers or {}), pair[0]: pair[1]}, **kwargs)

        return call


def tritonclient_for(url: str, auth: Auth | None = None, *, aio: bool = False) -> Any:
    """A ``tritonclient.grpc`` (or ``.aio``) client for ``url`` with ``auth``'s TLS and keys.

    Raises:
        OSError: a certificate or key file named in the TLS settings can't be read.
    """
    if aio:
        import tritonclient.grpc.aio as module
    else:
        import tritonclient.grpc as module
    if auth is None:
        return module.InferenceServerClient(url)
    kwargs: dict[str, Any] = {}
    tls = auth.tls
    if tls is not None:
        import grpc

        from tritonforge.client._channels import _pem

        kwargs["ssl"] = True
        kwargs["creds"] = grpc.ssl_channel_credentials(
            root_certificates=_pem(tls.root_certificates),
            private_key=_pem(tls.private_key),
            certificate_chain=_pem(tls.certificate_chain),
        )
        if tls.server_name:
            kwargs["channel_args"] = [  # replaces tritonclient's defaults: keep its unlimited sizes
                ("grpc.max_send_message_length", 2**31 - 1),
                ("grpc.max_receive_message_length", 2**31 - 1),
                ("grpc.ssl_target_name_override", tls.server_name),
            ]
    raw = module.InferenceServerClient(url, **kwargs)
    return _Authorized(raw, auth) if auth.keys else raw
