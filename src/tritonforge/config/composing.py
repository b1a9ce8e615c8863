"""The walk over an ensemble's composing models: a model, then every model its ensemble steps run
(recursively), each once, breadth first.

It does no I/O, so one walker serves every source of configs — a live server (sync or asyncio), a
repository on disk, compiled pipeline specs: iterate it for the next model to look at, and hand back the
models that model's ensemble steps run with :meth:`ComposingWalk.add` (nothing for a model that is not an
ensemble, or whose config can't be had)::

    walk = ComposingWalk("text_pipeline")
    for name in walk:
        config = read_config(repo / name / "config.pbtxt")
        walk.add(step.model_name for step in config.ensemble_steps or ())
    walk.found  # ("text_pipeline", "tokenizer", "encoder", ...)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

__all__ = ["ComposingWalk"]


class ComposingWalk:
    """A breadth-first walk from ``model`` over the models ensemble steps run; ``found`` is the models met
    so far in order, ``model`` first. A model named twice (a diamond, a cycle) is visited once."""

    def __init__(self, model: str) -> None:
        self._pending: deque[str] = deque([model])
        self._found: list[str] = []
        self._seen: set[str] = set()  # the same models as _found: a walk of n models is O(n), not O(n^2)

    def __iter__(self) -> Iterator[str]:
        while self._pending:
            name = self._pending.popleft()
            if name in self._seen:
                continue
            self._seen.add(name)
            self._found.append(name)
            yield name

    def add(self, models: Iterable[str]) -> None:
        """The models the last model yielded runs in its ensemble steps (walked after those already due)."""
        self._pending.extend(models)

    @property
    def found(self) -> tuple[str, ...]:
        return tuple(self._found)
