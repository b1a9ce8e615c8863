"""The CLI reference page, generated from the typer app: a mkdocs hook, and a script that prints the page.

``mkdocs.yml`` lists this file under ``hooks:``, so every build of the site writes ``docs/cli.md``'s
reference from the ``tritonforge`` command as it is (no generated copy in git to fall out of date).
``python tools/cli_reference.py`` prints the same Markdown. Hidden options (old spellings kept as
aliases) are left out; every other command, argument and option is listed with its type, default and
help.
"""

from __future__ import annotations

import html
import sys
from typing import Any

import typer

#: where the generated reference goes in docs/cli.md
MARKER = "<!-- cli-reference -->"


def _text(value: str) -> str:
    """Help text as Markdown shown literally (``<ref>`` is text, not an HTML tag); `code` stays code."""
    parts = value.split("`")
    for i in range(0, len(parts), 2):  # outside backticks only: inside them Markdown shows text as is
        parts[i] = html.escape(parts[i], quote=False).replace("*", "\\*").replace("_", "\\_")
    return "`".join(parts).replace("|", "\\|")


def _cell(value: str) -> str:
    return " ".join(_text(value).split())


def _code(value: str) -> str:
    # in a table cell a pipe ends the cell even inside backticks, and an escaped one shows its backslash
    return "<code>" + html.escape(value, quote=False).replace("|", "&#124;") + "</code>"


# typer ships its own copy of click (typer 0.29+), so commands and parameters are read through click's public
# methods (get_params, get_help_record, collect_usage_pieces, list_commands), which typer's classes keep.


def _command(cmd: Any, path: list[str], level: int) -> list[str]:
    ctx = cmd.context_class(cmd, info_name=path[-1])
    lines = [f"{'#' * level} `{' '.join(path)}`", ""]
    if cmd.help:
        lines += [_text(cmd.help.strip()), ""]
    usage = " ".join(cmd.collect_usage_pieces(ctx))
    lines += ["```console", f"$ {' '.join(path)} {usage}".rstrip(), "```", ""]
    params = [p for p in cmd.get_params(ctx) if not getattr(p, "hidden", False)]
    params = [p for p in params if p.name != "help"]
    records = [p.get_help_record(ctx) for p in params]
    records = [r for r in records if r is not None]
    if records:
        lines += ["| argument / option | what |", "|---|---|"]
        lines += [f"| {_code(names)} | {_cell(text)} |" for names, text in records]
        lines.append("")
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                lines += _command(sub, [*path, name], min(level + 1, 4))
    return lines


def reference() -> str:
    """The reference of every visible command of ``tritonforge``, as Markdown (``##`` per verb)."""
    from tritonforge.cli import app

    root = typer.main.get_command(app)
    ctx = root.context_class(root, info_name="tritonforge")
    lines: list[str] = []
    for name in root.list_commands(ctx):
        cmd = root.get_command(ctx, name)
        if cmd is not None and not cmd.hidden:
            lines += _command(cmd, ["tritonforge", name], 2)
    return "\n".join(lines).rstrip() + "\n"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """mkdocs hook: put the generated reference where docs/cli.md has the marker."""
    if page.file.src_uri != "cli.md":
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/cli.md has lost its {MARKER!r} line: put it back where the reference goes")
    return markdown.replace(MARKER, reference())


if __name__ == "__main__":
    sys.stdout.write(reference())
