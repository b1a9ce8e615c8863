"""The one repository writer: put a model file and its config into a Triton model repository, atomically.

Layout written (Triton's own)::

    <repo>/<name>/config.pbtxt
    <repo>/<name>/<version>/<model file>        model.onnx | model.pt | model.py | model.plan ...
    <repo>/<name>/<version>/manifest.json       what was built from what (the registry record)

Every write is staged in a hidden folder *beside* the repository (same file system, never inside it: Triton
would try to load it as a model) and renamed into place, so an interrupted write leaves either the old
state or the new one, never a half model; :class:`RepositoryWrite` moves several models in together.
The staging and the atomic swap live in ``staging.py``, the version manifest (and ``file_sha256``) in
``manifest.py``; their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
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
from tritonforge.config.validate import INT64_MAX, model_name_problem
from tritonforge.errors import ConfigError, RepositoryError, SignatureError
from tritonforge.files import (
    MAX_MODEL_BYTES,
    check_regular,
    copy_file,
    copy_tree,
)
from tritonforge.repository.audit import current_user, record_event
from tritonforge.repository.manifest import build_manifest, file_sha256, version_manifest
from tritonforge.repository.requirements import ship_modules, write_requirements
from tritonforge.repository.staging import (
    STAGING_ENV,
    STAGING_PREFIX,
    _replace_dir,
    make_staging_dir,
    staging_leftovers,
)
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
    "check_model_source",
    "current_user",
    "file_sha256",
    "infer_config",
    "is_version_name",
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


def model_filename(config: ModelConfig) -> str | None:
    """The file Triton loads from each version folder of ``config``'s model (None for ensembles)."""
    if config.default_model_filename:
        return config.default_model_filename
    kind = config.platform or config.backend or ""
    if kind == "ensemble":
        return None
    return MODEL_FILENAMES.get(kind)


def is_version_name(name: str) -> bool:
    """Whether Triton reads a folder called ``name`` as a model version: ASCII digits, no leading zero
    (Triton 2.51 skips ``01``), at most 2**63 - 1 (a larger one crashes it)."""
    return bool(_VERSION_NAME.fullmatch(name)) and int(name) <= INT64_MAX


_VERSION_NAME = re.compile(r"0|[1-9][0-9]{0,18}")


def versions(model_dir: Path) -> list[int]:
    """The version folders of a model (as Triton reads them: :func:`is_version_name`), ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and is_version_name(p.name))


def next_version(model_dir: Path) -> int:
    """One more than the highest version folder of ``model_dir`` (1 for a new model)."""
    existing = versions(model_dir)
    return existing[-1] + 1 if existing else 1


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
        if source is not None:
            check_model_source(source, name)
        for extra in map(Path, extra_files):
            if not extra.is_dir():
                check_regular(
                    extra,
                    what="file to go beside the model file,",
                    limit=MAX_MODEL_BYTES,
                    error=_repository_error(name),
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
        if not 1 <= chosen <= INT64_MAX:
            raise ValueError(
                f"model '{name}': version must be 1 to {INT64_MAX} (int64, as Triton reads version folders), "
                f"not {chosen}"
            )
        policy = config.version_policy
        if policy is not None and not policy.serves([*versions(model_dir), chosen]):
            raise ConfigError(
                f"model '{name}': its version_policy ({policy}) serves none of its versions "
                f"({', '.join(map(str, sorted({*versions(model_dir), chosen})))}), and Triton refuses such a "
                "model; name a version it has in the policy, or leave version_policy out",
                model=name,
            )
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
        if config.backend == "python":  # what NVIDIA's image lacks: ours shipped, the rest declared
            ship_modules(version_dir)
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
        config as it is); tritonforge's modules beside its code follow what the code now imports
        (:func:`~tritonforge.repository.requirements.ship_modules`). Moved in like a replaced version.

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
        # code added (a rollout's splitter) or dropped changes which of our modules it needs beside it
        ship_modules(version_dir, python_model=config.backend == "python")
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


def _link_or_copy(source: str, destination: str) -> None:
    # the files of a version are never written in place (versions are replaced whole), so a hard link
    # shares them safely and costs nothing for a large model
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _repository_error(name: str) -> Callable[[str], RepositoryError]:
    return lambda message: RepositoryError(message, model=name)


def _copy(source: Path, destination: Path) -> None:
    # regular files only, bounded: a FIFO or a symlink to /dev/zero inside a folder is refused by name
    if source.is_dir():
        copy_tree(source, destination, what="model folder", error=RepositoryError)
    else:
        copy_file(source, destination, what="model file", error=RepositoryError)


def check_model_source(source: Path, name: str) -> None:
    """Raises RepositoryError unless ``source`` can be copied in as model ``name``'s file: a regular file
    (or a folder, as a SavedModel is) of 1 byte to ``MAX_MODEL_BYTES`` — never a FIFO, a device or an
    empty file, which Triton can't load.
    """
    if source.is_dir() and not source.is_symlink():
        return  # each file inside is checked as it is copied
    info = check_regular(source, what="model file", limit=MAX_MODEL_BYTES, error=_repository_error(name))
    if info.st_size == 0:
        raise RepositoryError(
            f"model file {source} is empty (0 bytes): Triton can't load it; give the exported model",
            model=name,
        )


def check_model_name(name: str) -> None:
    """Raises RepositoryError unless ``name`` can be a model of a repository (see
    :func:`tritonforge.config.validate.model_name_problem` for the rule and why)."""
    if not isinstance(name, str):
        raise TypeError(f"a model name is a str, not {type(name).__name__}")
    problem = model_name_problem(name)
    if problem is not None:
        raise RepositoryError(problem, model=name)


def load_config(model_dir: Path) -> ModelConfig:
    """The config of an existing model folder (a clear error when it is missing)."""
    path = model_dir / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(f"model '{model_dir.name}' has no config.pbtxt at {path}", model=model_dir.name)
    return read_config(path)
