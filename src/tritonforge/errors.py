"""One exception tree for everything tritonforge raises.

    TritonForgeError
    ├── ConfigError            a model config Triton would reject, or one that can't be parsed
    ├── SignatureError         a model file whose inputs/outputs can't be read or don't match its config
    ├── RepositoryError        a model repository with a bad layout, a missing file, an unknown model/version
    ├── ExportError            a model that can't be exported (unsupported layer, failed check vs source)
    ├── QuantizationError      a quantization that failed or missed its tolerance
    ├── EnsembleError          a malformed or inconsistent pipeline spec
    │   └── PipelineCheckError     every problem of a build's specs at once (``.issues``); nothing written
    ├── DeployError            deployment options that can't be generated, or manifests that don't validate
    ├── ObserveError           metrics, SLO files or traffic that can't be read or compared
    │   ├── MetricsError           a metrics endpoint that can't be read or holds no Triton metrics
    │   ├── SLOError               an SLO file that can't become rules (names the file, key and fix)
    │   └── DriftError             a profile or traffic that can't be compared (names model and feature)
    ├── RolloutError           a rollout that can't start, continue or finish (says what to run next)
    │   └── GateError              a version failed an evaluation gate (``.failures``, with the figures)
    ├── SecretError            a secret given in the clear, unset, or in a file others can read
    ├── BatchError             a batch run that can't start or go on (input, mapping, output folder, limits)
    ├── ServerError            the embedded Triton server could not start, or died
    │   ├── ModelLoadError     a model failed to load (names the model and Triton's reason)
    │   └── ServerGone         the server stopped answering mid-run (a sweep, a tune)
    └── ClientError            an inference or control call failed
        ├── InvalidRequestError    wrong input name, dtype, shape or value (never retried)
        │   ├── RequestTooLarge    over the server's message limit (``.limit_bytes``)
        │   └── NotOffered         the server does not offer this call (not Triton: UNIMPLEMENTED)
        ├── ModelNotFoundError     no such model / version on the server
        ├── InferenceFailed        the model ran on the server and failed (a fallback may answer)
        ├── AuthenticationError    the server refused the call's credentials (headers / TLS)
        ├── TransportError
        │   ├── DeadlineExceeded
        │   └── Unavailable
        └── AllEndpointsFailed

Every error carries the context it is about (``model``, ``version``, ``endpoint``) where it has one, and says
how to fix the problem where that is known.

The tree is closed: every exception tritonforge defines is here, and every error about what a call is
given to work on — a file, a repository, a spec, a config, a model, a tensor, a server — raises from it.
One convention for bad *arguments*: a value that is wrong for the function itself, whatever it points at
(a wrong type, a negative timeout, a version below 1, an unknown option name), is a programming error and
raises the builtin ``TypeError`` / ``ValueError``, like the standard library. CLI verbs check their
options before calling, so a user at a terminal still gets one line, never a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AllEndpointsFailed",
    "AuthenticationError",
    "BatchError",
    "ClientError",
    "ConfigError",
    "DeadlineExceeded",
    "DeployError",
    "DriftError",
    "EnsembleError",
    "ExportError",
    "GateError",
    "InferenceFailed",
    "InvalidRequestError",
    "MetricsError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NotOffered",
    "ObserveError",
    "PipelineCheckError",
    "QuantizationError",
    "RepositoryError",
    "RequestTooLarge",
    "RolloutError",
    "SLOError",
    "SecretError",
    "ServerError",
    "ServerGone",
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


class PipelineCheckError(EnsembleError):
    """One or more pipeline specs failed their checks; ``issues`` lists every one of them."""

    def __init__(self, issues: Sequence[Any]) -> None:
        lines = "\n".join(f"  - {issue}" for issue in issues)
        super().__init__(
            f"{len(issues)} problem(s) in the pipeline specs; nothing was written:\n{lines}",
            model=getattr(issues[0], "pipeline", None) if issues else None,
        )
        self.issues = list(issues)


class DeployError(TritonForgeError):
    """Deployment options that can't be turned into manifests, or generated manifests that don't validate."""


class ObserveError(TritonForgeError):
    """Metrics, an SLO file or sampled traffic that can't be read or compared."""


class MetricsError(ObserveError):
    """A metrics endpoint could not be read or did not hold Triton's metrics."""


class SLOError(ObserveError):
    """An SLO file that cannot be turned into rules (names the file, the key and the fix)."""


class DriftError(ObserveError):
    """A profile or traffic that cannot be compared (names the model/feature and the fix)."""


class RolloutError(TritonForgeError):
    """A rollout can't start, continue or finish (the message says why and what to run next)."""


class GateError(RolloutError):
    """A version failed an evaluation gate; ``failures`` lists each failed check with its figures."""

    def __init__(
        self,
        message: str,
        *,
        failures: Sequence[str] = (),
        model: str | None = None,
        version: int | None = None,
    ) -> None:
        super().__init__(message, model=model, version=version)
        self.failures = list(failures)


class SecretError(TritonForgeError):
    """A secret (key, password) that can't be read safely: given in the clear on a command line, from an
    unset environment variable, or from a file its group or the world can read."""


class BatchError(TritonForgeError):
    """A batch inference run that can't start or go on: unreadable input, a column mapping that doesn't fit
    the model, an output folder holding another run, too many failed rows."""


class ServerError(TritonForgeError):
    """The embedded Triton server could not start, or stopped unexpectedly."""


class ModelLoadError(ServerError):
    """A model failed to load on the server; the message carries Triton's reason."""


class ServerGone(ServerError):
    """The server stopped answering mid-run (statistics unreachable, or every request unavailable)."""


class ClientError(TritonForgeError):
    """An inference or control request failed."""


class InvalidRequestError(ClientError):
    """The request itself is wrong (input name, dtype, shape); retrying can't help."""


class RequestTooLarge(InvalidRequestError):
    """The request is over the server's message limit (``limit_bytes``, when the server said it).

    Never retried and never held against the endpoint: send fewer rows per call, or shared memory.
    """

    limit_bytes: int | None = None  # set where the limit is known


class NotOffered(InvalidRequestError):
    """The server does not offer this call (gRPC UNIMPLEMENTED: e.g. Triton's own RPCs on another server)."""


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
