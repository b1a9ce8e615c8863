"""The one repository writer: put a model file and its config into a Triton model repository, atomically.

Layout written (Triton's own)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/<model file>        model.onnx | model.pt | model.py | model.plan ...
    <repo>/<name>/<version>/manifest.json       what was built from what (the registry record)

Every write is staged in a hidden folder *beside* the repository (same file system, never inside it: Triton
would try to load it as a model) and renamed into place, so an interrupted write leaves either the old
state or the new one, never a half model; :class:`RepositoryWrite` moves several models in together.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as _dt
import errno
import hashlib
import json
import os
import platform
import shutil
import socket
import sys
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
from tritonforge.repository.audit import current_user, record_event
from tritonforge.repository.requirements import write_requirements
from tritonforge.repository.threads import DEFAULT_INTRA_OP_THREADS, onnxruntime_thread_parameters

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "MODEL_FILENAMES",
    "STAGING_ENV",
    "STAGING_PREFIX",
    "RepositoryWrite",
    "add_model",
    "amend_version",
    "build_manifest",
    "check_model_name",
    "current_user",
    "file_sha256",
    "infer_config",
    "load_config",
    "make_staging_dir",
    "model_filename",
    "next_version",
    "staging_leftovers",
    "version_manifest",
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
#: staging folders (beside the repository) start with this
STAGING_PREFIX = ".tritonforge-staging-"
#: a folder to stage in instead of the repository's parent (same file system, outside the repository)
STAGING_ENV = "TRITONFORGE_STAGING_DIR"


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
    """One more than the highest version folder of ``model_dir`` (1 for a new model)."""
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
    model_file: str | os.PathLike[str] | None,
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
    The addition is recorded in the repository's audit log (``add-model``). An ensemble
    (``config.platform == "ensemble"``) has no model file: pass ``model_file=None``; its version folder
    gets the manifest alone. Several models written together: :class:`RepositoryWrite`.

    Example:
        >>> add_model("model_repository", "clf", "clf.onnx", max_batch_size=32)   # doctest: +SKIP
        PosixPath('model_repository/clf/1')

    Returns:
        The version folder written.

    Raises:
        RepositoryError: the file is missing, the version exists (and ``overwrite`` is false), the name
            is not a valid model name, or no staging folder can be made beside the repository.
        ConfigError: the config is invalid or names another model.
        SignatureError: the config can't be inferred from the file.
        ValueError / TypeError: ``version`` is below 1 or not an int (a bad argument).
    """
    with RepositoryWrite(repo) as write:
        written = write.add_model(
            name,
            model_file,
            config,
            version,
            manifest=manifest,
            max_batch_size=max_batch_size,
            dynamic_batching=dynamic_batching,
            max_queue_delay_us=max_queue_delay_us,
            instances=instances,
            kind=kind,
            overwrite=overwrite,
            extra_files=extra_files,
        )
    record_event(
        repo,
        "add-model",
        model=name,
        version=int(written.name),
        details={"file": str(model_file) if model_file is not None else None},
    )
    return written


def amend_version(
    repo: str | os.PathLike[str],
    name: str,
    version: int,
    *,
    config: ModelConfig | None = None,
    manifest: Mapping[str, Any] | None = None,
    add_files: Mapping[str, str | os.PathLike[str]] | None = None,
    drop_files: Sequence[str] = (),
) -> Path:
    """Rewrite an existing version's manifest (``manifest`` entries merged in) and, with ``config``, the
    model's config, atomically: the version folder is staged whole and swapped in (see
    :meth:`RepositoryWrite.amend`). The model file is not changed; ``add_files`` (name in the folder ->
    source file) are added or replaced, ``drop_files`` (names in the folder) left out.

    Example:
        >>> amend_version("model_repository", "clf", 1, config=tuned, manifest=extra)  # doctest: +SKIP

    Returns:
        The version folder.

    Raises:
        RepositoryError: the model or version does not exist, or no staging folder can be made.
        ConfigError: ``config`` is invalid or names another model.
    """
    with RepositoryWrite(repo) as write:
        return write.amend(
            name, version, config=config, manifest=manifest, add_files=add_files, drop_files=drop_files
        )


@dataclasses.dataclass(frozen=True)
class _Staged:
    name: str
    version: int
    overwrite: bool
    folder: Path  # <staging>/<name>/ with config.pbtxt and <version>/


