"""YAML read with bounds: the one loader for every YAML file the project reads.

Safe (no code tags), bounded (text size, nesting depth, and the size of the value once every alias is
expanded: no alias bombs), strict about keys (a key written twice in one mapping is refused with both
line numbers, instead of the last one silently winning; keys must be strings), and every refusal is one
line saying where and how to fix it.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Mapping
from typing import Any

import yaml

from tritonforge.errors import TritonForgeError
from tritonforge.files.reading import MAX_DOCUMENT_BYTES, ErrorFactory, Reason, read_text

__all__ = [
    "MAX_YAML_NESTING",
    "MAX_YAML_NODES",
    "load_yaml",
    "load_yaml_documents",
    "read_yaml",
]

MAX_YAML_NESTING = 64
"""Brackets / indentation levels deep: real files nest a handful."""
MAX_YAML_NODES = 1_000_000
"""Values in a document once every alias is expanded: what refuses an alias bomb."""

_REPR = reprlib.Repr()
_REPR.maxstring = 60
_REPR.maxother = 60


def _show(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except Exception:  # an int of thousands of digits has no repr
        return f"<a {type(value).__name__}>"


class _Refused(Exception):
    def __init__(self, reason: Reason) -> None:
        super().__init__(reason)
        self.reason = reason


def _refused(problem: str, mark: Any, fix: str) -> _Refused:
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return _Refused(Reason(f"{problem}{where}", fix))


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing deep nesting, recursive aliases, alias expansion past ``max_nodes`` and
    keys written twice in one mapping.

    Aliases share one node, so composing stays linear in the text; what a bomb multiplies is the size
    of the expanded value, which is counted here per node (children first) before anything is built.
    """

    def __init__(self, stream: str, max_depth: int, max_nodes: int) -> None:
        super().__init__(stream)
        self._max_depth = max_depth
        self._max_nodes = max_nodes
        self._depth = 0
        self._expanded: dict[int, int] = {}  # id(node) -> its size with every alias expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._expanded:
                raise _refused(
                    f"alias *{event.anchor} refers to a value that contains it (a recursive alias)",
                    event.start_mark,
                    "refer only to values defined before (and outside) the alias",
                )
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > self._max_depth:
            raise _refused(
                f"values nest more than {self._max_depth} levels deep",
                self.peek_event().start_mark,
                "flatten the structure; these files nest a few levels",
            )
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            _check_unique_keys(node)
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        size = 1 + sum(self._expanded[id(child)] for child in children)
        if size > self._max_nodes:
            raise _refused(
                f"the YAML expands to more than {self._max_nodes} values (aliases repeating aliases)",
                node.start_mark,
                "write the values out; aliases are for a few shared blocks, not for multiplying them",
            )
        self._expanded[id(node)] = size
        return node


_MERGE = "tag:yaml.org,2002:merge"


def _check_unique_keys(node: yaml.MappingNode) -> None:
    seen: dict[tuple[str, str], Any] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE:
            continue  # complex keys are refused later as non-strings; `<<:` merges are YAML's own
        first = seen.setdefault((key.tag, key.value), key)
        if first is not key:
            name = _show(key.value)
            raise _Refused(
                Reason(
                    f"key {name} appears twice in one mapping (lines {first.start_mark.line + 1} and "
                    f"{key.start_mark.line + 1}): the second would silently replace the first",
                    f"keep one {name} (merge the two)",
                )
            )


