"""``tritonforge bench``: sweep one model on a server (given, or the embedded one) and write the results.

Example:
    >>> settings = SweepSettings(concurrency=(1, 4))
    >>> result = bench("digits_mlp", settings=settings, output=Path("out"))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tritonforge.errors import ModelNotFoundError, RepositoryError
from tritonforge.loadtest.output import write_results
from tritonforge.loadtest.sweep import Event, SweepResult, SweepSettings, run_sweep
from tritonforge.loadtest.target import Sender, open_target

if TYPE_CHECKING:
    from tritonforge.client.policies import Auth

__all__ = ["DEFAULT_REPOSITORY", "bench", "embedded_server", "load_payloads"]

DEFAULT_REPOSITORY = Path("model_repository")


def repository_models(repository: Path) -> list[str]:
    return (
        sorted(p.name for p in repository.iterdir() if (p / "config.pbtxt").is_file())
        if repository.is_dir()
        else []
    )


@contextlib.contextmanager
def embedded_server(repository: Path, model: str) -> Iterator[Any]:
    """The embedded server on ``repository`` with explicit model control and only ``model`` loaded
    (an ensemble brings its composing models).

    Raises:
        RepositoryError: there is no repository there.
        ModelNotFoundError: the repository has no such model (the message lists those it has).
    """
    from tritonforge.server import EmbeddedServer

    if not repository.is_dir():
        raise RepositoryError(f"no model repository at {repository} (build one, or give --url HOST:PORT)")
    models = repository_models(repository)
    if model not in models:
        raise ModelNotFoundError(
            f"model '{model}' is not in {repository}; it has: {', '.join(models) or 'no models'}", model=model
        )
    with EmbeddedServer(repository, model_control="explicit", load_models=[model]) as server:
        yield server


def load_payloads(path: Path) -> list[dict[str, np.ndarray]]:
    """Real request data from an ``.npz`` file: one array per input name, first axis = samples.

    Each sample becomes one batch-1 request (with its batch axis kept).
    """
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise ValueError(f"{path}: every array needs the same number of samples, got {sorted(counts)}")
    return [{name: a[i : i + 1] for name, a in arrays.items()} for i in range(counts.pop())]


def bench(
    model: str,
    *,
    settings: SweepSettings,
    url: str | None = None,
    repository: str | os.PathLike[str] = DEFAULT_REPOSITORY,
    output: str | os.PathLike[str] | None = None,
    inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    batch: int = 1,
    on_event: Event | None = None,
    report: bool = True,
    client: Sender = "tritonforge",
    auth: Auth | None = None,
) -> SweepResult:
    """Sweep ``model`` on the server at ``url`` (or the embedded server on ``repository``); write
    ``sweep.csv``, ``sweep.json`` and (``report``) ``report.html`` with PNGs into ``output``, after every
    level, so a sweep cut short keeps what it measured. ``client``: what sends the requests (see
    :func:`~tritonforge.loadtest.target.open_target`); ``auth``: keys and TLS for a restricted ``url``.

    Raises:
        ModelNotFoundError: no such model (on the server, or in the repository).
        Unavailable: the server at ``url`` did not answer.
    """
    out_dir = Path(output) if output is not None else None

    def save(result: SweepResult) -> None:
        if out_dir is not None:
            write_results([result], out_dir)
            if report:
                from tritonforge.loadtest.report import write_report

                write_report([result], out_dir, title=f"tritonforge bench {model}")

    async def run(address: str) -> SweepResult:
        async with open_target(
            address, model, inputs=inputs, batch=batch, client=client, auth=auth
        ) as target:
            return await run_sweep(
                target.send,
                settings,
                model=model,
                stats=target.stats,
                on_event=on_event,
                on_level=save,
                label="as served",
            )

    if url is not None:
        return asyncio.run(run(url))
    with embedded_server(Path(repository), model) as server:
        return asyncio.run(run(server.grpc_url))


def parse_levels(text: str, cast: Callable[[str], Any] = int) -> tuple[Any, ...]:
    """``"1,2,4"`` -> (1, 2, 4); ``"1:16"`` -> powers of two from 1 to 16 (perf_analyzer's range style)."""
    if ":" in text:
        low, high = (cast(x) for x in text.split(":", 1))
        levels = []
        value = low
        while value <= high:
            levels.append(value)
            value *= 2
        return tuple(levels)
    return tuple(cast(x) for x in text.split(",") if x.strip())
