"""The secrets ``tritonforge serve`` hands Triton: restricted-protocol keys and the TLS key, read from the
environment or 0600 files (:mod:`tritonforge.secrets`), never taken from a command line."""

from __future__ import annotations

import os
from collections.abc import Sequence

from tritonforge.secrets import check_private, resolve_restricted_spec

__all__ = ["server_secrets"]


def server_secrets(
    grpc_restricted: Sequence[str],
    http_restricted: Sequence[str],
    grpc_server_key: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[str]]:
    """The restricted-protocol specs with their keys read from their references, once the server's TLS
    key is known to be private.

    Example:
        >>> server_secrets(["model-repository:admin-key=env:ADMIN_KEY"], [])         # doctest: +SKIP
        (['model-repository:admin-key=s3cret'], [])

    Raises:
        SecretError: a key given in the clear, an unset variable, a file others can read (the message says
            ``chmod 600 FILE``), or a malformed spec.
    """
    if grpc_server_key is not None:
        check_private(grpc_server_key, what="--grpc-server-key")
    grpc = [resolve_restricted_spec(s, what="--grpc-restricted-protocol") for s in grpc_restricted]
    http = [resolve_restricted_spec(s, what="--http-restricted-api") for s in http_restricted]
    return grpc, http
