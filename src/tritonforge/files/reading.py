"""Regular files only, never more than a stated size: how every file from outside is opened.

A path someone names may be a symlink to ``/dev/zero`` (read until the machine runs out of memory), a FIFO
(an ``open`` or a ``read`` that blocks forever), a folder, a socket, or a regular file far larger than
anything of its kind (a sparse file of a terabyte costs no disk until it is copied). Each helper here
checks the path before it is opened (``stat``), opens it without blocking, checks the open file again
(``fstat``: the path may have changed in between) and reads at most the stated limit, so every such case
is one line at once instead of a hang, an OOM kill or a full disk.

Every helper takes ``what`` (the thing's name in the message: "model file", "SLO file") and ``error``, the
exception to raise (called with the message, e.g. ``ConfigError``): callers keep their own error class.
Each message is one line, ``problem; fix``, also kept apart on the message (a :class:`Reason`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from tritonforge.errors import TritonForgeError

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_LINE_BYTES",
    "MAX_MODEL_BYTES",
    "MAX_ONNX_BYTES",
    "ErrorFactory",
    "Reason",
    "check_regular",
    "copy_file",
    "copy_tree",
    "file_kind",
    "human_size",
    "iter_lines",
    "open_regular",
    "read_bytes",
    "read_text",
]

MAX_DOCUMENT_BYTES = 16 << 20
"""A config.pbtxt, pipeline spec, SLO file, drift profile, manifest, JSON record: real ones are kilobytes."""
MAX_LINE_BYTES = 1 << 20
"""One line of a line-oriented log (the audit log): real lines are a few hundred bytes."""
MAX_ONNX_BYTES = (2 << 30) - 1
"""An ONNX file read whole (its signature): protobuf's own limit; larger models keep weights outside."""
MAX_MODEL_BYTES = 256 << 30
"""A model file copied into a repository (a TensorRT plan, a TorchScript archive, ONNX external data)."""

ErrorFactory = Callable[[str], Exception]


class Reason(str):
    """A one-line message, ``problem; fix``, with its two halves kept as ``problem`` and ``fix``."""

    problem: str
    fix: str

    def __new__(cls, problem: str, fix: str) -> Reason:
        text = super().__new__(cls, f"{problem}; {fix}" if fix else problem)
        text.problem = problem
        text.fix = fix
        return text


def human_size(size: int) -> str:
    """``size`` bytes for a person: ``512 bytes``, ``16 MiB``, ``2.5 GiB``."""
    if size < 1024:
        return f"{size} byte{'' if size == 1 else 's'}"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}".replace(".0 ", " ")
    raise AssertionError("unreachable")  # pragma: no cover


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, for a message: ``a folder``, ``a FIFO (named pipe)``, ``a character device``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _shown(path: str | os.PathLike[str]) -> str:
    """The path as given, and where it leads when that is elsewhere (a symlink to /dev/zero)."""
    text = os.fspath(path)
    with contextlib.suppress(OSError, ValueError):
        if os.path.islink(text):
            return f"{text} (a symlink to {os.path.realpath(text)})"
    return text


def _not_regular(
    path: str | os.PathLike[str], mode: int, what: str, error: ErrorFactory, fix: str | None
) -> Exception:
    return error(
        Reason(
            f"{what} {_shown(path)} is {file_kind(mode)}, not a regular file",
            fix or f"give the {what} itself",
        )
    )


def _too_large(
    path: str | os.PathLike[str], size: int, limit: int, what: str, error: ErrorFactory
) -> Exception:
    return error(
        Reason(
            f"{what} {path} is {human_size(size)}, more than the {human_size(limit)} a {what} may be",
            "check that this is the right file",
        )
    )


def _stat(path: str | os.PathLike[str], what: str, error: ErrorFactory) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise error(Reason(f"{what} {_shown(path)} does not exist", "check the path")) from None
    except PermissionError:
        reason = Reason(f"{what} {path} can't be read: permission denied", "check its permissions")
        raise error(reason) from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        why = getattr(exc, "strerror", None) or str(exc)
        raise error(Reason(f"{what} {path!s} can't be read: {why}", "check the path")) from None


