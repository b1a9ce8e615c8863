"""The repository's model configs as the deploy reads them: each ``config.pbtxt`` once, for every step."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tritonforge.config import ModelConfig, read_config
from tritonforge.errors import DeployError

__all__ = ["checked_configs", "instance_counts", "python_models", "read_configs", "repository_models"]


def read_configs(repository: Path, known: Mapping[str, ModelConfig] | None = None) -> dict[str, ModelConfig]:
    """Each model's config in ``repository`` (the folders with a ``config.pbtxt``, by name): what the
    deploy's steps ask of the models is taken from these. ``known``: configs read already (the offline
    checks'), used instead of reading those files again.

    Raises:
        ConfigError: a config that doesn't parse (``repository_models`` checks the repository first).
    """
    known = known or {}
    return {
        folder.name: known.get(folder.name) or read_config(folder)
        for folder in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file())
    }


def python_models(repository: Path, configs: Mapping[str, ModelConfig] | None = None) -> list[str]:
    """The models served by Triton's Python backend (their imports must be in the image)."""
    configs = read_configs(repository) if configs is None else configs
    return [name for name, config in configs.items() if config.backend == "python"]


def repository_models(repository: Path) -> dict[str, int]:
    """Each model of ``repository`` and its instance count (ensembles: 0, they run no instances).

    Raises:
        DeployError: no repository there, or one the offline checks reject.
    """
    return instance_counts(checked_configs(repository))


def checked_configs(repository: Path) -> dict[str, ModelConfig]:
    """The configs of ``repository``'s models (folders with a ``config.pbtxt``, by name) once it passes its
    offline checks, each read once: the checks' own reading is kept.

    Raises:
        DeployError: no repository there, one the offline checks reject, or one without models.
    """
    from tritonforge.repository.checker import check_repository_configs

    if not repository.is_dir():
        raise DeployError(f"no model repository at {repository} (build one first: `tritonforge build`)")
    problems, checked = check_repository_configs(repository)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        listed = "; ".join(f"{p.model}: {p.message}" for p in errors[:3])
        raise DeployError(f"{repository} fails its offline checks ({listed}); run `tritonforge validate`")
    configs = read_configs(repository, checked)
    if not configs:
        raise DeployError(f"{repository} has no models to deploy")
    return configs


def instance_counts(configs: Mapping[str, ModelConfig]) -> dict[str, int]:
    """Each model's instance count (ensembles: 0, they run no instances)."""
    return {
        name: 0
        if config.platform == "ensemble" or config.ensemble_steps
        else sum(g.count for g in config.instance_groups) or 1
        for name, config in configs.items()
    }
