"""Style is enforced by the suite, not by memory: ruff (lint + format) and mypy over the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_DIRS = ["src", "tests", "benchmarks", "tools", "loadtests"]


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert found, f"{name} is not installed: `pip install -e '.[dev]'` brings it"
    return found


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_lint_is_clean() -> None:
    done = _run(_tool("ruff"), "check", *PYTHON_DIRS)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_ruff_format_is_clean() -> None:
    done = _run(_tool("ruff"), "format", "--check", *PYTHON_DIRS)
    assert done.returncode == 0, "run `ruff format`:\n" + done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.slow
def test_mypy_is_clean_on_the_package() -> None:
    done = _run(_tool("mypy"), "src")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
