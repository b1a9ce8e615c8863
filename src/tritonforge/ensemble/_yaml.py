"""YAML read with bounds: size, nesting depth and expanded size (no alias bombs), string keys only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from tritonforge.ensemble._limits import MAX_NESTING, MAX_NODES, MAX_SPEC_CHARS, show

__all__ = ["SpecTextError", "load_bounded"]


class SpecTextError(Exception):
    """The text is not a readable spec; ``problem`` and ``fix`` go into an issue as they are."""

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, refusing deep nesting, recursive aliases and alias expansion past MAX_NODES.

    Aliases share one node, so composing stays linear in the text; what a bomb multiplies is the size
    of the expanded value, which is counted here per node (children first) before anything is built.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
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
                    "refer only to values defined before (and outside) the alias.",
                )
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_NESTING:
            raise _refused(
                f"values nest more than {MAX_NESTING} levels deep",
                self.peek_event().start_mark,
                "flatten the structure; a spec nests a few levels.",
            )
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = []
        size = 1 + sum(self._expanded[id(child)] for child in children)
        if size > MAX_NODES:
            raise _refused(
                f"the spec expands to more than {MAX_NODES} values (YAML aliases repeating aliases)",
                node.start_mark,
                "write the values out; aliases are for a few shared blocks, not for multiplying them.",
            )
        self._expanded[id(node)] = size
        return node


def _refused(problem: str, mark: Any, fix: str) -> SpecTextError:
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return SpecTextError(f"{problem}{where}; the spec is refused.", fix)


def load_bounded(text: str) -> Any:
    """The value of YAML ``text``, or ``SpecTextError`` saying what is wrong and where.

    Raises:
        SpecTextError: the text is too long, does not parse, nests too deep, expands too far, holds an
            unreadable value (an integer of thousands of digits) or a mapping key that is not a string.
    """
    if len(text) > MAX_SPEC_CHARS:
        raise SpecTextError(
            f"the spec is {len(text)} characters long; at most {MAX_SPEC_CHARS} are read.",
            "check that this is the right file; a spec is a few kilobytes.",
        )
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader already checks the characters
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if isinstance(exc, yaml.reader.ReaderError):
            problem = f"{exc.reason} (character #x{exc.character:04x} at position {exc.position})"
        else:
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())[:200]
        raise SpecTextError(
            f"the YAML does not parse{where}: {problem}.",
            "fix the YAML syntax (indentation, ':' after keys, closed brackets).",
        ) from None
    except (ValueError, OverflowError, RecursionError) as exc:
        # e.g. int() of a 5000-digit number: Python refuses to convert it
        raise SpecTextError(
            f"the YAML holds a value that can't be read: {str(exc).split(';')[0][:100]}.",
            "write numbers of a sensible size.",
        ) from None
    finally:
        if loader is not None:
            loader.dispose()
    bad = _non_string_key(data)
    if bad is not None:
        path, key = bad
        raise SpecTextError(
            f"key {show(key)}{' under ' + path if path else ''} is not a string (YAML reads 1, true, "
            "yes, null or 1.5 as numbers, booleans and null).",
            "quote the key, e.g. '1': or 'yes':.",
        )
    return data


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
            path += f".{show(part)[1:-1]}" if path else show(part)[1:-1]
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
