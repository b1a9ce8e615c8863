"""The ``manifest.json`` of a model version: what it was built from, by whom, with which tool and signature.

``build_manifest`` makes the record the writer puts beside a version's model file; ``version_manifest``
reads it back (a missing one is ``{}``, an unreadable one a clear ``RepositoryError``); ``file_sha256``
is the digest it records of a source file or folder.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import platform
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonforge.config import ModelConfig
from tritonforge.errors import RepositoryError
from tritonforge.files import MAX_DOCUMENT_BYTES, MAX_MODEL_BYTES, open_regular, read_text
from tritonforge.repository.audit import current_user

__all__ = ["build_manifest", "file_sha256", "version_manifest"]


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in sorted order).

    Raises:
        RepositoryError: a file that is not a regular one (a FIFO, a device) or larger than
            ``MAX_MODEL_BYTES`` (:mod:`tritonforge.files`).
    """
    digest = hashlib.sha256()
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open_regular(file, what="file", limit=MAX_MODEL_BYTES, error=RepositoryError) as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def build_manifest(
    name: str, version: int, source: Path | None, config: ModelConfig, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The registry record of one version: what it was built from, by whom, with what."""
    from tritonforge import __version__

    record: dict[str, Any] = {
        "model": name,
        "version": version,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "built_by": {
            "user": current_user(),
            "host": socket.gethostname(),
            "tool": f"tritonforge {__version__}",
            "python": platform.python_version(),
        },
        "source": None if source is None else {"path": str(source.resolve()), "sha256": file_sha256(source)},
        "platform": config.platform or config.backend,
        "signature": {
            "max_batch_size": config.max_batch_size,
            "inputs": [_tensor_record(t) for t in config.inputs],
            "outputs": [_tensor_record(t) for t in config.outputs],
        },
    }
    if extra:
        record.update(extra)
    return record


def _tensor_record(tensor: Any) -> dict[str, Any]:
    return {"name": tensor.name, "dtype": tensor.dtype.triton_name, "dims": list(tensor.dims)}


def version_manifest(version_dir: Path, name: str, version: int) -> dict[str, Any]:
    """The ``manifest.json`` of one version folder of model ``name`` (``{}`` when it has none).

    Raises:
        RepositoryError: the manifest exists but can't be read as JSON.
    """
    path = version_dir / "manifest.json"
    if not path.exists():
        return {}

    def refused(message: str) -> RepositoryError:
        return RepositoryError(message, model=name, version=version)

    text = read_text(path, what="manifest", limit=MAX_DOCUMENT_BYTES, error=refused)
    try:
        record = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise refused(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise refused(f"{path}: a manifest is a JSON object, not {kind}; rebuild the version")
    return record