def check_regular(
    path: str | os.PathLike[str],
    *,
    what: str = "file",
    limit: int | None = MAX_DOCUMENT_BYTES,
    error: ErrorFactory = TritonForgeError,
    fix: str | None = None,
) -> os.stat_result:
    """The ``stat`` of ``path`` when it is a regular file of at most ``limit`` bytes (None: no limit).

    For a file handed by path to a library that opens it itself (onnxruntime, ``torch.jit.load``): nothing
    is opened here. Read files through :func:`open_regular` instead where the reading is ours.

    Raises:
        whatever ``error`` makes: the path is missing, unreadable, not a regular file, or too large.
    """
    info = _stat(path, what, error)
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(path, info.st_mode, what, error, fix)
    if limit is not None and info.st_size > limit:
        raise _too_large(path, info.st_size, limit, what, error)
    return info


def open_regular(
    path: str | os.PathLike[str],
    *,
    what: str = "file",
    limit: int | None = MAX_DOCUMENT_BYTES,
    error: ErrorFactory = TritonForgeError,
    fix: str | None = None,
) -> BinaryIO:
    """``path`` opened for reading in binary, when it is a regular file of at most ``limit`` bytes.

    Checked before opening (a device or FIFO is never opened) and again on the open file (the path may
    have been swapped in between); opened non-blocking, so that even then a FIFO can't block.

    Example:
        >>> with open_regular("m.onnx", what="model file", error=RepositoryError) as f:  # doctest: +SKIP
        ...     head = f.read(16)

    Raises:
        whatever ``error`` makes, as :func:`check_regular`.
    """
    check_regular(path, what=what, limit=limit, error=error, fix=fix)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(Reason(f"{what} {path} can't be opened: {exc.strerror}", "check the path")) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode, what, error, fix)
        if limit is not None and info.st_size > limit:
            raise _too_large(path, info.st_size, limit, what, error)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(
    path: str | os.PathLike[str],
    *,
    what: str = "file",
    limit: int = MAX_DOCUMENT_BYTES,
    error: ErrorFactory = TritonForgeError,
    fix: str | None = None,
) -> bytes:
    """The bytes of regular file ``path``, at most ``limit`` of them (see :func:`open_regular`).

    Raises:
        whatever ``error`` makes: as :func:`open_regular`, or the file grew past ``limit`` while read.
    """
    with open_regular(path, what=what, limit=limit, error=error, fix=fix) as stream:
        try:
            data = stream.read(limit + 1)
        except OSError as exc:
            raise error(Reason(f"{what} {path} can't be read: {exc.strerror}", "check the file")) from None
    if len(data) > limit:
        raise _too_large(path, len(data), limit, what, error)
    return data


def read_text(
    path: str | os.PathLike[str],
    *,
    what: str = "file",
    limit: int = MAX_DOCUMENT_BYTES,
    error: ErrorFactory = TritonForgeError,
    fix: str | None = None,
) -> str:
    """The UTF-8 text of regular file ``path`` (at most ``limit`` bytes; see :func:`open_regular`).

    Raises:
        whatever ``error`` makes: as :func:`read_bytes`, or the bytes are not UTF-8.
    """
    data = read_bytes(path, what=what, limit=limit, error=error, fix=fix)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            Reason(
                f"{what} {path} is not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})",
                "save it as UTF-8, or check that this is the right file",
            )
        ) from None


def iter_lines(
    path: str | os.PathLike[str],
    *,
    what: str = "file",
    max_line: int = MAX_LINE_BYTES,
    error: ErrorFactory = TritonForgeError,
    fix: str | None = None,
) -> Iterator[tuple[int, bytes | None]]:
    """``(line number, bytes without the newline)`` for each line of regular file ``path``, streamed.

    A line longer than ``max_line`` bytes comes as ``(number, None)`` (skipped, never held in memory):
    the caller reports it. The file as a whole has no limit (a log grows).

    Raises:
        whatever ``error`` makes: as :func:`open_regular`.
    """
    with open_regular(path, what=what, limit=None, error=error, fix=fix) as stream:
        number = 0
        while True:
            line = stream.readline(max_line + 1)
            if not line:
                return
            number += 1
            if len(line) > max_line and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of the overlong line
                    line = stream.readline(1 << 20)
                yield number, None
                continue
            yield number, line.rstrip(b"\r\n")