def _load(
    text: str, error: ErrorFactory, max_chars: int, max_depth: int, max_nodes: int, every: bool
) -> list[Any]:
    if len(text) > max_chars:
        raise error(
            Reason(
                f"the YAML is {len(text)} characters long; at most {max_chars} are read",
                "check that this is the right file",
            )
        )
    loader = None
    try:
        loader = _BoundedLoader(text, max_depth, max_nodes)  # the reader already checks the characters
        if not every:
            documents = [loader.get_single_data()]
        else:
            documents = []
            while loader.check_data():
                documents.append(loader.get_data())
    except _Refused as exc:
        raise error(exc.reason) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if isinstance(exc, yaml.reader.ReaderError):
            problem = f"{exc.reason} (character #x{exc.character:04x} at position {exc.position})"
        else:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())[:200]
        raise error(
            Reason(
                f"the YAML does not parse{where}: {problem}",
                "fix the YAML syntax (indentation, ':' after keys, closed brackets)",
            )
        ) from None
    except (ValueError, OverflowError, RecursionError) as exc:
        # e.g. int() of a 5000-digit number: Python refuses to convert it
        raise error(
            Reason(
                f"the YAML holds a value that can't be read: {str(exc).split(';')[0][:100]}",
                "write numbers of a sensible size",
            )
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    for data in documents:
        bad = _non_string_key(data)
        if bad is not None:
            path, key = bad
            raise error(
                Reason(
                    f"key {_show(key)}{' under ' + path if path else ''} is not a string (YAML reads 1, "
                    "true, yes, null or 1.5 as numbers, booleans and null)",
                    "quote the key, e.g. '1': or 'yes':",
                )
            )
    return documents


def load_yaml(
    text: str,
    *,
    error: ErrorFactory = TritonForgeError,
    max_chars: int = MAX_DOCUMENT_BYTES,
    max_depth: int = MAX_YAML_NESTING,
    max_nodes: int = MAX_YAML_NODES,
) -> Any:
    """The value of the one YAML document in ``text``.

    Example:
        >>> load_yaml("models: {a: {error_rate: 0.01}}")
        {'models': {'a': {'error_rate': 0.01}}}

    Raises:
        whatever ``error`` makes (called with a one-line :class:`~tritonforge.files.Reason`): the text is
        too long, does not parse, nests too deep, expands too far, writes a key twice in one mapping,
        holds an unreadable value (an integer of thousands of digits) or a key that is not a string.
    """
    return _load(text, error, max_chars, max_depth, max_nodes, every=False)[0]


def load_yaml_documents(
    text: str,
    *,
    error: ErrorFactory = TritonForgeError,
    max_chars: int = MAX_DOCUMENT_BYTES,
    max_depth: int = MAX_YAML_NESTING,
    max_nodes: int = MAX_YAML_NODES,
) -> list[Any]:
    """Every document of a multi-document YAML ``text`` (``---`` between them), each as :func:`load_yaml`."""
    return _load(text, error, max_chars, max_depth, max_nodes, every=True)


def read_yaml(
    path: str | os.PathLike[str],
    *,
    what: str = "YAML file",
    error: ErrorFactory = TritonForgeError,
    limit: int = MAX_DOCUMENT_BYTES,
    every: bool = False,
) -> Any:
    """The YAML value of regular file ``path`` (read as :func:`~tritonforge.files.read_text`, loaded as
    :func:`load_yaml`; with ``every``, the list of its documents). Every message names the file.

    Raises:
        whatever ``error`` makes, as :func:`~tritonforge.files.read_text` and :func:`load_yaml`.
    """
    text = read_text(path, what=what, limit=limit, error=error)

    def named(reason: str) -> Exception:
        problem = getattr(reason, "problem", reason)
        return error(Reason(f"{what} {path}: {problem}", getattr(reason, "fix", "")))

    documents = _load(text, named, limit, MAX_YAML_NESTING, MAX_YAML_NODES, every=every)
    return documents if every else documents[0]


def _non_string_key(value: Any) -> tuple[str, Any] | None:
    """The first mapping key that is not a string and the path to it, depth-first; None when all are."""
    found = _first_bad_key(value)
    if found is None:
        return None
    parts, key = found
    path = ""
    for part in reversed(parts):
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{_show(part)[1:-1]}" if path else _show(part)[1:-1]
    return path, key


def _first_bad_key(value: Any) -> tuple[list[str | int], Any] | None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return [], key
            found = _first_bad_key(item)
            if found is not None:
                found[0].append(key)
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_bad_key(item)
            if found is not None:
                found[0].append(index)
                return found
    return None
