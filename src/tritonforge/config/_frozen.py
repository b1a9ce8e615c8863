"""An immutable, hashable mapping so that frozen config dataclasses stay hashable."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")

__all__ = ["FrozenDict"]


class FrozenDict(Mapping[K, V], Generic[K, V]):
    """A read-only mapping that keeps insertion order and can be hashed.

    ``MappingProxyType`` is read-only but not hashable, which would make every config dataclass that
    holds a mapping unhashable; this keeps ``hash(config)`` working.

    Example:
        >>> FrozenDict({"a": "1"})["a"]
        '1'
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            # Order-independent, like dict equality.
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenDict, (self._data,))
