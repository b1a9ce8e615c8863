"""tritonforge: build, serve, orchestrate and load-test many models at once on NVIDIA Triton.

Heavy frameworks are optional: importing this package needs neither torch nor scikit-learn.
"""

from __future__ import annotations

from tritonforge.client import (
    AsyncClient,
    CircuitBreaker,
    Client,
    Deadline,
    Fallback,
    HealthCheck,
    RetryBudget,
    RetryPolicy,
    Shadow,
    SharedMemory,
    TLSConfig,
    TrafficSplit,
    Variant,
)
from tritonforge.errors import (
    AllEndpointsFailed,
    AuthenticationError,
    ClientError,
    ConfigError,
    DeadlineExceeded,
    EnsembleError,
    ExportError,
    InferenceFailed,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    QuantizationError,
    RepositoryError,
    ServerError,
    SignatureError,
    TransportError,
    TritonForgeError,
    Unavailable,
)
from tritonforge.server import EmbeddedServer

__version__ = "0.1.0"

__all__ = [
    "AllEndpointsFailed",
    "AsyncClient",
    "AuthenticationError",
    "CircuitBreaker",
    "Client",
    "ClientError",
    "ConfigError",
    "Deadline",
    "DeadlineExceeded",
    "EmbeddedServer",
    "EnsembleError",
    "ExportError",
    "Fallback",
    "HealthCheck",
    "InferenceFailed",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "QuantizationError",
    "RepositoryError",
    "RetryBudget",
    "RetryPolicy",
    "ServerError",
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
