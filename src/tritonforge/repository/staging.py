"""Staging of repository writes: a hidden folder beside the repository, and the atomic swap into place.

A write is built in a folder made by ``make_staging_dir`` (same file system as the repository, never inside
it, where Triton would try to load it as a model; ``$TRITONFORGE_STAGING_DIR`` overrides the place) and
moved in with a rename; ``_replace_dir`` swaps a whole version folder with ``renameat2(RENAME_EXCHANGE)``
where Linux has it. ``staging_leftovers`` finds the folders an interrupted write left behind.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tritonforge.errors import RepositoryError

__all__ = ["STAGING_ENV", "STAGING_PREFIX", "make_staging_dir", "staging_leftovers"]

#: staging folders (beside the repository) start with this
STAGING_PREFIX = ".tritonforge-staging-"
#: a folder to stage in instead of the repository's parent (same file system, outside the repository)
STAGING_ENV = "TRITONFORGE_STAGING_DIR"


def staging_leftovers(repo: str | os.PathLike[str]) -> tuple[list[Path], list[Path]]:
    """Folders left by interrupted writes: (beside the repository: harmless, inside it: break Triton)."""
    root = Path(repo)
    inside = sorted(root.glob(f"{STAGING_PREFIX}*")) if root.is_dir() else []
    resolved = root.resolve()
    beside = sorted(resolved.parent.glob(f"{STAGING_PREFIX}{resolved.name}-*"))
    override = os.environ.get(STAGING_ENV)
    if override and Path(override).is_dir():
        beside += sorted(Path(override).glob(f"{STAGING_PREFIX}{resolved.name}-*"))
    return beside, inside


def make_staging_dir(repo: Path) -> Path:
    """A fresh staging folder on ``repo``'s file system and outside it (``$TRITONFORGE_STAGING_DIR`` wins).

    Raises:
        RepositoryError: no such folder can be made (the repository is a mount point and no override
            is set, or the folder is not writable).
    """
    resolved = repo.resolve()
    override = os.environ.get(STAGING_ENV)
    parent = Path(override).resolve() if override else resolved.parent
    why = ""
    if parent == resolved or resolved in parent.parents:
        why = f"{parent} is inside the repository, where Triton would try to load it as a model"
    elif not parent.is_dir():
        why = f"{parent} is not a folder"
    elif os.stat(parent).st_dev != os.stat(resolved).st_dev:
        why = f"{parent} is on another file system than {resolved}, so the move in would not be atomic"
    if why:
        raise RepositoryError(
            f"can't stage writes for {resolved}: {why}; set {STAGING_ENV} to a writable folder on the same "
            "file system, outside the repository"
        )
    try:
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{resolved.name}-", dir=parent))
    except OSError as exc:
        raise RepositoryError(
            f"can't stage writes for {resolved} in {parent}: {exc}; set {STAGING_ENV} to a writable folder "
            "on the same file system, outside the repository"
        ) from exc


def _replace_dir(new: Path, old: Path) -> None:
    """Put ``new`` where ``old`` is, with no moment where neither exists (Linux); ``old`` is deleted."""
    if _exchange(new, old):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old contents
        return
    # No atomic exchange on this system: the version is briefly absent between the two renames.
    parked = new.parent / (new.name + ".old")
    old.rename(parked)
    new.rename(old)
    shutil.rmtree(parked, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
