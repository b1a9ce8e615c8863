"""The one repository writer: put a model file and its config into a Triton model repository, atomically.

Layout written (Triton's own)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/<model file>        model.onnx | model.pt | model.py | model.plan ...
    <repo>/<name>/<version>/manifest.json       what was built from what (the registry record)

Every write is staged in a hidden folder inside the repository (same file system) and renamed into place,
so an interrupted write leaves either the old state or the new one, never a half model.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import hashlib
import json
import os
import platform
import shutil
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tritonforge.config import (
    DEFAULT_MAX_BATCH_SIZE,
    DynamicBatching,
    InstanceKind,
    ModelConfig,
    config_from_signature,
    onnx_signature,
    read_config,
    write_config,
)
from tritonforge.errors import ConfigError, RepositoryError, SignatureError

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "MODEL_FILENAMES",
    "add_model",
    "file_sha256",
    "model_filename",
    "next_version",
    "versions",
]


#: the file each platform/backend loads from a version folder unless default_model_filename says otherwise
MODEL_FILENAMES: Mapping[str, str] = {
    "onnxruntime_onnx": "model.onnx",
    "onnxruntime": "model.onnx",
    "pytorch_libtorch": "model.pt",
    "pytorch": "model.pt",
    "python": "model.py",
    "tensorrt_plan": "model.plan",
    "tensorrt": "model.plan",
    "tensorflow_savedmodel": "model.savedmodel",
    "tensorflow_graphdef": "model.graphdef",
}
_PLATFORM_OF_SUFFIX = {".onnx": "onnxruntime_onnx", ".pt": "pytorch_libtorch", ".plan": "tensorrt_plan"}
STAGING_PREFIX = ".tritonforge-staging-"


def model_filename(config: ModelConfig) -> str | None:
    """The file Triton loads from each version folder of ``config``'s model (None for ensembles)."""
    if config.default_model_filename:
        return config.default_model_filename
    kind = config.platform or config.backend or ""
    if kind == "ensemble":
        return None
    return MODEL_FILENAMES.get(kind)


