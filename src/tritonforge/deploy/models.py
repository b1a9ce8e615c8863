"""The repository's model configs as the deploy reads them: each ``config.pbtxt`` once, for every step."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tritonforge.config import ModelConfig, read_config

__all__ = ["read_configs"]


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
