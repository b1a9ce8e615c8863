"""tritonforge: build, serve, orchestrate and load-test many models at once on NVIDIA Triton.

Heavy frameworks are optional: importing this package needs neither torch nor scikit-learn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tritonforge.errors import (
    AllEndpointsFailed,
    AuthenticationError,
    BatchError,
    ClientError,
    ConfigError,
    DeadlineExceeded,
    DeployError,
    DriftError,
    EnsembleError,
    ExportError,
    GateError,
    InferenceFailed,
    InvalidRequestError,
    MetricsError,
    ModelLoadError,
    ModelNotFoundError,
    NotOffered,
    ObserveError,
    PipelineCheckError,
    QuantizationError,
    RepositoryError,
    RequestTooLarge,
    RolloutError,
    SecretError,
    ServerError,
    ServerGone,
    SignatureError,
    SLOError,
    TransportError,
    TritonForgeError,
    Unavailable,
)

if TYPE_CHECKING:
    from tritonforge.client import (
        AsyncClient,
        Auth,
        CircuitBreaker,
        Client,
        Coalesce,
        Deadline,
        Discovery,
        Fallback,
        HealthCheck,
        Placement,
        RetryBudget,
        RetryPolicy,
        Shadow,
        SharedMemory,
        TLSConfig,
        TrafficSplit,
        Variant,
    )
    from tritonforge.server import EmbeddedServer

# The client (grpc, prometheus_client) and the embedded server (subprocess, urllib, the config layer) load on
# first use: the Python-based backends import this package inside every one of Triton's stub processes,
# which must pay for neither (each module imported there is paid once per model instance, in memory and in
# load time).
_CLIENT_NAMES = frozenset(
    {
        "AsyncClient",
        "Auth",
        "CircuitBreaker",
        "Client",
        "Coalesce",
        "Deadline",
        "Discovery",
        "Fallback",
        "HealthCheck",
        "Placement",
        "RetryBudget",
        "RetryPolicy",
        "Shadow",
        "SharedMemory",
        "TLSConfig",
        "TrafficSplit",
        "Variant",
    }
)


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        import tritonforge.client

        return getattr(tritonforge.client, name)
    if name == "EmbeddedServer":
        from tritonforge.server import EmbeddedServer

        return EmbeddedServer
    raise AttributeError(f"module 'tritonforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _CLIENT_NAMES | {"EmbeddedServer"})


__version__ = "0.1.0"

__all__ = [
    "AllEndpointsFailed",
    "AsyncClient",
    "Auth",
    "AuthenticationError",
    "BatchError",
    "CircuitBreaker",
    "Client",
    "ClientError",
    "Coalesce",
    "ConfigError",
    "Deadline",
    "DeadlineExceeded",
    "DeployError",
    "Discovery",
    "DriftError",
    "EmbeddedServer",
    "EnsembleError",
    "ExportError",
    "Fallback",
    "GateError",
    "HealthCheck",
    "InferenceFailed",
    "InvalidRequestError",
    "MetricsError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NotOffered",
    "ObserveError",
    "PipelineCheckError",
    "Placement",
    "QuantizationError",
    "RepositoryError",
    "RequestTooLarge",
    "RetryBudget",
    "RetryPolicy",
    "RolloutError",
    "SLOError",
    "SecretError",
    "ServerError",
    "ServerGone",
    "Shadow",
    "SharedMemory",
    "SignatureError",
    "TLSConfig",
    "TrafficSplit",
    "TransportError",
    "TritonForgeError",
    "Unavailable",
    "Variant",
    "__version__",
]
