"""The one place where gRPC and tritonclient errors become tritonforge errors."""

from __future__ import annotations

import re
from types import TracebackType

import grpc

from tritonforge.client.policies import GRPC_HEADER_PREFIX, PROTOCOL_GROUPS
from tritonforge.errors import (
    AuthenticationError,
    ClientError,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequestError,
    ModelNotFoundError,
    NotOffered,
    RequestTooLarge,
    Unavailable,
)

__all__ = ["error_for_status", "map_grpc_errors"]

_S = grpc.StatusCode
_BY_STATUS: dict[str, type[ClientError]] = {
    _S.INVALID_ARGUMENT.name: InvalidRequestError,
    _S.OUT_OF_RANGE.name: InvalidRequestError,
    _S.FAILED_PRECONDITION.name: InvalidRequestError,
    _S.UNIMPLEMENTED.name: NotOffered,
    _S.ALREADY_EXISTS.name: InvalidRequestError,
    _S.NOT_FOUND.name: ModelNotFoundError,
    _S.DEADLINE_EXCEEDED.name: DeadlineExceeded,
    _S.UNAVAILABLE.name: Unavailable,
    _S.RESOURCE_EXHAUSTED.name: Unavailable,
    _S.ABORTED.name: Unavailable,
    _S.CANCELLED.name: Unavailable,
    _S.UNAUTHENTICATED.name: AuthenticationError,
    _S.PERMISSION_DENIED.name: AuthenticationError,
    _S.INTERNAL.name: InferenceFailed,
    _S.UNKNOWN.name: InferenceFailed,
    _S.DATA_LOSS.name: InferenceFailed,
}
# A connection lost mid-call surfaces as INTERNAL/UNKNOWN with one of these: the transport, not the model.
_TRANSPORT_HINTS = (
    "rst_stream",
    "stream removed",
    "socket closed",
    "connection reset",
    "goaway",
    "broken pipe",
    "failed to connect",
    "connection refused",
    "end of tcp stream",
)
# gRPC's own words for a message over a limit, e.g. "Received message larger than max (5000019 vs. 4194304)".
_TOO_LARGE = re.compile(r"message larger than max \((\d+) vs\. (\d+)\)", re.IGNORECASE)
# A TLS handshake the server refused (no client certificate under mutual TLS, an untrusted one): who we
# are, not whether the server is up; never retried and never held against the endpoint.
# gRPC's words for metadata over its limit (received: the server's answer, e.g. an error echoing a long name
# or id; sent: our own headers): "received metadata size exceeds hard limit (value length 20042 vs. 16384)".
_METADATA_LIMIT = re.compile(r"metadata (?:list )?size exceeds|metadata too large|header list size", re.I)
_TLS_REFUSED = ("handshake", "certificate required", "certificate_required", "alert bad certificate")
_EXPECTED_HEADER = re.compile(r"expecting header '([^']+)'")
_HINTS = {
    ModelNotFoundError: " (is it in the repository and loaded? see client.repository_index())",
    Unavailable: " (is the server up? retried where the policy allows)",
    AuthenticationError: " (pass headers=... / tls=... to the client)",
}


def error_for_status(
    status: str,
    details: str,
    *,
    model: str | None,
    version: str | None,
    endpoint: str | None,
    method: str | None = None,
    tls: str | None = None,
) -> ClientError:
    """Our error for a gRPC status name (``"UNAVAILABLE"``) and Triton's message (``method``: the RPC;
    ``tls``: the channel's TLS, ``None``, ``"tls"`` or ``"mutual"``)."""
    cls = _BY_STATUS.get(status, ClientError)
    lowered = details.lower()
    if cls is InferenceFailed and any(h in lowered for h in _TRANSPORT_HINTS):
        cls = Unavailable
    # Triton answers UNAVAILABLE when a call to a restricted protocol lacks its header.
    if "protocol is restricted" in lowered:
        return _refused(details, method, model=model, version=version, endpoint=endpoint)
    if cls is Unavailable and (
        any(h in lowered for h in _TLS_REFUSED)
        # a TLS server that wants a client certificate closes the connection mid-handshake
        or (tls is not None and "failed to connect" in lowered and "socket closed" in lowered)
    ):
        return _tls_refused(details, tls, model=model, version=version, endpoint=endpoint)
    if cls is InvalidRequestError and "unknown model" in lowered:
        cls = ModelNotFoundError
    where = f"model {model!r}" if model else "call"
    if model and version:
        where += f" version {version}"
    if endpoint:
        where += f" at {endpoint}"
    if status == _S.RESOURCE_EXHAUSTED.name and "larger than max" in lowered:
        return too_large(where, details, model=model, version=version, endpoint=endpoint)
    if "model load / unload is not allowed" in lowered:
        # The server is up and said no to this call: not a reason to take it out of the pool.
        return InvalidRequestError(
            f"{where} failed: {details}; the server must run with explicit model control "
            "(tritonforge serve --model-control explicit, or tritonserver --model-control-mode=explicit)",
            model=model,
            version=version,
            endpoint=endpoint,
        )
    if status == _S.INTERNAL.name and details.strip().lower() == "invalid metadata":
        return InvalidRequestError(
            f"{where} failed: gRPC refused the call's metadata (INTERNAL: {details}): a header name or "
            "value it can't send (names 0-9 a-z _ . -, values printable ASCII)",
            model=model,
            version=version,
            endpoint=endpoint,
        )
    if status in (_S.RESOURCE_EXHAUSTED.name, _S.INTERNAL.name) and _METADATA_LIMIT.search(details):
        # The request's own fault, not the endpoint's: never retried, never held against its health.
        return InvalidRequestError(
            f"{where} failed: the call's metadata is over gRPC's limit ({status}: {details}): the "
            "server's error answer was too long to read (a model's error echoing a long input, say), or "
            "the client's headers= are too long",
            model=model,
            version=version,
            endpoint=endpoint,
        )
    if cls is NotOffered:
        return NotOffered(
            f"{where} failed: the server does not offer this call (UNIMPLEMENTED: {details}); it is "
            "likely not Triton, and only offers the Open Inference Protocol's core calls",
            model=model,
            version=version,
            endpoint=endpoint,
        )
    return cls(
        f"{where} failed: {status}: {details}{_HINTS.get(cls, '')}",
        model=model,
        version=version,
        endpoint=endpoint,
    )


