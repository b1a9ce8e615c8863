"""Every verb's ``--help`` works, at a terminal and in a pipe, and a pipe gets every option name whole.

Run as users run it (``python -m tritonforge``): piped with ``COLUMNS=60`` as in a narrow CI log, and on a
pseudo-terminal 60 columns wide (where help is drawn in rich's boxes, and markup in a help text would
crash it).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from cli_runner import cli_env, run_tritonforge
from test_cli_vocabulary import commands

GROUPS = sorted({" ".join(path.split()[:i]) for path in commands() for i in range(len(path.split()))})
VERBS = sorted(commands())
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _whole(option: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text) is not None


def _on_a_terminal(args: list[str], columns: int = 60) -> tuple[int, str]:
    """``python -m tritonforge ARGS`` with its three streams on a pseudo-terminal ``columns`` wide."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "tritonforge", *args],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env=cli_env(columns),
        close_fds=True,
    )
    os.close(follower)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        code = process.wait(timeout=60)
    return code, ANSI.sub("", b"".join(chunks).decode(errors="replace"))


@pytest.mark.parametrize("path", VERBS)
def test_help_piped_at_60_columns_shows_every_option_name_whole(path: str) -> None:
    done = run_tritonforge(*path.split(), "--help", timeout=60, columns=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "…" not in done.stdout and "Traceback" not in done.stdout
    command = commands()[path]
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        for option in (*param.opts, *param.secondary_opts):
            if option.startswith("-"):
                assert _whole(option, done.stdout), f"{path} --help in a pipe lacks a whole {option}"
    # each option's line holds its name and the start of its help (nothing folded away from its name)
    for param in command.params:
        if param.param_type_name == "option" and param.help and not getattr(param, "hidden", False):
            first_words = " ".join(param.help.split()[:3])
            assert first_words in done.stdout, f"{path}: the help of {param.opts[0]} is broken up"


@pytest.mark.parametrize("path", GROUPS)
def test_group_help_piped_names_each_command_whole(path: str) -> None:
    done = run_tritonforge(*path.split(), "--help", timeout=60, columns=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    below = {verb.split()[len(path.split())] for verb in VERBS if verb.startswith(path)}
    listed = done.stdout.split("Commands:", 1)[1]
    for name in below:
        assert re.search(rf"^  {re.escape(name)}\s", listed, flags=re.M), f"{name} missing from {path} --help"
    assert "…" not in done.stdout and "..." not in listed


AT_A_TERMINAL = VERBS


@pytest.mark.parametrize("path", AT_A_TERMINAL)
def test_help_at_a_60_column_terminal_draws_without_crashing(path: str) -> None:
    code, shown = _on_a_terminal([*path.split(), "--help"])
    assert code == 0, shown
    assert "Usage: tritonforge" in shown and "Traceback" not in shown and "error:" not in shown
