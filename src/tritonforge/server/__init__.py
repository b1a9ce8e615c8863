"""The embedded Triton server and the Python-based backends it ships."""

from tritonforge.server.embedded import DEFAULT_STARTUP_TIMEOUT_S, EmbeddedServer, free_port
from tritonforge.server.install import TritonInstall, backend_directory, find_tritonserver

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


def __getattr__(name: str) -> object:
    # The live check pulls in the repository layer; load it on first use so that `import tritonforge`
    # (which Triton's backend stub does) stays light.
    if name in ("LiveResult", "check_live"):
        from tritonforge.server import live

        return getattr(live, name)
    raise AttributeError(f"module 'tritonforge.server' has no attribute {name!r}")
