"""Offline checks of a model repository: layout, configs, files, signatures, leftovers of interrupted writes.

The live check (load each model in a real server, send one request) is :mod:`tritonforge.server.live`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.config import ModelConfig, VersionPolicy, check_signature, onnx_signature, read_model_dir
from tritonforge.config.validate import INT64_MAX
from tritonforge.errors import RepositoryError, TritonForgeError
from tritonforge.repository.writer import (
    check_model_source,
    is_version_name,
    model_filename,
    staging_leftovers,
    versions,
)

__all__ = ["Problem", "check_repository", "check_repository_configs", "model_dirs", "sample_inputs"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a repository: which model (and version), what, and how bad."""

    model: str
    message: str
    version: int | None = None
    severity: str = "error"  # "error" stops Triton from serving the model; "warning" does not

    def __str__(self) -> str:
        where = self.model + (f" v{self.version}" if self.version is not None else "")
        return f"{self.severity}: {where}: {self.message}"


def model_dirs(repo: Path) -> list[Path]:
    """The model folders of a repository (hidden and staging folders skipped), by name."""
    return sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_repository(repo: str | os.PathLike[str]) -> list[Problem]:
    """Every problem an offline look at ``repo`` finds (an empty list: Triton should load it all).

    Checks the layout, that each config.pbtxt parses and is valid, that its name matches its folder, that
    each version folder has the model file, and that ONNX files' signatures match their configs.
    """
    return check_repository_configs(repo)[0]


def check_repository_configs(repo: str | os.PathLike[str]) -> tuple[list[Problem], dict[str, ModelConfig]]:
    """:func:`check_repository`'s problems, and the configs it read (by model folder, as
    :func:`~tritonforge.config.read_model_dir` reads them; one that failed is absent), for a caller that
    needs both and reads each config once."""
    root = Path(repo)
    if not root.is_dir():
        return [Problem(str(root), "the repository folder does not exist")], {}
    problems: list[Problem] = []
    dirs = model_dirs(root)
    if not dirs:
        problems.append(Problem(str(root), "the repository has no model folders", severity="warning"))
    beside, inside = staging_leftovers(root)
    for leftover in inside:
        problems.append(
            Problem(
                leftover.name,
                f"a staging folder inside the repository ({leftover}), left by an interrupted write of an "
                "older tritonforge: Triton tries to load it as a model and fails to start; delete it",
            )
        )
    for leftover in beside:
        problems.append(
            Problem(
                leftover.name,
                f"a staging folder beside the repository ({leftover}), left by an interrupted write; Triton "
                "never looks there and the repository is whole, but it takes disk space: delete it",
                severity="warning",
            )
        )
    configs: dict[str, ModelConfig] = {}
    for model_dir in dirs:
        config = _check_config(model_dir, problems)
        if config is not None:
            configs[model_dir.name] = config
            _check_versions(model_dir, config, problems)
            _check_label_files(model_dir, config, problems)
    for name, config in configs.items():
        for step in config.ensemble_steps or ():
            if step.model_name not in configs:
                problems.append(
                    Problem(name, f"ensemble step model '{step.model_name}' is not in the repository")
                )
    return problems, configs


def _check_config(model_dir: Path, problems: list[Problem]) -> ModelConfig | None:
    # Errors only where Triton refuses the model; what it accepts but looks wrong is a warning.
    name = model_dir.name
    try:
        config = read_model_dir(model_dir)
    except TritonForgeError as exc:
        problems.append(Problem(name, exc.message))
        return None
    problems.extend(Problem(name, warning, severity="warning") for warning in config.warnings)
    if config.name and config.name != name:
        problems.append(Problem(name, f"config.pbtxt names the model '{config.name}': rename it to '{name}'"))
    return config


def _check_label_files(model_dir: Path, config: ModelConfig, problems: list[Problem]) -> None:
    for output in config.to_proto().output:
        if output.label_filename and not (model_dir / output.label_filename).is_file():
            problems.append(
                Problem(
                    model_dir.name,
                    f"output '{output.name}' names label file {output.label_filename}, which is not in "
                    f"{model_dir}; Triton refuses to load the model without it",
                )
            )


def _check_version_folders(model_dir: Path, problems: list[Problem]) -> None:
    """Folders named with digits that Triton does not read as versions (or that stop it)."""
    name = model_dir.name
    for folder in sorted(
        p for p in model_dir.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit()
    ):
        if is_version_name(folder.name):
            continue
        if int(folder.name) > INT64_MAX:
            problems.append(
                Problem(
                    name,
                    f"version folder {folder.name} is beyond {INT64_MAX} (int64): loading it stops Triton "
                    "2.51 (the server process dies); number versions from 1",
                )
            )
        else:
            problems.append(
                Problem(
                    name,
                    f"folder {folder.name} is not a version to Triton (a leading zero): it is never served; "
                    f"rename it {int(folder.name)}",
                    severity="warning",
                )
            )


def _check_versions(model_dir: Path, config: ModelConfig, problems: list[Problem]) -> None:
    name = model_dir.name
    _check_version_folders(model_dir, problems)
    found = versions(model_dir)
    if not found:
        problems.append(Problem(name, "no version folder (1/, 2/, ...): Triton serves nothing for it"))
    elif not (config.version_policy or VersionPolicy.latest(1)).serves(found):
        problems.append(
            Problem(
                name,
                f"version_policy {config.version_policy} serves none of its versions "
                f"({', '.join(map(str, found))}): Triton refuses the model (at least one version must be "
                "available under the version policy); name a version it has, or leave version_policy out",
            )
        )
    filename = model_filename(config)
    if filename is None:
        return
    for version in found:
        path = model_dir / str(version) / filename
        if not path.exists() and not path.is_symlink():
            problems.append(Problem(name, f"missing model file {path.name} in {path.parent}", version))
            continue
        try:
            check_model_source(path, name)  # a regular file, not empty, not a FIFO or a device
        except RepositoryError as exc:
            problems.append(Problem(name, exc.message, version))
            continue
        if filename.endswith(".onnx") and (config.inputs or config.outputs):  # none: auto-completed
            try:
                mismatches = check_signature(config, onnx_signature(path))
            except TritonForgeError as exc:
                problems.append(Problem(name, exc.message, version))
                continue
            problems.extend(
                Problem(name, f"config and model.onnx disagree: {m}", version) for m in mismatches
            )


def sample_inputs(
    config: ModelConfig, *, batch: int = 1, variable_dim: int = 4, seed: int = 0
) -> dict[str, Any]:
    """One request's inputs built from ``config``: -1 dims become ``variable_dim``, a batch dim is added.

    Integer inputs get small values (0-9) so that id-like inputs (token ids, indices) stay in range.
    """
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {}
    for tensor in config.inputs:
        dims = [variable_dim if d < 0 else d for d in tensor.dims]
        shape = ([batch] if config.max_batch_size > 0 else []) + dims
        dtype = tensor.dtype.to_numpy()
        if dtype == np.object_:
            arrays[tensor.name] = np.full(shape, b"tritonforge", dtype=np.object_)
        elif dtype == np.bool_:
            arrays[tensor.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(dtype, np.integer):
            arrays[tensor.name] = rng.integers(0, 10, size=shape).astype(dtype)
        else:
            arrays[tensor.name] = rng.standard_normal(size=shape).astype(dtype)
    return arrays