class RepositoryWrite:
    """Writes to one repository staged together *outside* it, then moved into place in one go.

    Triton loads every folder of a repository as a model, so nothing half-written may ever sit there: the
    staging folder is a hidden sibling of the repository (``.tritonforge-staging-<repo>-*``, same file
    system, so moving in is a rename). Nothing is moved until :meth:`commit` (the end of a ``with`` block
    that raised nothing); an error while staging leaves the repository untouched. Each model lands whole:
    a new model folder appears by one rename; a new version of an existing model appears by one rename
    (a replaced version is swapped atomically, ``renameat2(RENAME_EXCHANGE)``) before its config is
    replaced by another. A writer killed at any moment leaves at most a staging folder beside the
    repository, which Triton never sees and ``tritonforge validate`` reports.

    Example:
        >>> with RepositoryWrite("model_repository") as write:           # doctest: +SKIP
        ...     write.add_model("tokenizer", "tokenizer.py", tokenizer_config, 1)
        ...     write.add_model("text_embedding", None, ensemble_config, 1)

    Raises:
        RepositoryError: as :func:`add_model`, and when no staging folder can be made on the repository's
            file system outside it (set ``TRITONFORGE_STAGING_DIR`` to such a folder).
    """

    def __init__(self, repo: str | os.PathLike[str]) -> None:
        self.repo = Path(repo)
        self._staged: list[_Staged] = []
        self._staging: Path | None = None

    def __enter__(self) -> RepositoryWrite:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def add_model(
        self,
        name: str,
        model_file: str | os.PathLike[str] | None,
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
        """Stage one model version (see :func:`add_model`); returns the version folder it will be."""
        check_model_name(name)
        if any(s.name == name for s in self._staged):
            raise RepositoryError(f"model '{name}' is written twice in one repository write", model=name)
        source = None if model_file is None else Path(model_file)
        if source is not None and not source.exists():
            raise RepositoryError(f"model file {source} does not exist", model=name)
        for extra in map(Path, extra_files):
            if not extra.exists():
                raise RepositoryError(
                    f"file {extra} (to go beside the model file) does not exist", model=name
                )
        if config is None:
            if source is None:
                raise RepositoryError(f"model '{name}' needs a model file or a config", model=name)
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
                    f"the config is for model '{config.name}', not '{name}': Triton requires the config name "
                    f"to match the folder; pass a config named '{name}'",
                    model=name,
                )
            config = config.replace(name=name)
        config.validate()
        filename = model_filename(config)
        if filename is None and source is not None:
            raise RepositoryError(
                f"model '{name}' is an ensemble: it has no model file (pass model_file=None)", model=name
            )
        if filename is not None and source is None:
            raise RepositoryError(
                f"model '{name}' ({config.platform or config.backend}) needs a model file", model=name
            )
        model_dir = self.repo / name
        chosen = version if version is not None else next_version(model_dir)
        if isinstance(chosen, bool) or not isinstance(chosen, int):
            raise TypeError(f"version must be an int, not {type(chosen).__name__}")
        if chosen < 1:
            raise ValueError(f"model '{name}': version must be 1 or more, not {chosen}")
        target = model_dir / str(chosen)
        if target.exists() and not overwrite:
            raise RepositoryError(
                f"model '{name}' already has version {chosen} at {target}; pick another version, leave it "
                f"out to get the next one ({next_version(model_dir)}), or pass overwrite=True",
                model=name,
                version=chosen,
            )
        record = build_manifest(name, chosen, source, config, manifest)
        folder = self._staging_dir() / name
        version_dir = folder / str(chosen)
        version_dir.mkdir(parents=True)
        if source is not None and filename is not None:
            _copy(source, version_dir / filename)
        for extra in map(Path, extra_files):
            _copy(extra, version_dir / extra.name)
        if config.backend == "python":  # what NVIDIA's image lacks, declared where its Dockerfile reads it
            write_requirements(version_dir)
        (version_dir / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        write_config(config, folder / "config.pbtxt")
        self._staged.append(_Staged(name, chosen, overwrite, folder))
        return target

    def amend(
        self,
        name: str,
        version: int,
        *,
        config: ModelConfig | None = None,
        manifest: Mapping[str, Any] | None = None,
        add_files: Mapping[str, str | os.PathLike[str]] | None = None,
        drop_files: Sequence[str] = (),
    ) -> Path:
        """Stage a rewrite of existing version ``version`` of ``name``: its files as they are (hard links
        where the file system allows, else copies) but ``drop_files`` and with ``add_files`` (name ->
        source), its ``manifest.json`` with ``manifest`` merged in, and ``config`` (default: the model's
        config as it is). Moved in like a replaced version.

        Raises:
            RepositoryError: the model or version does not exist, or it is written twice in this write.
            ConfigError: ``config`` is invalid or names another model.
        """
        check_model_name(name)
        if any(s.name == name for s in self._staged):
            raise RepositoryError(f"model '{name}' is written twice in one repository write", model=name)
        model_dir = self.repo / name
        current = model_dir / str(version)
        if not current.is_dir():
            have = ", ".join(map(str, versions(model_dir))) or "none"
            raise RepositoryError(
                f"model '{name}' has no version {version} in {self.repo} (versions: {have})",
                model=name,
                version=version,
            )
        if config is None:
            config = load_config(model_dir)
        elif config.name != name:
            raise ConfigError(f"the config is for model '{config.name}', not '{name}'", model=name)
        config.validate()
        record = {**version_manifest(current, name, version), **(manifest or {})}
        folder = self._staging_dir() / name
        folder.mkdir(parents=True)
        version_dir = folder / str(version)
        dropped = set(drop_files) | set(add_files or {})
        shutil.copytree(
            current,
            version_dir,
            copy_function=_link_or_copy,
            ignore=lambda folder, names: [n for n in names if Path(folder) == current and n in dropped],
        )
        for target_name, source in (add_files or {}).items():
            shutil.copyfile(source, version_dir / target_name)
        (version_dir / "manifest.json").unlink(missing_ok=True)
        (version_dir / "manifest.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        write_config(config, folder / "config.pbtxt")
        self._staged.append(_Staged(name, version, True, folder))
        return current

    def commit(self) -> list[Path]:
        """Move every staged model into the repository; returns their version folders.

        Raises:
            RepositoryError: a version appeared meanwhile (and ``overwrite`` was false); the models
                already moved stay, the rest is discarded.
        """
        written: list[Path] = []
        try:
            for staged in self._staged:
                written.append(self._move_in(staged))
        finally:
            self.discard()
        return written

    def discard(self) -> None:
        """Drop everything staged; the repository is not touched."""
        self._staged.clear()
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def _staging_dir(self) -> Path:
        if self._staging is None:
            self.repo.mkdir(parents=True, exist_ok=True)
            self._staging = make_staging_dir(self.repo)
        return self._staging

    def _move_in(self, staged: _Staged) -> Path:
        model_dir = self.repo / staged.name
        target = model_dir / str(staged.version)
        if not model_dir.exists():
            with contextlib.suppress(FileExistsError, OSError):
                # One rename: the whole model (config and version) appears at once.
                staged.folder.rename(model_dir)
                return target
        if target.exists():
            if not staged.overwrite:
                raise RepositoryError(
                    f"model '{staged.name}' got version {staged.version} from another writer meanwhile",
                    model=staged.name,
                    version=staged.version,
                )
            _replace_dir(staged.folder / str(staged.version), target)
        else:
            (staged.folder / str(staged.version)).rename(target)
        # The new version is in place before the config that may name it; the config swap is atomic.
        os.replace(staged.folder / "config.pbtxt", model_dir / "config.pbtxt")
        return target


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


def infer_config(
    name: str,
    source: Path,
    *,
    max_batch_size: int | None = None,
    dynamic_batching: bool = True,
    max_queue_delay_us: int = 0,
    instances: int = 1,
    kind: InstanceKind | str = InstanceKind.CPU,
    intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
) -> ModelConfig:
    """A config for ``source`` read off the file itself (ONNX only: TorchScript needs example inputs).

    The config names its thread pools (``intra_op_threads`` per instance, one inter-op thread, spinning
    off: :func:`~tritonforge.repository.threads.onnxruntime_thread_parameters`) rather than leaving
    onnxruntime to size each instance's pool to every core.
    """
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
        parameters=onnxruntime_thread_parameters(intra_op_threads),
    )


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
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{path}: unreadable manifest: {exc}", model=name, version=version) from exc


def _link_or_copy(source: str, destination: str) -> None:
    # the files of a version are never written in place (versions are replaced whole), so a hard link
    # shares them safely and costs nothing for a large model
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _copy(source: Path, destination: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, destination)
    else:
        shutil.copy2(source, destination)


def check_model_name(name: str) -> None:
    """Raises RepositoryError unless ``name`` can be a model folder of a repository."""
    if not isinstance(name, str):
        raise TypeError(f"a model name is a str, not {type(name).__name__}")
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
