"""Where the ``tritonserver`` binary and its backends come from, and the backend folder we run it with.

Two kinds of install:

- a full Triton install (``/opt/tritonserver`` in NVIDIA's container, or a binary given by path): its own
  C++ backends serve ONNX and TorchScript models; we use its backend folder as it is;
- the ``nvidia-pytriton`` wheel, which carries only the binary, its libraries and the Python backend. Here
  we assemble a backend folder in a cache dir: the Python backend, the stub built for the running Python,
  and our Python-based ``onnxruntime`` and ``pytorch`` backends, so the same repository runs unchanged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tritonforge.errors import ServerError

__all__ = ["TritonInstall", "backend_directory", "find_tritonserver"]

SYSTEM_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
PYTHON_BASED_BACKENDS = ("onnxruntime", "pytorch")


@dataclass(frozen=True)
class TritonInstall:
    """A runnable ``tritonserver`` and what it needs around it."""

    binary: Path
    library_dirs: tuple[Path, ...]
    #: the install's own backend folder (full installs), or None for the wheel
    backend_dir: Path | None
    #: the wheel's Python backend and stubs, from which we assemble a backend folder
    wheel_root: Path | None = None

    @property
    def is_full(self) -> bool:
        return self.backend_dir is not None


def find_tritonserver(binary: str | os.PathLike[str] | None = None) -> TritonInstall:
    """The ``tritonserver`` to run: ``binary`` if given, else ``$TRITONFORGE_TRITONSERVER``, else
    ``/opt/tritonserver`` (NVIDIA's container), else the one in the ``nvidia-pytriton`` wheel.

    Raises:
        ServerError: the binary given does not exist, or none can be found.
    """
    chosen = binary or os.environ.get("TRITONFORGE_TRITONSERVER")
    if chosen:
        path = Path(chosen).expanduser().resolve()
        if not path.is_file() or not os.access(path, os.X_OK):
            raise ServerError(f"tritonserver binary {path} does not exist or is not executable")
        wheel = _wheel_root()
        if wheel is not None and path == (wheel / "tritonserver" / "bin" / "tritonserver").resolve():
            return _wheel_install(wheel)
        root = path.parent.parent
        backends = root / "backends"
        return TritonInstall(binary=path, library_dirs=(root / "lib",), backend_dir=backends)
    if SYSTEM_TRITONSERVER.is_file():
        root = SYSTEM_TRITONSERVER.parent.parent
        return TritonInstall(SYSTEM_TRITONSERVER, (root / "lib",), root / "backends")
    wheel = _wheel_root()
    if wheel is None:
        raise ServerError(
            "no tritonserver found: install the wheel that carries it (pip install nvidia-pytriton==0.7.0), "
            "set TRITONFORGE_TRITONSERVER, or run inside NVIDIA's Triton container"
        )
    return _wheel_install(wheel)


def _wheel_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent
    return root if (root / "tritonserver" / "bin" / "tritonserver").is_file() else None


def _wheel_install(root: Path) -> TritonInstall:
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        binary=root / "tritonserver" / "bin" / "tritonserver",
        library_dirs=(libs,),
        backend_dir=None,
        wheel_root=root,
    )


def backend_directory(install: TritonInstall, cache_dir: Path | None = None) -> Path:
    """The ``--backend-directory`` for ``install``, assembling it in the cache for the wheel.

    The folder's name is a hash of everything in it, so a new wheel, Python or backend source gets a new
    folder, and a folder once complete is never modified (it is built beside and renamed into place).

    Raises:
        ServerError: the wheel has no Python-backend stub for the running Python.
    """
    if install.backend_dir is not None:
        return install.backend_dir
    assert install.wheel_root is not None
    python_backend = install.wheel_root / "tritonserver" / "backends" / "python"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = (
        install.wheel_root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    )
    if not stub.is_file():
        raise ServerError(
            f"the nvidia-pytriton wheel has no Python-backend stub for Python {version} "
            f"(looked for {stub}); use Python 3.8-3.13"
        )
    sources = {name: _backend_source(name) for name in PYTHON_BASED_BACKENDS}
    digest = hashlib.sha256()
    for path in [*sorted(python_backend.iterdir()), stub]:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(str(path.stat().st_size).encode())
            digest.update(str(path.stat().st_mtime_ns).encode())
    for name, text in sorted(sources.items()):
        digest.update(name.encode() + text.encode())
    base = cache_dir or _cache_root()
    target = base / f"backends-py{version}-{digest.hexdigest()[:16]}"
    if (target / ".complete").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=base))
    try:
        shutil.copytree(python_backend, staging / "python", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
        for name, text in sources.items():
            (staging / name).mkdir()
            (staging / name / "model.py").write_text(text)
        (staging / ".complete").write_text("")
        try:
            staging.rename(target)
        except OSError:
            if not (target / ".complete").exists():  # lost a race to another process: theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _backend_source(name: str) -> str:
    return (
        resources.files("tritonforge.server")
        .joinpath("backends")
        .joinpath(name)
        .joinpath("model.py")
        .read_text()
    )


def _cache_root() -> Path:
    base = os.environ.get("TRITONFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tritonforge"
    )
    return Path(base)
