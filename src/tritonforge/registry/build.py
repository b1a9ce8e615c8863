"""Helpers for model builders (``tritonforge.examples.build_*``): build keys (skip what is unchanged), steps.

A build key is the sha256 of everything that decides an artifact: the source's sha256, the export and
quantization settings, and the versions of tritonforge and the libraries that did the work. A version
whose manifest carries the same key and variant is up to date, so the script skips the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonforge.registry.core import library_versions, list_models

__all__ = ["Step", "build_key", "find_built"]


def build_key(variant: str, source_sha256: str, settings: Mapping[str, Any]) -> str:
    """The key that says whether ``variant`` built from ``source_sha256`` with ``settings`` exists."""
    from tritonforge import __version__

    blob = json.dumps(
        {
            "variant": variant,
            "source": source_sha256,
            "settings": settings,
            "tritonforge": __version__,
            "libraries": library_versions(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def find_built(repo: str | os.PathLike[str], name: str, key: str) -> int | None:
    """The version of ``name`` built with ``key``, if any."""
    root = Path(repo)
    if not (root / name).is_dir():
        return None
    for row in list_models(root, names=[name]):  # this model's manifests only, not the repository's
        if (row.manifest.get("build") or {}).get("key") == key:
            return row.version
    return None


@dataclasses.dataclass
class Step:
    """One artifact of a build: built (OK), skipped as unchanged (SKIPPED) or FAILED, with its figures."""

    model: str
    variant: str
    status: str
    version: int | None = None
    figures: str = ""
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
