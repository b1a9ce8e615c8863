"""What tritonserver is told and what it says back, as plain functions (no process of its own).

Its access options checked (Triton's restricted-API specs, gRPC TLS files), a flag's values read back
from extra arguments, the environment its Python-backend stub needs to run in the right interpreter, and
the lines of its log that name a model which failed to load or a port already taken, and a model config
as the JSON its model-load API takes. ``EmbeddedServer``
launches with these; ``server.access`` reads the same flags.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from tritonforge.errors import ServerError
from tritonforge.server.install import BACKEND_PATH_ENV, StubPython, TritonInstall, package_path

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as pb2

    from tritonforge.config import ModelConfig

__all__ = [
    "PORT_IN_USE",
    "RESTRICTED_SPEC",
    "check_access_options",
    "config_json",
    "flag_values",
    "http_headers",
    "load_failures",
    "server_environment",
]

#: Triton's restricted-protocol spec: "<protocol>[,<protocol>...]:<header>=<value>".
RESTRICTED_SPEC = re.compile(r"^(?P<protocols>[a-z-]+(?:,[a-z-]+)*):(?P<key>[^=\s]+)=(?P<value>\S*)$")

_File: TypeAlias = "str | os.PathLike[str]"
# Triton's log lines that name a model which did not load, and why.
_LOAD_FAILURES = (
    re.compile(r"failed to load '(?P<model>[^']+)'(?: version (?P<version>\d+))?: (?P<reason>.*?)\"?$"),
    re.compile(r"Poll failed for model directory '(?P<model>[^']+)': (?P<reason>.*?)\"?$"),
)
#: a log that says a listener could not bind (another process took the port first)
PORT_IN_USE = re.compile(r"address already in use|failed to start .*service|Socket '.*' already in use", re.I)


def check_access_options(
    grpc_restricted_protocols: Sequence[str],
    http_restricted_apis: Sequence[str],
    grpc_tls: tuple[_File | None, _File | None, _File | None, bool],
) -> None:
    """Refuse restricted-API specs Triton would not take and an incomplete gRPC TLS setup, one clear line
    each. ``grpc_tls`` is ``(server_cert, server_key, root_cert, mutual)``.

    Raises:
        ServerError: names the option and what it needs.
    """
    for flag, specs in (
        ("grpc_restricted_protocols", grpc_restricted_protocols),
        ("http_restricted_apis", http_restricted_apis),
    ):
        for spec in specs:
            if not RESTRICTED_SPEC.match(spec):
                raise ServerError(
                    f"{flag}: {spec!r} is not '<protocol>[,<protocol>...]:<header>=<value>', "
                    "e.g. 'model-repository,shared-memory:admin-key=s3cret'"
                )
    cert, key, root, mutual = grpc_tls
    tls_files = {"grpc_server_cert": cert, "grpc_server_key": key}
    if any(tls_files.values()) and not all(tls_files.values()):
        raise ServerError("gRPC TLS needs both grpc_server_cert and grpc_server_key")
    if (mutual or root) and not all(tls_files.values()):
        raise ServerError("grpc_root_cert / grpc_mutual_tls need grpc_server_cert and grpc_server_key too")
    if mutual and not root:
        raise ServerError("grpc_mutual_tls needs grpc_root_cert (the CA that signs client certificates)")
    for name, path in {**tls_files, "grpc_root_cert": root}.items():
        if path is not None and not Path(path).is_file():
            raise ServerError(f"{name}: {path} is not a file")


def flag_values(args: Sequence[str], flag: str) -> list[str]:
    """The values given to ``flag`` in ``args`` (``--flag=value`` or ``--flag value``), in order."""
    values: list[str] = []
    for index, arg in enumerate(args):
        if arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
        elif arg == flag and index + 1 < len(args):
            values.append(args[index + 1])
    return values


def http_headers(specs: Sequence[str]) -> dict[str, tuple[str, str]]:
    """{API group: (header, value)} from Triton's ``--http-restricted-api`` specs."""
    headers: dict[str, tuple[str, str]] = {}
    for spec in specs:
        match = RESTRICTED_SPEC.match(spec)
        if match:
            for api in match["protocols"].split(","):
                headers[api] = (match["key"], match["value"])
    return headers


def server_environment(
    install: TritonInstall, python: StubPython | None, backend_path: Sequence[Path]
) -> dict[str, str]:
    """This process's environment, changed so that tritonserver's Python-backend stub runs in ``python``
    (this interpreter when None) and our Python-based backends find ``backend_path``."""
    env = dict(os.environ)
    # The Python-backend stub is an embedded interpreter that takes its sys.path from the `python3`
    # first on PATH (PYTHONPATH is not enough): put this interpreter's bin/ first.
    stub_bin = python.executable.parent if python else Path(sys.executable).parent
    env["PATH"] = os.pathsep.join([str(stub_bin), env.get("PATH", "")])
    # A reduced stub interpreter has only what a user model may use; our Python-based backends (and
    # only they) reach tritonforge and onnxruntime/torch through the folders named here.
    folders = [*([package_path()] if python else []), *backend_path]
    if folders:
        env[BACKEND_PATH_ENV] = os.pathsep.join(map(str, folders))
    libs = [str(d) for d in install.library_dirs if d.is_dir()]
    # The stub links libpython3.X.so.1.0; unless this interpreter's own comes first, the loader may
    # pick another build of the same minor version (e.g. the distro's), whose ABI the stdlib's
    # extension modules (_ssl, ...) of this interpreter don't match.
    own_libpython = python.libdir if python else _shared_libpython_dir()
    if own_libpython is not None:
        libs.insert(0, str(own_libpython))
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    return env


def _shared_libpython_dir() -> Path | None:
    """The folder of the running interpreter's shared libpython, if it was built with one."""
    import sysconfig

    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not (Path(libdir) / soname).exists():
        return None
    return Path(libdir)


def load_failures(log: str) -> list[tuple[str, str]]:
    """``(model, reason)`` for each model ``log`` says failed to load, in order, each once."""
    found: list[tuple[str, str]] = []
    for line in log.splitlines():
        for pattern in _LOAD_FAILURES:
            match = pattern.search(line)
            if match:
                # Triton logs the reason JSON-escaped on one line (a Python traceback included)
                reason = match["reason"].replace('\\"', '"').replace("\\n", "\n").strip()
                item = (match["model"], reason)
                if item not in found:
                    found.append(item)
                break
    return found


def config_json(config: ModelConfig | pb2.ModelConfig | dict[str, Any] | str) -> str:
    """``config`` as the JSON Triton's model-load API takes in its ``config`` parameter."""
    if isinstance(config, str):
        return config
    if isinstance(config, dict):
        return json.dumps(config)
    from google.protobuf import json_format
    from google.protobuf.message import Message

    proto = config if isinstance(config, Message) else config.to_proto()
    return json_format.MessageToJson(proto, preserving_proto_field_name=True)