def versions(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(model_dir: Path) -> int:
    existing = versions(model_dir)
    return existing[-1] + 1 if existing else 1


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (names and contents, in sorted order)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def add_model(
    repo: str | os.PathLike[str],
    name: str,
    model_file: str | os.PathLike[str],
    config: ModelConfig | None = None,
    version: int | None = None,
    *,
    manifest: Mapping[str, Any] | None = None,
    max_batch_size: int | None = None,
    dynamic_batching: bool = True,
    max_queue_delay_us: int = 0,
    instances: int = 1,
    kind: InstanceKind | str = InstanceKind.CPU,
    overwrite: bool = False,
    extra_files: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Add ``model_file`` as version ``version`` (default: the next one) of model ``name`` in ``repo``.

    With no ``config``, one is inferred from the file (ONNX: names, dtypes, shapes and the batch dim), with
    ``max_batch_size`` (default 64 for batchable models), dynamic batching and ``instances`` of ``kind``.
    ``manifest`` entries are merged into the version's ``manifest.json`` (the registry record).
    ``extra_files`` are copied beside the model file under their own names (e.g. ONNX external data).

    Example:
        >>> add_model("model_repository", "clf", "clf.onnx", max_batch_size=32)   # doctest: +SKIP
        PosixPath('model_repository/clf/1')

    Returns:
        The version folder written.

    Raises:
        RepositoryError: the file is missing, the version exists (and ``overwrite`` is false), or the name
            is not a valid model name.
        ConfigError: the config is invalid or names another model.
        SignatureError: the config can't be inferred from the file.
    """
    repo_path = Path(repo)
    source = Path(model_file)
    _check_name(name)
    if not source.exists():
        raise RepositoryError(f"model file {source} does not exist", model=name)
    for extra in map(Path, extra_files):
        if not extra.exists():
            raise RepositoryError(f"file {extra} (to go beside {source.name}) does not exist", model=name)
    if config is None:
        config = infer_config(
            name,
            source,
            max_batch_size=max_batch_size,
            dynamic_batching=dynamic_batching,
            max_queue_delay_us=max_queue_delay_us,
            instances=instances,
            kind=kind,
        )
    elif config.name != name:
        if config.name:
            raise ConfigError(
                f"the config is for model '{config.name}', not '{name}': Triton requires the config name to "
                f"match the folder; pass a config named '{name}'",
                model=name,
            )
        config = config.replace(name=name)
    config.validate()
    filename = model_filename(config)
    if filename is None:
        raise RepositoryError(f"model '{name}' is an ensemble: it has no model file to add", model=name)

    repo_path.mkdir(parents=True, exist_ok=True)
    model_dir = repo_path / name
    chosen = version if version is not None else next_version(model_dir)
    if chosen < 1:
        raise RepositoryError(f"version must be a positive integer, not {chosen}", model=name)
    target = model_dir / str(chosen)
    if target.exists() and not overwrite:
        raise RepositoryError(
            f"model '{name}' already has version {chosen} at {target}; pick another version, leave it out to "
            f"get the next one ({next_version(model_dir)}), or pass overwrite=True",
            model=name,
            version=chosen,
        )

    record = build_manifest(name, chosen, source, config, manifest)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=repo_path))
    try:
        version_dir = staging / str(chosen)
        version_dir.mkdir()
        _copy(source, version_dir / filename)
        for extra in map(Path, extra_files):
            _copy(extra, version_dir / extra.name)
        (version_dir / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if not model_dir.exists():
            # A new model: stage the whole folder, config included, and rename it into place at once.
            write_config(config, staging / "config.pbtxt")
            staged_model = staging / "model"
            staged_model.mkdir()
            version_dir.rename(staged_model / str(chosen))
            (staging / "config.pbtxt").rename(staged_model / "config.pbtxt")
            staged_model.rename(model_dir)
        else:
            # An existing model: the version folder appears whole (rename), then the config is replaced
            # atomically; between the two the old config still describes a servable model.
            if target.exists():
                old = staging / "replaced"
                target.rename(old)
            version_dir.rename(target)
            write_config(config, model_dir / "config.pbtxt")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def infer_config(
    name: str,
    source: Path,
    *,
    max_batch_size: int | None = None,
    dynamic_batching: bool = True,
    max_queue_delay_us: int = 0,
    instances: int = 1,
    kind: InstanceKind | str = InstanceKind.CPU,
) -> ModelConfig:
    """A config for ``source`` read off the file itself (ONNX only: TorchScript needs example inputs)."""
    platform_name = _PLATFORM_OF_SUFFIX.get(source.suffix)
    if platform_name != "onnxruntime_onnx":
        raise SignatureError(
            f"can't infer a config for {source.name}: only ONNX files describe their own inputs; give a "
            f"config (tritonforge.config.ModelConfig), or for TorchScript use "
            f"torchscript_signature(path, examples)",
            model=name,
        )
    signature = onnx_signature(source)
    if max_batch_size and not signature.batched:
        raise ConfigError(
            f"{source.name} has no variable leading (batch) dim on every input and output, so it can't be "
            f"served with max_batch_size={max_batch_size}; export it with a dynamic batch axis or use 0",
            model=name,
        )
    batching: bool | DynamicBatching = dynamic_batching
    if dynamic_batching and max_queue_delay_us:
        batching = DynamicBatching(max_queue_delay_us=max_queue_delay_us)
    return config_from_signature(
        name,
        signature,
        platform_name,
        max_batch_size=max_batch_size if signature.batched else None,
        dynamic_batching=batching,
        instances=instances,
        kind=kind,
    )


def build_manifest(
    name: str, version: int, source: Path, config: ModelConfig, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The registry record of one version: what it was built from, by whom, with what."""
    from tritonforge import __version__

    record: dict[str, Any] = {
        "model": name,
        "version": version,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "built_by": {
            "user": _user(),
            "host": socket.gethostname(),
            "tool": f"tritonforge {__version__}",
            "python": platform.python_version(),
        },
        "source": {"path": str(source.resolve()), "sha256": file_sha256(source)},
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


def _user() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"


def _copy(source: Path, destination: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, destination)
    else:
        shutil.copy2(source, destination)


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name.strip() != name:
        raise RepositoryError(
            f"{name!r} is not a usable model name: use letters, digits, '_' or '-' (no '/', no leading '.')",
            model=name,
        )


def load_config(model_dir: Path) -> ModelConfig:
    """The config of an existing model folder (a clear error when it is missing)."""
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(f"model '{model_dir.name}' has no config.pbtxt at {path}", model=model_dir.name)
    return read_config(path)
