"""The embedded Triton server and the Python-based backends it ships."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tritonforge.server.embedded import DEFAULT_STARTUP_TIMEOUT_S, EmbeddedServer, free_port
    from tritonforge.server.install import TritonInstall, backend_directory, find_tritonserver
    from tritonforge.server.live import LiveResult, check_live

__all__ = [
    "DEFAULT_STARTUP_TIMEOUT_S",
    "EmbeddedServer",
    "LiveResult",
    "TritonInstall",
    "backend_directory",
    "check_live",
    "find_tritonserver",
    "free_port",
]

# Every name loads on first use: Triton's backend stubs import this package (for ``runtime``) once per
# model instance, and must not pay for the server's launcher (subprocess, urllib, the config layer) or the
# live check (the repository layer).
_MODULE_OF = {
    "DEFAULT_STARTUP_TIMEOUT_S": "embedded",
    "EmbeddedServer": "embedded",
    "free_port": "embedded",
    "TritonInstall": "install",
    "backend_directory": "install",
    "find_tritonserver": "install",
    "LiveResult": "live",
    "check_live": "live",
}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'tritonforge.server' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tritonforge.server.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))
