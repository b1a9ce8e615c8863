"""Secrets read from places others cannot read: an environment variable, or a file only its owner can read.

A secret is never given on a command line (``ps`` shows every process's arguments to every user) nor
written into a generated manifest (Kubernetes gets a Secret reference). Wherever tritonforge takes one it
takes a *reference* instead:

    env:NAME     the value of environment variable NAME
    @PATH        the contents of file PATH (one trailing newline dropped), which must have mode 0600 or
                 stricter: a file its group or the world can read is refused

Example:
    >>> read_secret("env:TRITON_ADMIN_KEY", what="the operator key")          # doctest: +SKIP
    's3cret'
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from tritonforge.errors import SecretError

__all__ = ["SECRET_REF_HELP", "check_private", "is_secret_ref", "read_secret", "resolve_restricted_spec"]

SECRET_REF_HELP = "'env:NAME' (an environment variable) or '@PATH' (a file with mode 0600)"
# Triton's restricted-protocol spec: "<group>[,<group>...]:<header>=<value>".
_SPEC = re.compile(r"^(?P<groups>[a-z-]+(?:,[a-z-]+)*):(?P<key>[^=\s]+)=(?P<value>.*)$")


def is_secret_ref(value: str) -> bool:
    """Whether ``value`` is a reference (``env:NAME`` or ``@PATH``) rather than a secret itself."""
    return value.startswith("env:") or value.startswith("@")


def check_private(path: str | os.PathLike[str], *, what: str) -> Path:
    """``path`` as a Path, once sure it is a file that only its owner can read.

    Raises:
        SecretError: no such file, or its group or the world may read it (``chmod 600`` fixes that).
    """
    file = Path(path)
    try:
        mode = file.stat().st_mode
    except OSError as exc:
        raise SecretError(f"{what}: cannot read {file} ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise SecretError(f"{what}: {file} is not a file")
    if mode & 0o077:
        raise SecretError(
            f"{what}: {file} is readable by others (mode {stat.S_IMODE(mode):04o}); a secret file must be "
            f"mode 0600: run `chmod 600 {file}`"
        )
    return file


def read_secret(ref: str, *, what: str) -> str:
    """The secret ``ref`` points at (``env:NAME`` or ``@PATH``; see the module's doc).

    Raises:
        SecretError: ``ref`` is not a reference (a secret given in the clear), the variable is unset or
            empty, or the file is missing, empty or readable by others.
    """
    if ref.startswith("env:"):
        name = ref[len("env:") :]
        if not name:
            raise SecretError(f"{what}: 'env:' needs a variable name, e.g. env:TRITON_ADMIN_KEY")
        value = os.environ.get(name, "")
        if not value:
            raise SecretError(f"{what}: environment variable {name} is not set (or empty)")
        return value
    if ref.startswith("@"):
        file = check_private(ref[1:], what=what)
        value = file.read_text()
        value = value[:-1] if value.endswith("\n") else value
        if not value:
            raise SecretError(f"{what}: {file} is empty")
        return value
    raise SecretError(
        f"{what}: a secret is never given in the clear (a command line is visible to every user via ps); "
        f"give {SECRET_REF_HELP} instead"
    )


def resolve_restricted_spec(spec: str, *, what: str) -> str:
    """Triton's ``"<groups>:<header>=<value>"`` spec with its value read from the reference it holds.

    Example:
        >>> resolve_restricted_spec("model-repository:admin-key=env:KEY", what="serve")   # doctest: +SKIP
        'model-repository:admin-key=s3cret'

    Raises:
        SecretError: a malformed spec, or a value that is not a readable reference (see :func:`read_secret`).
    """
    match = _SPEC.match(spec)
    if match is None:
        raise SecretError(
            f"{what}: {_redacted(spec)!r} is not '<protocol>[,<protocol>...]:<header>=<ref>', e.g. "
            "'model-repository:admin-key=env:TRITON_ADMIN_KEY'"
        )
    value = read_secret(match["value"], what=f"{what} {match['groups']}:{match['key']}")
    if any(c.isspace() for c in value):
        raise SecretError(f"{what} {match['groups']}:{match['key']}: the secret must not contain whitespace")
    return f"{match['groups']}:{match['key']}={value}"


def _redacted(spec: str) -> str:
    head, sep, _ = spec.partition("=")
    return f"{head}=***" if sep else spec
