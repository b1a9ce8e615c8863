"""Interpreters reduced to what NVIDIA's Triton image has in its Python backend, for the stubs to run in.

NVIDIA's ``tritonserver:24.xx-py3`` runs Python models in Python 3.10 (24.12 on: 3.12) with the standard
library and numpy. :func:`reduced_python` makes a clean venv of that version (pyenv's, when it has one)
holding ``numpy<2`` and the requirement lines given (what ``python_requirements`` declares), nothing else.
The stand-ins for NVIDIA's C++ backends (our Python-based onnxruntime/pytorch backends) run in the same
stub interpreter but reach onnxruntime through :func:`backend_site`, a second venv of that version that
only they add to ``sys.path``. Both are cached (keyed by version and requirements), built once: pip
fetches wheels the first time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from filelock import FileLock

#: NVIDIA's 24.10 image (the release the embedded Triton 2.51 matches) has Python 3.10
TARGET_VERSION = "3.10"


def target_interpreter(version: str = TARGET_VERSION) -> tuple[Path, str]:
    """A base interpreter of ``version`` (pyenv's, else on PATH) and a note; the running one if none."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    found = sorted(pyenv.glob(f"{version}.*/bin/python{version}")) if pyenv.is_dir() else []
    if found:
        return found[-1], f"Python {version} (pyenv, {found[-1]})"
    on_path = shutil.which(f"python{version}")
    if on_path:
        return Path(on_path), f"Python {version} ({on_path})"
    running = Path(getattr(sys, "_base_executable", sys.executable))
    return running, f"no Python {version} here: the running {sys.version.split()[0]} instead"


def _venv(kind: str, base: Path, packages: Sequence[str]) -> Path:
    """A cached venv of ``base`` holding ``packages``; returns its ``bin/python``."""
    cache = Path(os.environ.get("TRITONFORGE_CACHE") or Path.home() / ".cache" / "tritonforge")
    key = hashlib.sha256("\n".join([str(base), *sorted(packages)]).encode()).hexdigest()[:16]
    target = cache / f"{kind}-{key}"
    if (target / ".complete").exists():
        return target / "bin" / "python"
    cache.mkdir(parents=True, exist_ok=True)
    # one builder at a time (parallel workers, other sessions): the others wait, then find it complete
    with FileLock(str(cache / f"{kind}-{key}.lock")):
        if not (target / ".complete").exists():
            _build_venv(target, base, packages)
    return target / "bin" / "python"


def _build_venv(target: Path, base: Path, packages: Sequence[str]) -> None:
    shutil.rmtree(target, ignore_errors=True)  # a build cut short: made again, never used half-made
    subprocess.run([str(base), "-m", "venv", str(target)], check=True, capture_output=True, timeout=300)
    done = subprocess.run(
        [
            str(target / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            *packages,
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if done.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise AssertionError(f"pip install {packages} failed: {done.stderr[-2000:]}")
    (target / ".complete").write_text("")


def reduced_python(requirements: Sequence[str] = (), version: str = TARGET_VERSION) -> Path:
    """A venv's python with the standard library, ``numpy<2`` and ``requirements`` only."""
    base, _ = target_interpreter(version)
    lines = [r.split("#", 1)[0].strip() for r in requirements]
    return _venv("reduced", base, ["numpy<2", *[line for line in lines if line]])


def backend_site(version: str = TARGET_VERSION, torch: bool = False) -> Path:
    """site-packages of a venv holding onnxruntime (and torch when asked): for the stand-in backends only."""
    base, _ = target_interpreter(version)
    python = _venv("reduced-site", base, ["numpy<2", "onnxruntime", *(["torch"] if torch else [])])
    found = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(found.stdout.strip())
