"""Credentials for the CLI verbs that talk to a server: one helper, :func:`with_access`, adds the options
and hands the verb an :class:`~tritonforge.client.Auth` (or ``None``).

Secrets never go on the command line: ``--auth`` takes Triton's ``"<protocols>:<header>=<ref>"`` spec with
``<ref>`` ``env:NAME`` or ``@PATH`` (a 0600 file), and each option also reads an environment variable::

    export TRITONFORGE_AUTH='model-repository,statistics:admin-key=env:ADMIN_KEY'
    tritonforge rollout start clf --to 2 --url triton:8001 --tls-root-cert ca.pem
"""

from __future__ import annotations

import functools
import inspect
import os
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

from tritonforge.commands import fail
from tritonforge.errors import TritonForgeError

__all__ = ["ACCESS_ENV", "build_auth", "server_secrets", "with_access"]

F = TypeVar("F", bound=Callable[..., Any])

#: The environment variable of each option (the option wins when both are given).
ACCESS_ENV = {
    "auth": "TRITONFORGE_AUTH",
    "tls_root_cert": "TRITONFORGE_TLS_ROOT_CERT",
    "tls_client_cert": "TRITONFORGE_TLS_CLIENT_CERT",
    "tls_client_key": "TRITONFORGE_TLS_CLIENT_KEY",
    "tls_server_name": "TRITONFORGE_TLS_SERVER_NAME",
}


def build_auth(
    auth: list[str] | None = None,
    tls_root_cert: Path | None = None,
    tls_client_cert: Path | None = None,
    tls_client_key: Path | None = None,
    tls_server_name: str | None = None,
) -> Any:
    """The client's :class:`~tritonforge.client.Auth` from the options, ``None`` when none was given.

    Raises:
        SecretError: a spec's secret given in the clear, unset, or in a file others can read; a client
            key readable by others; a client certificate without its key (or the reverse).
    """
    from tritonforge.client.policies import Auth, TLSConfig
    from tritonforge.client.secrets import check_private
    from tritonforge.errors import SecretError

    tls = None
    if (tls_client_cert is None) != (tls_client_key is None):
        raise SecretError("mutual TLS needs both --tls-client-cert and --tls-client-key")
    if tls_root_cert or tls_client_cert or tls_server_name:
        if tls_client_key is not None:
            check_private(tls_client_key, what="--tls-client-key")
        for name, path in (("--tls-root-cert", tls_root_cert), ("--tls-client-cert", tls_client_cert)):
            if path is not None and not Path(path).is_file():
                raise SecretError(f"{name}: {path} is not a file")
        tls = TLSConfig(
            root_certificates=None if tls_root_cert is None else str(tls_root_cert),
            certificate_chain=None if tls_client_cert is None else str(tls_client_cert),
            private_key=None if tls_client_key is None else str(tls_client_key),
            server_name=tls_server_name,
        )
    if not auth and tls is None:
        return None
    return Auth.from_specs(auth or [], tls=tls)


def server_secrets(
    grpc_restricted: list[str],
    http_restricted: list[str],
    grpc_server_key: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[str]]:
    """``serve``'s restricted-protocol specs with their keys read from their references (``env:NAME``,
    ``@PATH`` of a 0600 file), once the server's TLS key is known to be private.

    Example:
        >>> server_secrets(["model-repository:admin-key=env:ADMIN_KEY"], [])         # doctest: +SKIP
        (['model-repository:admin-key=s3cret'], [])

    Raises:
        SecretError: a key given in the clear, an unset variable, a file others can read (the message says
            ``chmod 600 FILE``), or a malformed spec.
    """
    from tritonforge.client.secrets import check_private, resolve_restricted_spec

    if grpc_server_key is not None:
        check_private(grpc_server_key, what="--grpc-server-key")
    grpc = [resolve_restricted_spec(s, what="--grpc-restricted-protocol") for s in grpc_restricted]
    http = [resolve_restricted_spec(s, what="--http-restricted-api") for s in http_restricted]
    return grpc, http


def _options() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    ref = "env:NAME or @FILE (mode 0600)"
    return [
        inspect.Parameter(
            "auth",
            kw,
            default=typer.Option(
                [],
                "--auth",
                metavar="SPEC",
                envvar=ACCESS_ENV["auth"],
                help=f"'<protocols>:<header>=<ref>': the key sent with those calls; <ref> is {ref}.",
            ),
            annotation=list[str],
        ),
    ] + [
        inspect.Parameter(
            name, kw, default=typer.Option(None, envvar=ACCESS_ENV[name], help=text), annotation=kind
        )
        for name, kind, text in (
            ("tls_root_cert", Path | None, "TLS: the CA to trust (PEM)."),
            ("tls_client_cert", Path | None, "Mutual TLS: this client's certificate."),
            ("tls_client_key", Path | None, "Mutual TLS: this client's key (mode 0600)."),
            ("tls_server_name", str | None, "TLS: the name the server's certificate has."),
        )
    ]


def with_access(verb: F) -> F:
    """Give a CLI verb the access options (``--auth``, ``--tls-*``); it receives ``access=`` an Auth or None.

    The verb declares a keyword ``access`` parameter (not shown as an option); errors in the options end
    the verb with one line on stderr.
    """
    signature = inspect.signature(verb)
    params = [p for p in signature.parameters.values() if p.name != "access"]
    added = _options()
    names = [p.name for p in added]

    @functools.wraps(verb)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in names}
        try:
            access = build_auth(**values)
        except TritonForgeError as exc:
            raise fail(exc) from None
        return verb(*args, access=access, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=params + added)  # type: ignore[attr-defined]
    # resolved here, in the verb's own module: the wrapper's globals are this module's
    annotations = {k: v for k, v in typing.get_type_hints(verb).items() if k != "access"}
    wrapper.__annotations__ = {**annotations, **{p.name: p.annotation for p in added}}
    del wrapper.__wrapped__  # typer must read the new signature, not the verb's
    return wrapper  # type: ignore[return-value]
