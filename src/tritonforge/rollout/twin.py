"""The repository side of a rollout: the twin model, the splitter in the model's place, and the way back.

During a rollout the model's name is served by the *splitter* (``models/splitter.py``, a Python-backend
model) and the two versions by a *twin* model ``<model>__rollout`` (the stable and the candidate version
folders, hard-linked). Every change goes through the repository's writer: the twin is staged outside the
repository and appears by one rename (and leaves by one), the model's own folder is rewritten with
:func:`~tritonforge.repository.writer.amend_version` (the version folder staged whole and swapped in,
then the config), so a polling server never sees half a change. The splitter's config names its twin in
:data:`~tritonforge.server.embedded.LOAD_WITH`, so a server restarted in explicit mode with the model in
``--load-model`` loads the twin with it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tritonforge.config import DynamicBatching, InstanceGroup, ModelConfig, VersionPolicy, write_config
from tritonforge.repository.writer import amend_version, load_config, make_staging_dir
from tritonforge.rollout.state import RolloutState, StatePaths
from tritonforge.server.embedded import LOAD_WITH

__all__ = [
    "SPLITTER",
    "SPLITTER_FILE",
    "SPLITTER_MARK",
    "TWIN_SUFFIX",
    "install_splitter",
    "remove_twin",
    "restore_model",
    "splitter_on_disk",
    "write_alias",
    "write_twin",
]

TWIN_SUFFIX = "__rollout"
SPLITTER = Path(__file__).parent / "models" / "splitter.py"
SPLITTER_MARK = "tritonforge_rollout"
# the splitter's file in the stable version's folder (the config's default_model_filename): not
# model.py, which a Python-backend model (a pipeline's router) has there itself, and which the twin
# shares through a hard link
SPLITTER_FILE = "tritonforge_rollout_splitter.py"
# what the splitter leaves in the stable version's folder: its file and Python's bytecode caches
_SPLITTER_FILES = (SPLITTER_FILE, "__pycache__")


def write_twin(repo: Path, state: RolloutState) -> Path:
    """``<model>__rollout`` with the stable and the candidate version (hard links) and the model's own
    config serving both; written once (kept when it is there, e.g. on resume)."""
    original = ModelConfig.from_pbtxt(state.original_config)
    return write_alias(repo, state.model, state.twin, (state.stable, state.candidate), original)


def write_alias(repo: Path, model: str, alias: str, chosen: tuple[int, ...], config: ModelConfig) -> Path:
    """A model ``alias`` serving ``chosen`` versions of ``model`` (their folders hard-linked) under
    ``config`` renamed; staged outside the repository and moved in by one rename. Kept when it exists."""
    alias_dir = repo / alias
    if alias_dir.exists():
        return alias_dir
    staging = make_staging_dir(repo)
    try:
        folder = staging / alias
        folder.mkdir()
        for version in chosen:
            _link_tree(repo / model / str(version), folder / str(version))
        write_config(config.replace(name=alias, version_policy=VersionPolicy.specific(*chosen)), folder)
        folder.rename(alias_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return alias_dir


def splitter_config(state: RolloutState, paths: StatePaths) -> ModelConfig:
    """The config that serves the model's name through the splitter, with the model's own signature."""
    original = ModelConfig.from_pbtxt(state.original_config)
    return ModelConfig(
        name=state.model,
        backend="python",
        max_batch_size=original.max_batch_size,
        inputs=original.inputs,
        outputs=original.outputs,
        dynamic_batching=DynamicBatching() if original.max_batch_size > 0 else None,
        instance_groups=(InstanceGroup(count=2),),
        version_policy=VersionPolicy.specific(state.stable),
        default_model_filename=SPLITTER_FILE,
        parameters={
            SPLITTER_MARK: "splitter",
            LOAD_WITH: state.twin,
            "rollout_target": state.twin,
            "rollout_state": str(paths.state.relative_to(paths.root)),
            "rollout_stats": paths.stats_prefix,
        },
    )


def install_splitter(repo: Path, state: RolloutState, paths: StatePaths) -> None:
    """The model's stable version folder gets the splitter's own file (:data:`SPLITTER_FILE`, never the
    model's ``model.py``) and the model the splitter's config, in one staged rewrite."""
    amend_version(
        repo,
        state.model,
        state.stable,
        config=splitter_config(state, paths),
        add_files={SPLITTER_FILE: SPLITTER},
    )


def restore_model(repo: Path, state: RolloutState) -> None:
    """The model's own config back (serving its stable version) and the splitter's files gone, in one
    staged rewrite. A promote then changes the served version through the registry. A Python model's own
    ``model.py`` was never touched: the splitter has a file of its own.
    """
    original = ModelConfig.from_pbtxt(state.original_config)
    amend_version(
        repo,
        state.model,
        state.stable,
        config=original.replace(version_policy=VersionPolicy.specific(state.stable)),
        drop_files=_SPLITTER_FILES,
    )


def splitter_on_disk(repo: Path, state: RolloutState) -> bool:
    """Whether the model's folder still holds the splitter (its config or its file)."""
    stable_dir = repo / state.model / str(state.stable)
    if (stable_dir / SPLITTER_FILE).exists():
        return True
    if any((stable_dir / "__pycache__").glob(f"{Path(SPLITTER_FILE).stem}.*")):
        return True
    return bool(load_config(repo / state.model).parameters.get(SPLITTER_MARK))


def remove_twin(repo: Path, twin: str) -> None:
    """The twin's (or an alias's) folder moved out of the repository by one rename, then deleted."""
    twin_dir = repo / twin
    if not twin_dir.exists():
        return
    staging = make_staging_dir(repo)
    try:
        twin_dir.rename(staging / twin)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_tree(source: Path, destination: Path) -> None:
    """Copy a version folder by hard links (no extra disk for big models), copies across filesystems;
    the splitter's file and Python's bytecode caches are left out."""
    destination.mkdir(parents=True)
    for item in source.iterdir():
        if item.name in _SPLITTER_FILES:
            continue
        target = destination / item.name
        if item.is_dir():
            _link_tree(item, target)
        else:
            try:
                os.link(item, target)
            except OSError:
                shutil.copy2(item, target)
