"""Run the `tritonforge` command as users run it: a real subprocess, both streams piped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_tritonforge(
    *args: str, timeout: float = 300, cwd: Path | None = None, columns: int | None = 200
) -> subprocess.CompletedProcess[str]:
    """``python -m tritonforge *args`` with only this venv on PATH; ``columns=None``: no COLUMNS (80 wide)."""
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "tritonforge", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )
