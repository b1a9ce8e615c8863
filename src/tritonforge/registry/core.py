"""The model registry: versions with their manifests, which version is served, and an audit log.

Each version folder's ``manifest.json`` (written by :func:`tritonforge.repository.add_model`) is the
record; :func:`register` adds an export/quantization artifact with its settings, figures and library
versions, refusing one that failed its verification unless forced. :func:`promote` and :func:`rollback`
set the served version through the config's ``version_policy`` (an atomic config rewrite) and append
one JSON line per change to ``<repo>/audit.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Collection, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from tritonforge.config import ModelConfig, VersionPolicy, write_config
from tritonforge.errors import QuantizationError, RepositoryError, TritonForgeError
from tritonforge.export.result import Artifact
from tritonforge.repository.audit import AUDIT_LOG, record_event
from tritonforge.repository.writer import (
    RepositoryWrite,
    file_sha256,
    infer_config,
    load_config,
    version_manifest,
    versions,
)

__all__ = [
    "AUDIT_LOG",
    "ModelVersion",
    "audit_log",
    "library_versions",
    "list_models",
    "promote",
    "read_manifest",
    "register",
    "rollback",
    "served_before",
    "served_versions",
]

_LIBRARIES = (
    "numpy",
    "onnx",
    "onnxruntime",
    "torch",
    "scikit-learn",
    "skl2onnx",
    "transformers",
    "tokenizers",
)


def library_versions(names: tuple[str, ...] = _LIBRARIES) -> dict[str, str]:
    """Installed versions of the libraries that shape an artifact (those installed)."""
    found: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def register(
    repo: str | os.PathLike[str],
    name: str,
    artifact: Artifact,
    *,
    source: Mapping[str, Any] | str | os.PathLike[str] | None = None,
    config: ModelConfig | None = None,
    version: int | None = None,
    force: bool = False,
    extra: Mapping[str, Any] | None = None,
    **add_model_options: Any,
) -> Path:
    """Write ``artifact`` into ``repo`` as a new version of ``name``, with its full manifest.

    Args:
        source: what the artifact was built from: a file (path and sha256 are recorded) or a mapping
            (e.g. ``{"path": ..., "sha256": ..., "dataset": ...}``); default: the artifact file itself.
        force: write it even though its verification failed (the manifest says so).
        extra: more manifest entries (e.g. ``{"metrics": {"test_accuracy": 0.97}}``).
        add_model_options: passed to :func:`~tritonforge.repository.add_model` (``max_batch_size``, ...).

    Raises:
        QuantizationError / ExportError: the artifact failed its verification (the figures are in the
            message) and ``force`` is false.
        RepositoryError: as :func:`~tritonforge.repository.add_model`.
    """
    if not artifact.passed and not force:
        figures = "; ".join(f"{n}: {r.summary()}" for n, r in artifact.reports.items())
        from tritonforge.errors import ExportError

        cls = QuantizationError if artifact.stage == "quantization" else ExportError
        raise cls(
            f"{artifact.path.name} failed its verification, so it was not written into {repo}: "
            f"{'; '.join(artifact.failures())}. Figures: {figures}. "
            "Pass force=True (--force) to write it anyway",
            model=name,
        )
    if not artifact.path.exists():
        raise RepositoryError(f"model file {artifact.path} does not exist", model=name)
    manifest: dict[str, Any] = dict(artifact.manifest())
    manifest["libraries"] = library_versions()
    manifest["artifact"] = {
        "file": artifact.path.name,
        "sha256": file_sha256(artifact.path),
        "bytes": artifact.path.stat().st_size,
    }
    if source is not None:
        if isinstance(source, Mapping):
            manifest["source"] = dict(source)
        else:
            path = Path(source)
            if not path.exists():
                raise RepositoryError(f"source {path} does not exist", model=name)
            manifest["source"] = {"path": str(path.resolve()), "sha256": file_sha256(path)}
    if not artifact.passed:
        manifest["forced"] = True
    if extra:
        manifest.update(extra)
    config = _keep_served_policy(Path(repo) / name, artifact.path, config, add_model_options)
    with RepositoryWrite(repo) as write:  # recorded below with the artifact's figures
        written = write.add_model(
            name,
            artifact.path,
            config,
            version,
            manifest=manifest,
            extra_files=artifact.extra_files,
            **add_model_options,
        )
    record_event(
        repo,
        "add-model",
        model=name,
        version=int(written.name),
        details={
            "file": artifact.path.name,
            "sha256": manifest["artifact"]["sha256"],
            "passed": artifact.passed,
            "stage": artifact.stage,
        },
    )
    return written


_INFER_OPTIONS = ("max_batch_size", "dynamic_batching", "max_queue_delay_us", "instances", "kind")


def _keep_served_policy(
    model_dir: Path, artifact: Path, config: ModelConfig | None, options: Mapping[str, Any]
) -> ModelConfig | None:
    """A promoted model keeps serving its promoted version when a new version is added."""
    if (config is not None and config.version_policy is not None) or not (
        model_dir / "config.pbtxt"
    ).is_file():
        return config
    try:
        policy = load_config(model_dir).version_policy
    except TritonForgeError:
        return config
    if policy is None:
        return config
    if config is None:
        config = infer_config(
            model_dir.name, artifact, **{k: v for k, v in options.items() if k in _INFER_OPTIONS}
        )
    return config.replace(version_policy=policy)


def read_manifest(repo: str | os.PathLike[str], name: str, version: int) -> dict[str, Any]:
    """The manifest of one version (``{}`` when the version has none).

    Raises:
        RepositoryError: no such model or version.
    """
    model_dir = _model_dir(Path(repo), name)
    _check_version(model_dir, name, version)
    return version_manifest(model_dir / str(version), name, version)


def served_versions(config: ModelConfig, available: list[int]) -> list[int]:
    """The versions Triton serves under ``config``'s version policy, of those ``available``."""
    policy = config.version_policy or VersionPolicy.latest(1)
    if policy.kind == "all":
        return list(available)
    if policy.kind == "specific":
        return [v for v in available if v in set(policy.versions)]
    return sorted(available)[-policy.num_versions :] if available else []


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """One row of ``tritonforge models``."""

    model: str
    version: int
    served: bool
    manifest: Mapping[str, Any]

    @property
    def variant(self) -> str:
        quant = self.manifest.get("quantization") or {}
        if quant.get("mode"):
            return str(quant["mode"])
        export = self.manifest.get("export") or {}
        return str(
            self.manifest.get("variant") or export.get("format") or self.manifest.get("platform") or ""
        )


def list_models(repo: str | os.PathLike[str], *, names: Collection[str] | None = None) -> list[ModelVersion]:
    """Every model and version in ``repo`` (or only the models in ``names``) with its manifest and whether
    it is served.

    Only the models asked for are read (their config and each version's manifest), so a look-up of one
    model costs the same in a repository of 5 models as of 500.

    Raises:
        RepositoryError: ``repo`` is not a folder.
    """
    root = Path(repo)
    if not root.is_dir():
        raise RepositoryError(f"{root} is not a model repository (no such folder)")
    if names is None:
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    else:
        folders = [
            root / n for n in sorted(set(names)) if n and not n.startswith(".") and (root / n).is_dir()
        ]
    rows: list[ModelVersion] = []
    for model_dir in folders:
        found = versions(model_dir)
        try:
            served = set(served_versions(load_config(model_dir), found))
        except TritonForgeError:
            served = set()
        for version in found:
            manifest = version_manifest(model_dir / str(version), model_dir.name, version)
            rows.append(ModelVersion(model_dir.name, version, version in served, manifest))
    return rows


def _model_dir(repo: Path, name: str) -> Path:
    model_dir = repo / name
    if not name or name.startswith(".") or not model_dir.is_dir():
        known = (
            sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
            if repo.is_dir()
            else []
        )
        raise RepositoryError(
            f"no model '{name}' in {repo}; it has: {', '.join(known) or 'no models'}", model=name
        )
    return model_dir


def _check_version(model_dir: Path, name: str, version: int) -> list[int]:
    found = versions(model_dir)
    if version not in found:
        raise RepositoryError(
            f"model '{name}' has no version {version}; it has {', '.join(map(str, found)) or 'none'}",
            model=name,
            version=version,
        )
    return found


