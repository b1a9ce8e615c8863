"""``tritonforge push REPO URL``: a repository into object storage (s3, gs, azure), where Triton reads it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tritonforge.commands import reported
from tritonforge.commands._options import json_flag
from tritonforge.commands._output import make_console

console = make_console()


def register(app: typer.Typer) -> None:
    app.command("push")(push)


def push(
    repo: Path = typer.Argument(..., help="The model repository to upload (checked first)."),
    url: str = typer.Argument(
        ...,
        help="Where: s3://BUCKET/PREFIX, s3://http://HOST:PORT/BUCKET/PREFIX (S3-compatible), "
        "gs://BUCKET/PREFIX or as://ACCOUNT/CONTAINER/PREFIX; credentials from the environment.",
    ),
    json_output: bool = json_flag("Print the result as JSON."),
) -> None:
    """Upload REPO to the object store at URL (unchanged files skipped, configs last); print the
    --model-repository URL Triton serves it from."""
    from tritonforge.repository.store import push_repository

    with reported():
        result = push_repository(repo, url)
    if json_output:
        record = {
            "url": result.url,
            "uploaded": result.uploaded,
            "unchanged": result.unchanged,
            "bytes_sent": result.bytes_sent,
            "stale": result.stale,
        }
        typer.echo(json.dumps(record, indent=2))
        return
    console.print(
        f"pushed {len(result.uploaded)} file(s) ({result.bytes_sent:,} bytes), {len(result.unchanged)} "
        f"unchanged, to {result.url}",
        markup=False,
        highlight=False,
    )
    if result.stale:
        console.print(
            f"warning: {len(result.stale)} object(s) under the prefix are not in {repo} (e.g. "
            f"{result.stale[0]}); Triton still loads a model folder left there: remove them",
            markup=False,
            highlight=False,
        )
    console.print(
        f"serve it with: tritonserver --model-repository={result.url}", markup=False, highlight=False
    )