def _copy_open(source: BinaryIO, destination: Path, size: int) -> None:
    with open(destination, "wb") as out:
        offset = 0
        try:
            while offset < size:
                sent = os.sendfile(out.fileno(), source.fileno(), offset, min(size - offset, 1 << 30))
                if sent == 0:
                    break
                offset += sent
        except OSError:  # no sendfile between these two: copy in chunks
            source.seek(offset)
            out.seek(offset)
            while offset < size:
                chunk = source.read(min(size - offset, 1 << 20))
                if not chunk:
                    break
                out.write(chunk)
                offset += len(chunk)


def _check_space(destination: Path, size: int, what: str, source: str, error: ErrorFactory) -> None:
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(destination.parent).free
        if size > free:
            raise error(
                Reason(
                    f"{what} {source} is {human_size(size)}, more than the {human_size(free)} free where it "
                    f"is copied ({destination.parent})",
                    "free some space, or check that this is the right file",
                )
            )


def copy_file(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    what: str = "file",
    limit: int | None = MAX_MODEL_BYTES,
    error: ErrorFactory = TritonForgeError,
) -> Path:
    """Copy regular file ``source`` to ``destination`` (contents, then mode and times, like ``copy2``).

    Exactly the bytes the checked file had when opened are copied (a file growing meanwhile can't fill
    the disk), and a file larger than the free space of the destination is refused before writing.

    Raises:
        whatever ``error`` makes: ``source`` is not a regular file, is over ``limit``, or can't fit.
    """
    target = Path(destination)
    with open_regular(source, what=what, limit=limit, error=error) as stream:
        size = os.fstat(stream.fileno()).st_size
        _check_space(target, size, what, os.fspath(source), error)
        _copy_open(stream, target, size)
    with contextlib.suppress(OSError):
        shutil.copystat(source, target)
    return target


def copy_tree(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    what: str = "folder",
    limit: int | None = MAX_MODEL_BYTES,
    error: ErrorFactory = TritonForgeError,
) -> Path:
    """Copy folder ``source`` to ``destination`` (which must not exist), every file through
    :func:`copy_file`: a FIFO, a device or a symlink to one inside the folder is refused by name, a
    symlink to a folder is refused (it may loop), and ``limit`` bounds the whole folder.

    Raises:
        whatever ``error`` makes, naming the file inside the folder.
    """
    root = Path(source)
    total = 0

    def walk(folder: Path) -> Iterator[tuple[Path, os.stat_result]]:
        nonlocal total
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            reason = Reason(f"{what} {folder} can't be listed: {exc.strerror}", "check the path")
            raise error(reason) from None
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink() and os.path.isdir(path):
                raise error(
                    Reason(
                        f"{path} in {what} {root} is a symlink to a folder ({os.path.realpath(path)})",
                        "copy the folder in, or leave the link out",
                    )
                )
            if entry.is_dir(follow_symlinks=False):
                yield path, entry.stat(follow_symlinks=False)
                yield from walk(path)
                continue
            info = check_regular(path, what=f"file in {what} {root}:", limit=None, error=error)
            total += info.st_size
            if limit is not None and total > limit:
                raise _too_large(root, total, limit, what, error)
            yield path, info

    found = list(walk(root))  # every file checked before anything is written
    target = Path(destination)
    _check_space(target, total, what, os.fspath(root), error)
    target.mkdir(parents=True)
    for path, info in found:
        out = target / path.relative_to(root)
        if stat.S_ISDIR(info.st_mode):
            out.mkdir(parents=True, exist_ok=True)
        else:
            copy_file(path, out, what=f"file in {what} {root}:", limit=limit, error=error)
    with contextlib.suppress(OSError):
        shutil.copystat(root, target)
    return target