def pinned_by_ensembles(repo: Path, name: str) -> dict[str, int]:
    """Ensembles of ``repo`` whose steps pin a version of ``name``: ensemble name -> pinned version."""
    pins: dict[str, int] = {}
    for config_file in sorted(repo.glob("*/config.pbtxt")):
        try:
            config = load_config(config_file.parent)
        except TritonForgeError:
            continue  # not ours to judge here; `tritonforge validate` reports it
        for step in config.ensemble_steps or ():
            if step.model_name == name and step.model_version > 0:
                pins[config_file.parent.name] = step.model_version
    return pins


def _set_served(
    repo: Path, name: str, chosen: list[int], action: str, reason: str | None, force: bool = False
) -> dict[str, Any]:
    model_dir = _model_dir(repo, name)
    for version in chosen:
        found = _check_version(model_dir, name, version)
    shown = f"version {chosen[0]}" if len(chosen) == 1 else f"versions {chosen}"
    broken = {e: v for e, v in pinned_by_ensembles(repo, name).items() if v not in chosen}
    if broken and not force:
        listed = ", ".join(f"'{e}' pins v{v}" for e, v in broken.items())
        raise RepositoryError(
            f"serving only {shown} of '{name}' would break ensembles that use another version "
            f"({listed}): Triton would refuse them. Re-pin those pipelines to v{chosen[0]} (or unpin them) "
            f"and recompile, or pass force=True (--force) to {action} anyway",
            model=name,
            version=chosen[0],
        )

    def change() -> dict[str, Any]:  # under the audit log's lock: no other change comes between
        config = load_config(model_dir)
        before = served_versions(config, found)
        write_config(config.replace(version_policy=VersionPolicy.specific(*chosen)), model_dir)
        return {"from": before, "to": list(chosen)}

    return record_event(repo, action, model=name, reason=reason, change=change)


def promote(
    repo: str | os.PathLike[str], name: str, version: int, *, reason: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Serve exactly ``version`` of ``name`` (``version_policy { specific { versions: [v] } }``).

    The config is replaced atomically, so a polling server sees the old policy or the new one, and the
    change is appended to ``<repo>/audit.jsonl``. Returns the audit event.

    Raises:
        RepositoryError: no such model, or no such version (the message lists what exists), or an
            ensemble pins another version of the model (unless ``force``).
    """
    return _set_served(Path(repo), name, [int(version)], "promote", reason, force)


def rollback(
    repo: str | os.PathLike[str],
    name: str,
    *,
    to: int | None = None,
    reason: str | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Serve again exactly the versions served before the last promote (or ``to``), and record it.

    "Before" comes from the audit log: each promote records the versions it replaced, and each rollback
    undoes the latest promote not yet undone, so rollback after rollback walks the promotes back. A
    version that was never promoted (e.g. a rollout candidate that was rolled back) is never chosen.
    Without history: the highest version below the lowest served one.

    Raises:
        RepositoryError: no such model or version, or nothing to roll back to.
    """
    root = Path(repo)
    model_dir = _model_dir(root, name)
    if to is not None:
        return _set_served(root, name, [int(to)], "rollback", reason, force)
    found = versions(model_dir)
    now = served_versions(load_config(model_dir), found)
    previous = [v for v in served_before(root, name) if v in found]
    if previous and previous != now:
        return _set_served(root, name, previous, "rollback", reason, force)
    lower = [v for v in found if now and v < min(now)]
    if not lower:
        raise RepositoryError(
            f"model '{name}' serves {now or 'nothing'} and has no earlier version to roll back to",
            model=name,
        )
    return _set_served(root, name, [lower[-1]], "rollback", reason, force)


def served_before(repo: str | os.PathLike[str], name: str) -> list[int]:
    """The versions ``name`` served before its latest promote that no rollback has undone yet (``[]``
    without such history), per the audit log."""
    undone: list[list[int]] = []
    for event in audit_log(repo):
        if event.get("model") != name:
            continue
        if event.get("action") == "promote" and event.get("from") != event.get("to"):
            undone.append([int(v) for v in event.get("from", [])])
        elif event.get("action") == "rollback" and undone:
            undone.pop()
    return undone[-1] if undone else []


def audit_log(repo: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every event recorded in ``repo``'s audit log, oldest first (lines that are not events are left
    out: :func:`tritonforge.registry.audit.read_audit_log` says which).

    Raises:
        RepositoryError: the log is not a regular file, or can't be read.
    """
    from tritonforge.registry.audit import read_audit_log  # the reader, beside the writer's re-export

    return read_audit_log(repo).events
