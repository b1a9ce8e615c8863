"""Nothing of a server outlives its owner: the guards that stop it and remove what it leaves behind.

Three of them, from the gentlest to the last resort. SIGTERM is made a normal exit, so that ``with``
blocks, ``finally`` and atexit stop the servers (:func:`exit_cleanly_on_sigterm`). A watchdog process ends
the server's process group when its owner dies, even by SIGKILL (:class:`Watchdog` is the owner's side;
the process itself is ``_watchdog.py``, standard library only). And :func:`sweep_leftovers`, run by the
next start, removes what a whole killed tree left (nothing of it ran to clean up): shared-memory regions,
temporary logs and the temporary repositories a program served beside its own (``serve``'s cache).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tritonforge.errors import ServerError

__all__ = ["LOG_PREFIX", "OWNED_REPO_PREFIX", "Watchdog", "exit_cleanly_on_sigterm", "sweep_leftovers"]

#: the start of a temporary server log's name; the owner's pid follows (sweep_leftovers reads it)
LOG_PREFIX = "tritonforge-server-"
# tfg_<owner pid>_<hex>_... (this version) or tfg_<hex>_... (before the pid was in the name)
_REGION = re.compile(r"^tfg_(?:(?P<pid>\d+)_)?[0-9a-f]{10}_")
_LOG = re.compile(rf"^{LOG_PREFIX}(?P<pid>\d+)-[^/]*\.log$")
#: the start of a temporary repository's folder name a program serves beside its own (the owner's pid and
#: "-" follow): the folder goes with the program, or at the next start once the program is dead
OWNED_REPO_PREFIX = "tritonforge-repo-"
_OWNED_REPO = re.compile(rf"^{OWNED_REPO_PREFIX}(?P<pid>\d+)-[^/]+$")
# a region named without its owner's pid is taken only once no process maps it and it is this old
_UNOWNED_AGE_S = 120.0


class Watchdog:
    """A small process that ends the server when its owner (this process) ends without stopping it.

    It reads a pipe whose only write end this process holds. The kernel closes that end whatever ends the
    owner, SIGKILL included, so the watchdog sees end-of-file and sweeps what the owner would have: the
    server's process group (the server and its Python-backend stubs), the shared-memory regions with the
    server's prefix, the temporary log, and an empty ``/tmp/python_env_*`` the Python backend made for
    the server. A clean stop says ``done`` first and the watchdog exits without touching anything.
    Chosen over ``prctl(PR_SET_PDEATHSIG)`` (``preexec_fn`` is unsafe with threads, and the signal follows
    the *thread* that forked, not the process) and over ``setpriv --pdeathsig`` (it kills the server but
    not its stubs' group or its shared memory, and it is not on every system).
    """

    SCRIPT = Path(__file__).with_name("_watchdog.py")

    def __init__(self, process: subprocess.Popen[bytes], pipe: int) -> None:
        self._process = process
        self._pipe = pipe

    @classmethod
    def start(cls, shm_prefix: str, temp_log: Path | None) -> Watchdog:
        read_end, write_end = os.pipe()  # both non-inheritable: no child of ours holds the write end
        try:
            args = [sys.executable, "-I", str(cls.SCRIPT), shm_prefix, str(temp_log or "")]
            process = subprocess.Popen(
                args,
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C to the owner's terminal must not end it first
            )
        except OSError as exc:
            os.close(write_end)
            raise ServerError(f"could not start the server's watchdog: {exc}") from exc
        finally:
            os.close(read_end)
        return cls(process, write_end)

    def watch(self, pgid: int) -> None:
        self._send(f"pgid {pgid} {time.time():.3f}\n")

    def ready(self) -> None:
        self._send(f"ready {time.time():.3f}\n")

    def release(self) -> None:
        """The owner stopped the server itself: the watchdog exits without doing anything."""
        self._send("done\n")
        with contextlib.suppress(OSError):
            os.close(self._pipe)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(timeout=5)

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._pipe, line.encode())


def exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM a normal exit (``SystemExit``) when nothing else handles it, so ``with`` blocks,
    ``finally`` and atexit stop the servers. By default SIGTERM ends Python on the spot, and the server,
    in its own process group, would outlive it with its log, temp files and shared memory."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)


def _raise_exit(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once, as before
    raise SystemExit(128 + signum)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


def _mapped_regions() -> set[str]:
    """Names of the /dev/shm files some process maps right now (read from every /proc/<pid>/maps)."""
    mapped: set[str] = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    if "/dev/shm/" in line:
                        mapped.add(line.rsplit("/dev/shm/", 1)[1].split(" (deleted)")[0].strip())
        except OSError:
            continue
    return mapped


def sweep_leftovers(shm_dir: str = "/dev/shm", tmp_dir: str | None = None) -> list[str]:
    """Remove what servers started here left behind when their whole process tree was killed (an OOM
    kill, ``kill -9`` of a process group: nothing of theirs ran to clean up): their Python backend's
    shared-memory regions, their temporary logs, and the temporary repositories their programs served
    beside their own (:data:`OWNED_REPO_PREFIX`: ``serve``'s cache). Returns the paths removed.

    Never a live server's: a region goes only when the program that started its server is gone *and*
    no process maps it (a stub that outlived its server still does); a region named before owners were
    recorded goes only when no process maps it and it is older than two minutes. Regions of servers
    not started by tritonforge (other prefixes) are never touched.
    """
    removed: list[str] = []
    now = time.time()
    candidates = []
    with contextlib.suppress(OSError):
        for name in os.listdir(shm_dir):
            match = _REGION.match(name)
            if match is None:
                continue
            pid = match.group("pid")
            if pid is not None and _pid_alive(int(pid)):
                continue
            candidates.append((name, pid))
    if candidates:
        mapped = _mapped_regions()
        for name, pid in candidates:
            path = os.path.join(shm_dir, name)
            try:
                if name in mapped or (pid is None and now - os.stat(path).st_ctime < _UNOWNED_AGE_S):
                    continue
                os.unlink(path)
                removed.append(path)
            except OSError:
                continue
    folder = tmp_dir or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            match = _LOG.match(name)
            if match is not None and not _pid_alive(int(match.group("pid"))):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
            match = _OWNED_REPO.match(name)
            path = os.path.join(folder, name)
            if match is not None and not _pid_alive(int(match.group("pid"))) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed
