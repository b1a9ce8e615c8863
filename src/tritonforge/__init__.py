"""tritonforge: build, serve, orchestrate and load-test many models at once on NVIDIA Triton.

Heavy frameworks are optional: importing this package needs neither torch nor scikit-learn.
"""

from __future__ import annotations

from tritonforge.errors import (
    AllEndpointsFailed,
    ClientError,
    ConfigError,
    DeadlineExceeded,
    EnsembleError,
    ExportError,
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
    "ClientError",
    "ConfigError",
    "DeadlineExceeded",
    "EmbeddedServer",
    "EnsembleError",
    "ExportError",
    "InvalidRequestError",
    "ModelLoadError",
    "ModelNotFoundError",
    "QuantizationError",
    "RepositoryError",
    "ServerError",
    "SignatureError",
    "TransportError",
    "TritonForgeError",
    "Unavailable",
    "__version__",
]
