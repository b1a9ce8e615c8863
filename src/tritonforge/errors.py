"""One exception tree for everything tritonforge raises.

    TritonForgeError
    ├── ConfigError            a model config Triton would reject, or one that can't be parsed
    ├── SignatureError         a model file whose inputs/outputs can't be read or don't match its config
    ├── RepositoryError        a model repository with a bad layout, a missing file, an unknown model/version
    ├── ExportError            a model that can't be exported (unsupported layer, failed check vs source)
    ├── QuantizationError      a quantization that failed or missed its tolerance
    ├── EnsembleError          a malformed or inconsistent pipeline spec
    ├── BatchError             a batch run that can't start or go on (input, mapping, output folder, limits)
    ├── ServerError            the embedded Triton server could not start, or died
    │   └── ModelLoadError     a model failed to load (names the model and Triton's reason)
    └── ClientError            an inference or control call failed
        ├── InvalidRequestError    wrong input name, dtype or shape (never retried)
        ├── ModelNotFoundError     no such model / version on the server
        ├── InferenceFailed        the model ran on the server and failed (a fallback may answer)
        ├── AuthenticationError    the server refused the call's credentials (headers / TLS)
        ├── TransportError
        │   ├── DeadlineExceeded
        │   └── Unavailable
        └── AllEndpointsFailed

Every error carries the context it is about (``model``, ``version``, ``endpoint``) where it has one, and says
how to fix the problem where that is known.
"""

from __future__ import annotations

__all__ = [
    "AllEndpointsFailed",
    "AuthenticationError",
    "BatchError",
    "ClientError",
    "ConfigError",
    "DeadlineExceeded",
    "EnsembleError",
    "ExportError",
    "InferenceFailed",
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
]


class TritonForgeError(Exception):
    """Base of every tritonforge error.

    Args:
        message: what went wrong and, where known, how to fix it.
        model: the model the error is about, if any.
        version: the model version, if any.
        endpoint: the server endpoint (``host:port``), if any.
    """

    def __init__(
        self,
        message: str,
        *,
        model: str | None = None,
        version: str | int | None = None,
        endpoint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.model = model
        self.version = None if version is None else str(version)
        self.endpoint = endpoint


class ConfigError(TritonForgeError):
    """A model config that can't be parsed or that Triton would reject."""


class SignatureError(TritonForgeError):
    """A model file whose inputs/outputs can't be read, or disagree with its config."""


class RepositoryError(TritonForgeError):
    """A model repository with a bad layout, a missing file, or an unknown model or version."""


class ExportError(TritonForgeError):
    """A model that could not be exported, or whose export disagrees with the source."""


class QuantizationError(TritonForgeError):
    """A quantization that failed, or whose result missed its tolerance."""


class EnsembleError(TritonForgeError):
    """A pipeline spec that is malformed or inconsistent."""


class BatchError(TritonForgeError):
    """A batch inference run that can't start or go on: unreadable input, a column mapping that doesn't fit
    the model, an output folder holding another run, too many failed rows."""


class ServerError(TritonForgeError):
    """The embedded Triton server could not start, or stopped unexpectedly."""


class ModelLoadError(ServerError):
    """A model failed to load on the server; the message carries Triton's reason."""


class ClientError(TritonForgeError):
    """An inference or control request failed."""


class InvalidRequestError(ClientError):
    """The request itself is wrong (input name, dtype, shape); retrying can't help."""


class ModelNotFoundError(ClientError):
    """The server has no such model or version (or it is not loaded)."""


class InferenceFailed(ClientError):
    """The server accepted the request but the model failed running it; a fallback model may answer."""


class AuthenticationError(ClientError):
    """The server refused the call's credentials (missing or wrong headers, TLS)."""


class TransportError(ClientError):
    """The request did not get an answer from the server."""


class DeadlineExceeded(TransportError):
    """The request's deadline passed before an answer came."""


class Unavailable(TransportError):
    """The server could not be reached, or is overloaded; retrying may help."""


class AllEndpointsFailed(ClientError):
    """Every endpoint and fallback was tried and none answered."""
