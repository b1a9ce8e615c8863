"""The package works when installed, not only from a checkout: build the wheel, install it with the
``examples`` extra into a fresh venv (no system site-packages), and run ``tritonforge demo`` from an empty
folder. Dependencies come from pip's configured local sources and cache; nothing of the checkout is on
the path of the installed program."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def run(command: list[str], cwd: Path, timeout: int, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, (command, done.stdout[-4000:], done.stderr[-4000:])
    return done.stdout


@pytest.mark.timeout(2400)
def test_the_installed_wheel_runs_the_demo_from_an_empty_folder(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(ROOT),
        ],
        tmp_path,
        600,
    )
    (wheel,) = dist.glob("tritonforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in (
        "tritonforge/examples/build_digits.py",
        "tritonforge/examples/ensembles/digits_vote.yaml",
        "tritonforge/examples/ensembles/text_embedding.yaml",
        "tritonforge/ensemble/models/passthrough.py",
    ):
        assert shipped in names
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, 300)
    run([str(venv / "bin" / "pip"), "install", "-q", f"{wheel}[examples]"], tmp_path, 1800)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "COLUMNS": "200",
        "HF_HUB_OFFLINE": "1",
        "TRITONFORGE_DEBUG": "1",  # a failure shows the whole error (a server log in full)
    }
    # --no-frameworks: that last part reads nothing shipped; the build and the pipelines are the point
    command = [str(venv / "bin" / "tritonforge"), "demo", "--repo", "model_repository", "--no-frameworks"]
    out = run(command, empty, 1800, env)
    assert "majority vote" in out and "digits_routed" in out and "text_embedding" in out
    assert (empty / "model_repository" / "digits_vote" / "config.pbtxt").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["model_repository"]
