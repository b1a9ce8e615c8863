"""Run the `tritonforge` command as users run it: a real subprocess, both streams piped."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def cli_env(columns: int | None = 200) -> dict[str, str]:
    """Only this venv and the system on PATH; ``COLUMNS`` when given (``None``: rich's 80 when piped)."""
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return env


def run_tritonforge(
    *args: str, timeout: float = 300, cwd: Path | None = None, columns: int | None = 200
) -> subprocess.CompletedProcess[str]:
    """``python -m tritonforge *args`` with only this venv on PATH; ``columns=None``: no COLUMNS (80 wide)."""
    return subprocess.run(
        [sys.executable, "-m", "tritonforge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=cli_env(columns),
    )


@contextlib.contextmanager
def tritonforge_process(*args: str, columns: int | None = 200) -> Iterator[subprocess.Popen[str]]:
    """``python -m tritonforge *args`` running, stdout and stderr merged into one text pipe; killed (if
    still running) and its pipe closed at the end."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tritonforge", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=cli_env(columns),
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
