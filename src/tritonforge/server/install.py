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
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tritonforge.errors import ServerError

__all__ = [
    "BACKEND_PATH_ENV",
    "StubPython",
    "TritonInstall",
    "auto_complete_flags",
    "backend_directory",
    "bls_pool_flags",
    "find_tritonserver",
    "needs_auto_complete",
    "package_path",
    "stub_python",
]

SYSTEM_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
PYTHON_BASED_BACKENDS = ("onnxruntime", "pytorch")
# config.pbtxt lines: a platform served by our Python-based backends or by Triton; any other backend
_FRAMEWORK_CONFIG = re.compile(
    r"""^\s*(platform\s*:\s*["'](onnxruntime_onnx|pytorch_libtorch|ensemble)["']"""
    r"""|backend\s*:\s*["'](onnxruntime|pytorch)["'])""",
    re.M,
)
_OTHER_BACKEND = re.compile(r"""^\s*backend\s*:\s*["'](?!(onnxruntime|pytorch)["'])""", re.M)
#: folders our Python-based backends (and only they) append to ``sys.path`` (os.pathsep-separated): how
#: they reach onnxruntime/torch and tritonforge when the stubs run in a reduced interpreter
BACKEND_PATH_ENV = "TRITONFORGE_BACKEND_PATH"


@dataclass(frozen=True)
class StubPython:
    """The interpreter whose environment the Python-backend stubs run in (a venv's ``python`` will do)."""

    #: as given, not resolved: a venv's ``bin/`` must come first on PATH, not its base interpreter's
    executable: Path
    version: str
    #: the folder of its shared libpython (the stub links it), or None when it has none
    libdir: Path | None


