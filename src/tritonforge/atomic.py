"""Atomic file writes: the one way tritonforge replaces a file, whole or not at all.

A writer fills a temporary file in the target's own folder (``.<name>.tmp-<random>``: hidden, and on the same
file system so the rename is atomic), flushes it to disk (``fsync``), renames it over the target and then
flushes the folder, so that after a crash the target holds the old content or the new one, never a part,
and a reader polling it (Triton's repository poll, a rollout controller, a resumed batch run) never sees
half a file. On any error the temporary file is removed and the target is left as it was.

:func:`write_atomic` writes bytes or text; :func:`atomic_path` hands a temporary path to a writer that wants
one (Parquet, Prometheus' textfile writer, ``json.dump`` into a handle). The file ends with mode 0644.
Below every other module (it imports nothing of ours), so each layer can use it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TEMP_MARK", "atomic_path", "fsync_folder", "write_atomic"]

#: the part of a temporary file's name after the target's: ``.<target name>.tmp-<random>``
TEMP_MARK = ".tmp-"


def fsync_folder(folder: str | os.PathLike[str]) -> None:
    """Flush ``folder``'s entries (a rename in it) to disk; a file system that can't is let be."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; when the block ends without error it is flushed to disk
    and renamed over ``path`` (then the folder is flushed). The folder is created if missing.

    Example:
        >>> with atomic_path("out/table.parquet") as tmp:  # doctest: +SKIP
        ...     pq.write_table(table, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}{TEMP_MARK}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes | str, *, mode: int = 0o644) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8) whole or not at all; returns the path.

    Raises:
        OSError: the folder can't be created or written; ``path`` is then unchanged.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(payload)
    return Path(path)