def _refused(
    details: str, method: str | None, *, model: str | None, version: str | None, endpoint: str | None
) -> AuthenticationError:
    """A call whose protocol group the server restricts, sent without that group's key."""
    group = PROTOCOL_GROUPS.get(method or "", "") or "<group>"
    expected = _EXPECTED_HEADER.search(details)
    header = expected.group(1).removeprefix(GRPC_HEADER_PREFIX) if expected else "<header>"
    at = f" at {endpoint}" if endpoint else ""
    about = f" for model {model!r}" if model else ""
    return AuthenticationError(
        f"the server{at} refused the '{group}' call {method or ''}{about}: that group is restricted to "
        f"callers with its key (header '{header}'); pass it: auth=Auth({{'{group}': ('{header}', KEY)}}), "
        f"or --auth '{group}:{header}=env:VAR' (or =@FILE, mode 0600) on the command line",
        model=model,
        version=version,
        endpoint=endpoint,
    )


def _tls_refused(
    details: str, tls: str | None, *, model: str | None, version: str | None, endpoint: str | None
) -> AuthenticationError:
    at = f" at {endpoint}" if endpoint else ""
    ours = (
        "the client sent no certificate"
        if tls == "tls"
        else "the server did not accept the client's certificate"
        if tls == "mutual"
        else "TLS failed"
    )
    return AuthenticationError(
        f"the server{at} refused the TLS handshake ({ours}: {details}); under mutual TLS the client needs "
        "a certificate signed by the server's CA: TLSConfig(root_certificates=CA, certificate_chain=CERT, "
        "private_key=KEY), or --tls-root-cert/--tls-client-cert/--tls-client-key on the command line",
        model=model,
        version=version,
        endpoint=endpoint,
    )


def too_large(
    where: str, details: str, *, model: str | None, version: str | None, endpoint: str | None
) -> RequestTooLarge:
    """The clear error for a request over a message limit, naming the limit when gRPC said it."""
    match = _TOO_LARGE.search(details)
    size, limit = (int(match.group(1)), int(match.group(2))) if match else (None, None)
    said = f" of {size} bytes" if size is not None else ""
    over = f"the server's message limit of {limit} bytes" if limit else "the server's message limit"
    error = RequestTooLarge(
        f"{where}: the request{said} is over {over}; send fewer rows per call (infer_batched splits "
        "under the limit), use shared memory on the same host, or raise the server's limit "
        "(MLServer: grpc_max_message_length; Triton takes up to 2 GB)",
        model=model,
        version=version,
        endpoint=endpoint,
    )
    error.limit_bytes = limit
    return error


class map_grpc_errors:
    """Translate gRPC / tritonclient errors raised in the block into our tree (``raise ... from exc``).

    Example:
        >>> with map_grpc_errors(model="clf", version=None, endpoint="localhost:8001"):  # doctest: +SKIP
        ...     stub.ModelInfer(request)

    A class, not ``@contextmanager``: it wraps every request, and this costs a fraction of the generator's.
    """

    __slots__ = ("endpoint", "method", "model", "tls", "version")

    def __init__(
        self,
        *,
        model: str | None = None,
        version: str | None = None,
        endpoint: str | None = None,
        method: str | None = None,
        tls: str | None = None,
    ):
        self.model = model
        self.version = version
        self.endpoint = endpoint
        self.method = method
        self.tls = tls

    def __enter__(self) -> map_grpc_errors:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None or isinstance(exc, ClientError):
            return
        mapped = translate(
            exc,
            model=self.model,
            version=self.version,
            endpoint=self.endpoint,
            method=self.method,
            tls=self.tls,
        )
        if mapped is not None:
            raise mapped from exc


def translate(
    exc: BaseException,
    *,
    model: str | None,
    version: str | None,
    endpoint: str | None,
    method: str | None = None,
    tls: str | None = None,
) -> ClientError | None:
    """Our error for a foreign one, or ``None`` when it is not a gRPC / tritonclient error."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code = exc.code()
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return error_for_status(
            code.name if code else "UNKNOWN",
            details or "",
            model=model,
            version=version,
            endpoint=endpoint,
            method=method,
            tls=tls,
        )
    module = type(exc).__module__ or ""
    if module.startswith("tritonclient"):
        status = getattr(exc, "status", lambda: None)()
        name = str(status).rsplit(".", 1)[-1] if status else "UNKNOWN"
        message = getattr(exc, "message", lambda: str(exc))()
        return error_for_status(
            name, str(message), model=model, version=version, endpoint=endpoint, method=method, tls=tls
        )
    return None
