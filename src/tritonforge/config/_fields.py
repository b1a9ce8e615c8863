"""Field checks the config dataclasses share: integer tuples, dimensions, counts and ``extra`` text.

Each helper raises ``ConfigError`` naming the owning message and field; the dataclasses in ``parts.py``,
``optimization.py`` and ``model.py`` call them from ``__post_init__``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from tritonforge.errors import ConfigError

WILDCARD_DIM = -1


def _set(obj: object, name: str, value: Any) -> None:
    # Frozen dataclasses normalise their own inputs (lists -> tuples, str -> enum) in __post_init__.
    object.__setattr__(obj, name, value)


def _int_tuple(owner: str, field: str, values: Iterable[Any]) -> tuple[int, ...]:
    try:
        items = tuple(values)
    except TypeError as exc:
        raise ConfigError(f"{owner}: {field} must be a sequence of integers, got {values!r}") from exc
    for item in items:
        # bool is an int subclass; True as a dimension is always a mistake.
        if isinstance(item, bool) or not isinstance(item, int):
            raise ConfigError(f"{owner}: {field} must hold integers, got {item!r} in {items!r}")
    return items


def _check_dims(owner: str, field: str, dims: Sequence[int], *, wildcard: bool = True) -> None:
    for index, dim in enumerate(dims):
        if dim >= 1 or (wildcard and dim == WILDCARD_DIM):
            continue
        hint = "an integer >= 1, or -1 for a variable-size dimension" if wildcard else "an integer >= 1"
        raise ConfigError(f"{owner}: {field}[{index}] is {dim}; each dimension must be {hint}")


def _element_count(dims: Sequence[int]) -> int:
    return -1 if WILDCARD_DIM in dims else math.prod(dims)


def _segments(dims: Sequence[int]) -> list[int]:
    """Element counts of the runs between variable-size dims: [2, 4, -1, 6] -> [8, 6]."""
    counts, current = [], 1
    for dim in dims:
        if dim == WILDCARD_DIM:
            counts.append(current)
            current = 1
        else:
            current *= dim
    counts.append(current)
    return counts


def canonical_extra(owner: str, extra: Any, *message_types: Any) -> str:
    """``extra`` text in one canonical form (so equal configs compare equal), parsed as the first of
    ``message_types`` that accepts it.

    Raises:
        ConfigError: naming ``owner``, for text that is not a str or not valid text of those messages.
    """
    from google.protobuf import text_format

    if not isinstance(extra, str):
        raise ConfigError(f"{owner}: extra must be config.pbtxt text (a str), got {extra!r}")
    if not extra.strip():
        return ""
    problem = ""
    for message_type in message_types:
        message = message_type()
        try:
            text_format.Parse(extra, message)
        except text_format.ParseError as exc:
            problem = problem or str(exc)
            continue
        return text_format.MessageToString(message, as_one_line=True).strip()
    names = " or ".join(t.DESCRIPTOR.name for t in message_types)
    raise ConfigError(f"{owner}: extra is not valid {names} text: {problem}")


def _check_extra(obj: Any, owner: str, *message_types: Any) -> None:
    _set(obj, "extra", canonical_extra(owner, obj.extra, *message_types))


def _check_non_negative(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{owner}: {name} must be an integer >= 0, got {value!r}")


def _check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{owner}: {name} must be an integer >= 1, got {value!r}")
