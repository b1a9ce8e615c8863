"""``tritonforge batch-infer``: a dataset through a model into Parquet shards (:mod:`tritonforge.batch`)."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from tritonforge.commands import fail, print_error
from tritonforge.commands._options import json_flag, out_option
from tritonforge.commands._output import print_json
from tritonforge.commands._renamed import renamed
from tritonforge.commands.access import with_access
from tritonforge.errors import TritonForgeError

console = Console()
err_console = Console(stderr=True)


def _mapping(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, columns = item.partition("=")
        if not sep or not name or not columns:
            raise ValueError(f"--map {item!r}: expected INPUT=COLUMN (or INPUT=col_a,col_b or INPUT='col_*')")
        out.setdefault(name, []).extend(c for c in columns.split(",") if c)
    return out


class _Progress:
    """The rich progress bar of a run: rows done of this process's share, rows/s, ETA, failures."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task: Any = None
        self.failed = 0
        self.rows = 0
        self.started = time.perf_counter()

    def __call__(self, kind: str, data: Mapping[str, Any]) -> None:
        if kind == "start":
            self.failed = int(data["failed_before"])
            if self.quiet:
                return
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[failed]}"),
                console=err_console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task(
                data["model"],
                total=data["rows_total"],
                completed=data["rows_skipped"],
                rate="",
                failed=self._failed_text(),
            )
            self.started = time.perf_counter()
        elif kind == "rows" and self.progress is not None:
            self.rows += int(data["rows"])
            self.failed += int(data.get("failed", 0))
            rate = self.rows / max(1e-9, time.perf_counter() - self.started)
            self.progress.update(
                self.task, advance=int(data["rows"]), rate=f"{rate:,.0f} rows/s", failed=self._failed_text()
            )
        elif kind == "stopping" and self.progress is not None:
            what = "SIGTERM: finishing shards under way" if data["reason"] == "signal" else data["reason"]
            self.progress.console.print(f"[yellow]{what}[/]")
        elif kind == "done" and self.progress is not None:
            self.progress.stop()

    def _failed_text(self) -> str:
        return f"[red]{self.failed:,} failed[/]" if self.failed else "0 failed"

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _summary(result: Any) -> Table:
    table = Table(title=f"batch-infer -> {result.output}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("status", result.status),
        ("rows (this process's shards)", f"{result.rows_total:,}"),
        ("done before (resumed)", f"{result.rows_skipped:,}"),
        ("answered now", f"{result.rows_ok:,}"),
        ("failed now", f"{result.rows_failed:,}"),
        ("shards finished", f"{result.shards_done}/{result.shards_total}"),
        ("time", f"{result.elapsed_s:.2f} s"),
        ("of which startup (until the first request)", f"{result.startup_s:.2f} s"),
        ("throughput", f"{result.rows_per_s:,.0f} rows/s"),
        ("requests (on the lanes' streams)", f"{result.requests:,} ({result.requests_streamed:,})"),
        ("request p50 / p99", f"{result.latencies_ms['p50']:.2f} / {result.latencies_ms['p99']:.2f} ms"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def _server_table(result: Any) -> Table:
    table = Table(title="Triton server-side, per request (statistics API)")
    for column in ("model", "requests", "mean batch", "queue µs", "input µs", "infer µs", "output µs"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for s in result.server:
        table.add_row(
            s.model,
            f"{s.requests:,}",
            f"{s.mean_batch:.1f}",
            f"{s.queue_us:,.0f}",
            f"{s.compute_input_us:,.0f}",
            f"{s.compute_infer_us:,.0f}",
            f"{s.compute_output_us:,.0f}",
        )
    return table


def register(app: typer.Typer) -> None:
    @app.command("batch-infer")
    @renamed({"--output": "--out", "--outputs": "--output-name"})
    @with_access
    def batch_infer(
        model: str = typer.Argument(..., help="The model or ensemble to run."),
        url: list[str] = typer.Option(
            ..., "--url", help="Triton gRPC endpoint HOST:PORT; repeat for several."
        ),
        input: list[str] = typer.Option(
            ..., "--input", help="Parquet/CSV/JSONL/NumPy file, folder or glob; repeatable."
        ),
        output: Path = out_option(None, "Folder for the Parquet shards and the manifest."),
        map_: list[str] = typer.Option(
            [], "--map", help="INPUT=COLUMN, INPUT=col_a,col_b or INPUT='col_*' (default: by name)."
        ),
        outputs: list[str] = typer.Option([], "--output-name", help="Outputs to keep (default: all)."),
        version: str | None = typer.Option(None, help="Model version (default: the server's choice)."),
        batch_size: int | None = typer.Option(
            None, help="Rows per request (default: the model's max batch)."
        ),
        concurrency: int = typer.Option(8, help="Requests in flight."),
        shard_rows: int = typer.Option(10_000, help="Rows per output shard (the unit of resuming)."),
        shard: str = typer.Option("0/1", help="K/N: this process takes shards i with i % N == K."),
        max_errors: int = typer.Option(1000, help="Stop once more rows have failed (-1: no limit)."),
        grace_s: float = typer.Option(20.0, help="On SIGTERM, seconds the shards under way may take."),
        timeout_s: float | None = typer.Option(None, help="Per-request timeout."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
        no_streams: bool = typer.Option(
            False, "--no-streams", help="Every request a gRPC call (not messages of the lanes' own streams)."
        ),
        as_json: bool = json_flag("The run's figures as JSON on stdout instead of the tables."),
        access: object = None,
    ) -> None:
        """Run MODEL on every row of --input; write row_id + outputs as Parquet shards into --out.

        A run started again on the same --out does only what is left. Exit codes: 0 every row answered,
        3 finished with failed rows (see --out/_errors/), 4 stopped at --max-errors, 143 stopped by
        SIGTERM/SIGINT (run again to resume), 1 anything else.
        """
        from tritonforge.batch import parse_shard, run_batch

        try:
            shard_kn = parse_shard(shard)
            mapping = _mapping(map_)
        except ValueError as exc:
            raise fail(exc) from None
        progress = _Progress(quiet or not sys.stderr.isatty())
        try:
            result = run_batch(
                model,
                url,
                input,
                output,
                version=version,
                mapping=mapping,
                outputs=outputs or None,
                batch_size=batch_size,
                concurrency=concurrency,
                shard_rows=shard_rows,
                shard=shard_kn,
                max_errors=None if max_errors < 0 else max_errors,
                grace_s=grace_s,
                timeout_s=timeout_s,
                handle_signals=True,
                on_event=progress,
                streams=not no_streams,
                client_options={"auth": access} if access is not None else None,
            )
        except TritonForgeError as exc:
            progress.stop()
            raise fail(exc) from None
        except ValueError as exc:
            progress.stop()
            raise fail(exc) from None
        if as_json:
            print_json(
                {**dataclasses.asdict(result), "rows_per_s": result.rows_per_s, "exit_code": result.exit_code}
            )
        else:
            console.print(_summary(result))
            if result.server:
                console.print(_server_table(result))
        failed = result.rows_failed + result.failed_before
        if result.status == "too many failures":
            print_error(
                f"stopped: more than {max_errors} rows failed (see {output}/_errors/); "
                "fix the data or raise --max-errors, then run again to resume"
            )
        elif result.status == "interrupted":
            err_console.print(
                f"interrupted: {result.shards_done}/{result.shards_total} shards finished; "
                "run again to resume",
                highlight=False,
                soft_wrap=True,
            )
        elif failed:
            err_console.print(
                f"{failed:,} rows failed: see {output}/_errors/", highlight=False, soft_wrap=True
            )
        raise typer.Exit(code=result.exit_code)
