"""The embedded server's watchdog: ends the server when the program that started it is gone.

Run by ``EmbeddedServer`` as ``python -I _watchdog.py SHM_PREFIX TEMP_LOG`` with its stdin the read end of
a pipe whose only write end the owner holds. Lines on the pipe:

    pgid <n> <time>   the server's process group, and when it was launched
    ready <time>      the server became ready
    done              the owner stopped the server itself: exit and touch nothing

End-of-file without ``done`` means the owner died (SIGKILL included: the kernel closes its pipe). Then the
server's process group gets SIGTERM, and SIGKILL after a grace period; its shared-memory regions, its
temporary log and the empty ``/tmp/python_env_*`` folder the Python backend made while it started are
removed. Standard library only, so that it starts fast and depends on nothing that can be half-installed;
``EmbeddedServer`` uses its :func:`wait_group_gone` and :func:`remove_env_dirs` too.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import sys
import time

GRACE_S = 10.0


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid`` (Linux /proc).

    Zombies don't count: orphaned stubs are reparented to PID 1, and a PID 1 that never reaps them would
    otherwise make every wait for the group wait out its timeout.
    """
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone while we looked
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_group_gone(pgid: int, timeout_s: float, step_s: float = 0.05) -> None:
    """Wait until process group ``pgid`` is gone (:func:`group_alive`), at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(step_s)


def _end_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    wait_group_gone(pgid, GRACE_S, step_s=0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    wait_group_gone(pgid, GRACE_S)


def remove_env_dirs(launched: float, ready: float | None) -> None:
    """Remove the empty /tmp/python_env_* made between the server's launch and its readiness.

    The Python backend makes it (mkdtemp in /tmp, no way to name it) when it starts, and removes it on a
    clean exit only. Only empty folders made in that window are taken, so that another server's is safe
    unless it started in the same seconds and has nothing in it yet.
    """
    until = (ready if ready is not None else time.time()) + 1.0
    for folder in glob.glob("/tmp/python_env_*"):
        try:
            made = os.stat(folder).st_ctime
            if launched - 1.0 <= made <= until and not os.listdir(folder):
                os.rmdir(folder)
        except OSError:
            continue


def main() -> None:
    shm_prefix, temp_log = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pgid: int | None = None
    launched = time.time()
    ready: float | None = None
    for raw in sys.stdin.buffer:
        words = raw.decode(errors="replace").split()
        if not words:
            continue
        if words[0] == "done":
            return
        if words[0] == "pgid" and len(words) >= 3:
            pgid, launched = int(words[1]), float(words[2])
        elif words[0] == "ready" and len(words) >= 2:
            ready = float(words[1])
    # End of file without "done": the owner is gone.
    if pgid is not None:
        _end_group(pgid)
    for region in glob.glob(f"/dev/shm/{shm_prefix}*"):
        with contextlib.suppress(OSError):
            os.unlink(region)
    if temp_log:
        with contextlib.suppress(OSError):
            os.unlink(temp_log)
    if pgid is not None:
        remove_env_dirs(launched, ready)


if __name__ == "__main__":
    main()
