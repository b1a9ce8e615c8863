"""Writing the model cache's coordinator into a repository of its own (next to the user's, never in it)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tritonforge.config import DataType, InstanceGroup, InstanceKind, ModelConfig, TensorSpec
from tritonforge.repository import add_model

__all__ = [
    "CACHE_MODEL",
    "COORDINATOR",
    "DEFAULT_IDLE_S",
    "CacheBudget",
    "cache_budget_from_options",
    "parse_size",
    "write_cache_repository",
]

#: the coordinator's model name: clients ask it to load a model (input MODEL, output STATE)
CACHE_MODEL = "tritonforge_cache"
#: the coordinator's source (Python backend, standard library and numpy only)
COORDINATOR = Path(__file__).parent / "models" / "coordinator.py"
#: a model used, loaded or asked for within this many seconds is busy (never evicted)
DEFAULT_IDLE_S = 2.0
_UNITS = {"": 1, "b": 1, "k": 1024, "ki": 1024, "m": 1024**2, "mi": 1024**2, "g": 1024**3, "gi": 1024**3}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*?)(?:i?b)?\s*$", re.I)


def parse_size(text: str, *, what: str = "size") -> int:
    """Bytes of ``"512MiB"``, ``"2G"``, ``"1.5GiB"``, ``"1048576"`` (K/M/G are binary: 1024-based).

    Raises:
        ValueError: not a size, or not above 0; the message names ``what`` and the accepted forms.
    """
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"{what} {text!r} is not a size: write e.g. 512MiB, 2GiB or 1048576 (bytes)")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"{what} must be above 0, not {text!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class CacheBudget:
    """What the cache may hold: at most ``max_models`` loaded models and/or ``max_memory_bytes`` of PSS
    summed over tritonserver and its children; ``pins`` are never evicted; a model used, loaded or asked
    for within ``idle_s`` seconds (or 4x its mean request time, if longer) is busy and stays. While every
    candidate is busy, the cache may hold ``overflow`` models over ``max_models`` (default: a tenth of it, at
    least 1); past that, the least recently used model without queued requests goes even if recently used
    (Triton finishes its executions first; its next call is a miss and loads it again).

    Example:
        >>> CacheBudget(max_models=50, pins=("digits_vote",))
        CacheBudget(max_models=50, max_memory_bytes=None, pins=('digits_vote',), idle_s=2.0, overflow=None)
        >>> CacheBudget(max_models=50).ceiling
        55

    Raises:
        ValueError: no budget at all, a budget below 1, a negative idle time or overflow, or a pin named
            twice.
    """

    max_models: int | None = None
    max_memory_bytes: int | None = None
    pins: tuple[str, ...] = field(default=())
    idle_s: float = DEFAULT_IDLE_S
    overflow: int | None = None

    @property
    def ceiling(self) -> int | None:
        """The most models the cache ever holds loaded (``max_models`` plus its overflow), or ``None``."""
        if self.max_models is None:
            return None
        return self.max_models + (max(1, self.max_models // 10) if self.overflow is None else self.overflow)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pins", tuple(self.pins))
        if self.max_models is None and self.max_memory_bytes is None:
            raise ValueError("a model cache needs a budget: max_models and/or max_memory_bytes")
        for name, value in (("max_models", self.max_models), ("max_memory_bytes", self.max_memory_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1, not {value!r}")
        if self.max_models is not None and len(set(self.pins)) > self.max_models:
            raise ValueError(
                f"{len(set(self.pins))} pinned models can't fit max_models={self.max_models}: "
                "raise the budget or pin fewer"
            )
        if self.idle_s < 0:
            raise ValueError(f"idle_s must be >= 0, not {self.idle_s!r}")
        if self.overflow is not None and (
            isinstance(self.overflow, bool) or not isinstance(self.overflow, int) or self.overflow < 0
        ):
            raise ValueError(f"overflow must be an int >= 0, not {self.overflow!r}")
        if CACHE_MODEL in self.pins:
            raise ValueError(f"{CACHE_MODEL!r} is the cache itself; pin your own models")

    def describe(self) -> str:
        """One line: ``at most 50 models, 4.0 GiB (PSS); pinned: a, b``."""
        limits = [f"at most {self.max_models} models"] if self.max_models else []
        if self.max_memory_bytes:
            limits.append(f"{self.max_memory_bytes / 2**30:.1f} GiB (PSS)")
        pinned = f"; pinned: {', '.join(self.pins)}" if self.pins else ""
        return f"{', '.join(limits)}; ask {CACHE_MODEL} to load a model{pinned}"


def write_cache_repository(
    out: str | os.PathLike[str],
    budget: CacheBudget,
    *,
    repositories: Sequence[str | os.PathLike[str]] = (),
    http_url: str | None = None,
    metrics_url: str | None = None,
) -> Path:
    """Write the coordinator model (``tritonforge_cache``) into the repository ``out`` and return it.

    Serve ``out`` beside your own repository on a server in explicit model control, loading the
    coordinator (and your pins) at start::

        tritonserver --model-repository=/models --model-repository=/cache \\
            --model-control-mode=explicit --load-model=tritonforge_cache

    By default the coordinator finds the repositories, the HTTP endpoint and the metrics endpoint on
    tritonserver's command line; ``repositories`` (paths as the server sees them), ``http_url`` and
    ``metrics_url`` (``http://host:port``) say otherwise. It needs Triton's HTTP endpoint with the
    repository and statistics APIs open to it, and the standard library and numpy only.

    Raises:
        RepositoryError: ``out`` already holds a coordinator of another budget, or can't be written.
    """
    parameters = {
        "pins": ",".join(budget.pins),
        "idle_s": repr(float(budget.idle_s)),
        "max_models": str(budget.max_models or 0),
        "max_loaded_models": str(budget.ceiling or 0),
        "max_memory_bytes": str(budget.max_memory_bytes or 0),
    }
    if repositories:
        parameters["repositories"] = os.pathsep.join(str(r) for r in repositories)
    if http_url:
        parameters["http_url"] = http_url.rstrip("/")
    if metrics_url:
        parameters["metrics_url"] = metrics_url.rstrip("/").removesuffix("/metrics")
    config = ModelConfig(
        name=CACHE_MODEL,
        backend="python",
        max_batch_size=0,
        inputs=(TensorSpec(name="MODEL", dtype=DataType.STRING, dims=(1,)),),
        outputs=(TensorSpec(name="STATE", dtype=DataType.STRING, dims=(1,)),),
        # one instance: every load and unload decision is taken by one thread, in order
        instance_groups=(InstanceGroup(count=1, kind=InstanceKind.CPU),),
        parameters=parameters,
    )
    repo = Path(out)
    repo.mkdir(parents=True, exist_ok=True)
    add_model(repo, CACHE_MODEL, COORDINATOR, config, version=1, overwrite=True)
    return repo


def cache_budget_from_options(
    max_models: int | None, max_memory: str | None, pins: Sequence[str], model_control: str
) -> CacheBudget | None:
    """The budget ``serve``'s ``--cache-max-models``, ``--cache-max-memory`` and ``--pin`` ask for (``None``:
    no cache), every wrong combination refused in one line naming the option and the fix.

    Raises:
        ValueError: a budget below 1, a size that isn't one, ``--pin`` without a budget, or a cache on a
            server not in explicit model control.
    """
    if max_models is None and max_memory is None:
        if pins:
            raise ValueError("--pin needs a cache: add --cache-max-models N or --cache-max-memory SIZE")
        return None
    if max_models is not None and max_models < 1:
        raise ValueError(f"--cache-max-models must be 1 or more, not {max_models}")
    if model_control != "explicit" and model_control != "none":
        raise ValueError(
            f"a model cache loads and unloads models itself: it needs explicit model control, not "
            f"--model-control {model_control} (drop the option)"
        )
    memory = None if max_memory is None else parse_size(max_memory, what="--cache-max-memory")
    try:
        return CacheBudget(max_models=max_models, max_memory_bytes=memory, pins=tuple(pins))
    except ValueError as exc:
        raise ValueError(f"--cache-max-models/--pin: {exc}") from None
