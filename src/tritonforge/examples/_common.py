"""What the build scripts share: their command line and the table of steps they print."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tritonforge.registry import Step

DEFAULT_REPO = Path("model_repository")


def run(build: Callable[..., list[Step]], description: str, argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repo", type=Path, default=DEFAULT_REPO, help="the model repository to build into")
    parser.add_argument("--force", action="store_true", help="rebuild even when an identical version exists")
    parser.add_argument("--json", type=Path, help="also write the steps as JSON here")
    args = parser.parse_args(argv)
    console = Console()
    try:
        steps = build(args.repo, force=args.force, console=console)
    except Exception as exc:  # the message is what the user needs; the traceback is noise here
        from tritonforge.errors import TritonForgeError

        if not isinstance(exc, TritonForgeError):
            raise
        console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
        return 1
    print_steps(console, steps)
    if args.json:
        args.json.write_text(json.dumps([s.as_dict() for s in steps], indent=2))
    return 0 if all(s.status != "FAILED" for s in steps) else 1


def print_steps(console: Console, steps: Sequence[Step]) -> None:
    table = Table(title="build steps")
    for column in ("model", "variant", "status", "version", "figures", "detail"):
        table.add_column(column)
    colours = {"OK": "green", "SKIPPED": "yellow", "FAILED": "red"}
    for s in steps:
        table.add_row(
            s.model,
            s.variant,
            f"[{colours.get(s.status, 'white')}]{s.status}[/]",
            "" if s.version is None else str(s.version),
            s.figures,
            s.detail,
        )
    console.print(table)


if __name__ == "__main__":
    sys.exit("run one of the build_*.py scripts")
