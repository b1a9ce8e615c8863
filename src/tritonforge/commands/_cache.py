"""The model cache's options, one definition for every verb that runs the cache (``serve``, ``deploy``):
the same names, help and value syntax, read by :func:`tritonforge.cache.cache_budget_from_options`."""

from __future__ import annotations

import typer

__all__ = ["CACHE_MAX_MEMORY", "CACHE_MAX_MODELS", "PIN"]

CACHE_MAX_MODELS = typer.Option(
    None,
    "--cache-max-models",
    help="Run a model cache: a model loads on its first request; above N loaded models the least "
    "recently used idle ones are unloaded (explicit model control). See docs/many-models.md.",
)
CACHE_MAX_MEMORY = typer.Option(
    None,
    "--cache-max-memory",
    help="Run a model cache under a memory budget (e.g. 4GiB): the PSS of tritonserver and its "
    "processes; least recently used idle models are unloaded above it.",
)
PIN = typer.Option([], "--pin", help="With a cache: a model loaded at start and never unloaded (repeatable).")
