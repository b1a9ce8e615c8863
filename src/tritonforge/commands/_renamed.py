"""Old option spellings kept working for one release: each prints one deprecation line on stderr.

A verb names its renamed options where it is defined, and :func:`install` (called by
:mod:`tritonforge.cli` once every verb is registered) makes its command accept them::

    @renamed({"--batch": "--batch-size", "--repository": "--repo"})
    def bench_command(...): ...

``tritonforge bench m --batch 4`` then runs as ``--batch-size 4`` and says so on stderr. The old
spellings are not options of the command, so ``--help`` shows only the current ones (the glossary in
``docs/cli-vocabulary.md`` names each old spelling beside its new one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import typer
from typer.core import TyperCommand

__all__ = ["RENAMED_ATTR", "deprecated", "install", "renamed", "renames_of"]

F = TypeVar("F", bound=Callable[..., Any])

RENAMED_ATTR = "__tritonforge_renamed__"
"""The attribute of a verb's function holding its ``{old: new}`` option spellings."""


def renamed(old_to_new: Mapping[str, str]) -> Callable[[F], F]:
    """Mark ``verb`` as taking each old option spelling of ``old_to_new`` as its new one (deprecated)."""
    for old, new in old_to_new.items():
        if not (old.startswith("-") and new.startswith("-")):
            raise ValueError(f"renamed options are flags such as --old: {old!r} -> {new!r}")

    def mark(verb: F) -> F:
        setattr(verb, RENAMED_ATTR, {**getattr(verb, RENAMED_ATTR, {}), **old_to_new})
        return verb

    return mark


def renames_of(verb: Callable[..., Any] | None) -> dict[str, str]:
    """The ``{old: new}`` option spellings ``verb`` still accepts (empty if none)."""
    return dict(getattr(verb, RENAMED_ATTR, None) or {})


def deprecated(old: str, new: str, *, command: str = "") -> None:
    """The one line on stderr that says an old spelling was used and what replaces it."""
    where = f"`{command} {old}`" if command else f"`{old}`"
    from tritonforge.commands import print_error  # the package imports this module: not at the top

    print_error(f"{where} is now `{new}`; the old spelling goes in the next release", prefix="deprecated")


def _rewrite(args: list[str], renames: Mapping[str, str], command: str) -> list[str]:
    out: list[str] = []
    said: set[str] = set()
    for i, arg in enumerate(args):
        if arg == "--":  # what follows is not ours to read
            return out + args[i:]
        flag, eq, value = arg.partition("=")
        if flag in renames:
            if flag not in said:  # once per spelling, however often it is repeated
                deprecated(flag, renames[flag], command=command)
                said.add(flag)
            arg = renames[flag] + eq + value
        out.append(arg)
    return out


class _Renaming(TyperCommand):
    """A typer command that reads its callback's old option spellings as the new ones."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        renames = renames_of(self.callback)
        if renames:
            args = _rewrite(list(args), renames, ctx.command_path)
        return super().parse_args(ctx, args)


def _command_infos(app: typer.Typer) -> Iterator[Any]:
    yield from app.registered_commands
    for group in app.registered_groups:
        if group.typer_instance is not None:
            yield from _command_infos(group.typer_instance)


def install(app: typer.Typer) -> None:
    """Let every command of ``app`` (and of its groups) that has renamed options accept the old ones."""
    for info in _command_infos(app):
        if not renames_of(info.callback):
            continue
        cls = info.cls if isinstance(info.cls, type) else TyperCommand
        if not issubclass(cls, _Renaming):
            info.cls = (
                _Renaming if cls is TyperCommand else type(f"Renaming{cls.__name__}", (_Renaming, cls), {})
            )
