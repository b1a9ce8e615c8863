"""The embedded Triton server and the Python-based backends it ships."""

from tritonforge.server.embedded import DEFAULT_STARTUP_TIMEOUT_S, EmbeddedServer, free_port
from tritonforge.server.install import TritonInstall, backend_directory, find_tritonserver

__all__ = [
    "DEFAULT_STARTUP_TIMEOUT_S",
    "EmbeddedServer",
    "TritonInstall",
    "backend_directory",
    "find_tritonserver",
    "free_port",
]