def stub_python(executable: str | os.PathLike[str]) -> StubPython:
    """Read what the stubs need to know of ``executable``: its version and shared libpython.

    Raises:
        ServerError: it can't be run, or it has no shared libpython (the stub can't embed it).
    """
    import subprocess

    path = Path(executable).expanduser().absolute()
    probe = (
        "import sys, sysconfig, os; v = sysconfig.get_config_var; "
        "print(f'{sys.version_info[0]}.{sys.version_info[1]}'); "
        "print(os.path.join(v('LIBDIR') or '', v('INSTSONAME') or '') if v('Py_ENABLE_SHARED') else '')"
    )
    try:
        done = subprocess.run([str(path), "-I", "-c", probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerError(f"can't run the stub's Python {path}: {exc}; give a python executable") from None
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != 2:
        raise ServerError(f"can't run the stub's Python {path}: {done.stderr.strip()[-300:]}")
    version, libpython = lines
    if not libpython or not Path(libpython).exists():
        raise ServerError(
            f"Python {path} has no shared libpython, which the Python backend's stub links; use a Python "
            "built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)"
        )
    return StubPython(path, version, Path(libpython).parent)


def package_path(cache_dir: Path | None = None) -> Path:
    """A folder holding only a link to this tritonforge package: what the Python-based backends add to a
    reduced interpreter's ``sys.path`` to import it, and nothing else of this environment."""
    package = Path(__file__).resolve().parent.parent
    base = (cache_dir or _cache_root()) / f"package-{hashlib.sha256(str(package).encode()).hexdigest()[:16]}"
    link = base / "tritonforge"
    if not link.is_symlink():
        base.mkdir(parents=True, exist_ok=True)
        staged = base / f".link-{os.getpid()}"
        staged.unlink(missing_ok=True)
        staged.symlink_to(package, target_is_directory=True)
        staged.replace(link)
    return base


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


def backend_directory(
    install: TritonInstall, cache_dir: Path | None = None, python_version: str | None = None
) -> Path:
    """The ``--backend-directory`` for ``install``, assembling it in the cache for the wheel, with the stub
    for ``python_version`` ("3.10"; default: the running Python's).

    The folder's name is a hash of everything in it, so a new wheel, Python or backend source gets a new
    folder, and a folder once complete is never modified (it is built beside and renamed into place).

    Raises:
        ServerError: the wheel has no Python-backend stub for the running Python.
    """
    if install.backend_dir is not None:
        return install.backend_dir
    assert install.wheel_root is not None
    python_backend = install.wheel_root / "tritonserver" / "backends" / "python"
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
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


def needs_auto_complete(repositories: Sequence[Path | str], model_control: str) -> bool:
    """Whether Triton must auto-complete the model configs of ``repositories`` (a wheel-built server).

    Auto-completion costs every Python-backend model a second stub process at load (Triton starts one only
    to call ``auto_complete_config``, then sleeps a second before ending it): about 1 s and a stub's
    imports per model. Our Python-based backends complete nothing, so it is needed only when a model
    relies on it: a model folder without ``config.pbtxt``, or a Python file in a version folder that
    defines ``auto_complete_config``. Remote repositories can't be read here and a polled repository
    changes while the server runs: both keep it on.
    """
    models = _local_models(repositories)
    if model_control == "poll" or models is None:
        return True
    for model in models:
        if not (model / "config.pbtxt").is_file():
            return True
        for source in model.glob("*/*.py"):
            try:
                if "auto_complete_config" in source.read_text(errors="replace"):
                    return True
            except OSError:
                return True
    return False


def auto_complete_flags(
    install: TritonInstall,
    repositories: Sequence[Path | str],
    model_control: str,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``["--disable-auto-complete-config"]`` for the wheel's server when no model needs auto-completion
    (:func:`needs_auto_complete`), else none. A full install's C++ backends complete ONNX and TorchScript
    configs, so it keeps it; and ``extra_args`` that decide it themselves (``--strict-model-config=false``
    for a model added later that needs it) are left to decide (Triton does not let a later flag undo it)."""
    decided = any(
        a.startswith(("--strict-model-config", "--disable-auto-complete-config")) for a in extra_args
    )
    if decided or install.is_full or needs_auto_complete(repositories, model_control):
        return []
    return ["--disable-auto-complete-config"]


def bls_pool_flags(
    install: TritonInstall,
    repositories: Sequence[Path | str],
    model_control: str,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``["--backend-config=python,thread-pool-size=1"]`` for the wheel's server when it can only ever serve
    ONNX, TorchScript and ensemble models, else none.

    Triton's Python backend keeps, in the server, a pool of 32 threads per model instance (default
    ``thread-pool-size``) for its Python models' BLS calls and decoupled responses; our Python-based
    backends make neither, so for them the pool is 31 idle threads and ~0.3 MiB a model. The setting is
    one for every Python-backend model, and a BLS call holds a thread until its answer comes, so it is
    lowered only where no Python model can be loaded: ``model_control="none"`` (no load API), local
    repositories, and every model a config of ``onnxruntime_onnx``, ``pytorch_libtorch`` or ``ensemble``
    without Python files. ``extra_args`` naming ``thread-pool-size`` decide it themselves.
    """
    decided = any("thread-pool-size" in a for a in extra_args)
    models = _local_models(repositories)
    if decided or install.is_full or model_control != "none" or models is None:
        return []
    for model in models:
        try:
            config = (model / "config.pbtxt").read_text(errors="replace")
        except OSError:
            return []
        if not _FRAMEWORK_CONFIG.search(config) or _OTHER_BACKEND.search(config):
            return []
        if any(model.glob("*/*.py")):
            return []
    return ["--backend-config=python,thread-pool-size=1"]


def _local_models(repositories: Sequence[Path | str]) -> list[Path] | None:
    """The model folders of ``repositories``, or None when one is remote (Triton's to read, not ours)."""
    models: list[Path] = []
    for repository in repositories:
        if not isinstance(repository, Path):
            return None
        models += [
            m
            for m in (repository.iterdir() if repository.is_dir() else ())
            if m.is_dir() and m.name[:1] != "."
        ]
    return models


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
