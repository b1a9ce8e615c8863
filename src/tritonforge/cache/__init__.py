"""A model cache on one Triton server: load a model on its first request, unload the least recently used
idle ones under a budget (a model count or measured memory), never a pinned or busy one.

The decisions are taken inside Triton by one Python-backend model, the *coordinator*
(:data:`CACHE_MODEL`, written by :func:`write_cache_repository`), so every client (ours, plain
tritonclient, another language) sees the same cache and none can undo another's load. ``tritonforge serve
REPO --cache-max-models N`` runs it on the embedded server; the same folder serves on NVIDIA's image.
"""

from __future__ import annotations

from tritonforge.cache.writer import (
    CACHE_MODEL,
    COORDINATOR,
    DEFAULT_IDLE_S,
    CacheBudget,
    cache_budget_from_options,
    parse_size,
    write_cache_repository,
)

__all__ = [
    "CACHE_MODEL",
    "COORDINATOR",
    "DEFAULT_IDLE_S",
    "CacheBudget",
    "cache_budget_from_options",
    "parse_size",
    "write_cache_repository",
]
