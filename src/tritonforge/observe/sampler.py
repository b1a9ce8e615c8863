"""Keep a share of real traffic on disk: a sampler that never slows or fails the calls it watches.

:class:`Sampler` decides per call with one random draw (``share``, e.g. 0.01); a kept call's inputs and
outputs are copied onto a bounded queue (a full queue drops the sample, counted) and a background thread
writes them as Parquet files (pyarrow) into a :class:`SampleStore`: ``<root>/<model>/<version>/
part-<ns>.parquet``, one row per batch row, one list column per tensor. The store is bounded: when its
files pass ``max_bytes`` the oldest are deleted (rotation). Every error inside is swallowed and counted.

A sampler is a client hook: it reads a finished call's tensors from the ``request`` event
(``event.inputs`` / ``event.outputs``, references to the caller's arrays and the answer; a kept call's are
copied before the call returns), on :class:`~tritonforge.client.Client` and
:class:`~tritonforge.client.AsyncClient` alike::

    sampler = Sampler("samples/", share=0.01)
    client = Client("localhost:8001", hooks=[sampler])   # or client.add_hook(sampler)
    client.infer("digits_mlp", {"input": x})            # 1 call in 100 lands in samples/digits_mlp/...
    SampleStore("samples/").load("digits_mlp")          # {"input": rows, "probabilities": rows}

``Sampler.wrap(client)`` (the way before events carried tensors) still works: it adds the hook to the
client and returns the client itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import random
import threading
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.atomic import atomic_path
from tritonforge.errors import ObserveError

__all__ = ["SampleStore", "Sampler", "SamplerStats", "Samples"]

_STOP = object()


class SamplerStats:
    """Counters: calls seen, kept, dropped (queue full), rows and files written, errors swallowed."""

    __slots__ = ("dropped", "errors", "files", "kept", "rows", "seen")

    def __init__(self) -> None:
        self.seen = self.kept = self.dropped = self.rows = self.files = self.errors = 0

    def __repr__(self) -> str:
        return "SamplerStats(" + ", ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ")"


def _safe(part: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in part) or "_"


class SampleStore:
    """The on-disk store: Parquet files per model and version, oldest deleted past ``max_bytes``."""

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int = 256 * 2**20) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, not {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes

    def files(self, model: str | None = None, version: str | None = None) -> list[Path]:
        """Finished files (oldest first)."""
        base = self.root
        if model is not None:
            base = base / _safe(model)
            if version is not None:
                base = base / _safe(version)
        return sorted(base.rglob("part-*.parquet"), key=lambda p: p.name)

    def write(self, model: str, version: str | None, rows: list[dict[str, Any]]) -> Path:
        """Write one file of rows (``{"ts": float, tensor name: row values}``) atomically, then rotate."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        folder = self.root / _safe(model) / _safe(version or "default")
        folder.mkdir(parents=True, exist_ok=True)
        columns: dict[str, list[Any]] = {}
        for row in rows:
            for key in row:
                columns.setdefault(key, [])
        for row in rows:
            for key, values in columns.items():
                values.append(row.get(key))
        table = pa.table(columns)
        name = f"part-{time.time_ns():020d}-{os.getpid()}.parquet"
        with atomic_path(folder / name) as tmp:
            pq.write_table(table, tmp)
        self.rotate()
        return folder / name

    def rotate(self) -> int:
        """Delete the oldest files until the store holds at most ``max_bytes``; returns files removed."""
        files = self.files()
        sizes = []
        for f in files:
            with contextlib.suppress(OSError):
                sizes.append((f, f.stat().st_size))
        total, removed = sum(s for _, s in sizes), 0
        for f, size in sizes:
            if total <= self.max_bytes:
                break
            with contextlib.suppress(OSError):
                f.unlink()
                removed += 1
            total -= size
        return removed

    def versions(self, model: str) -> list[str]:
        """The version folders holding sampled traffic of ``model`` (``default`` for unpinned calls)."""
        base = self.root / _safe(model)
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir() and any(p.glob("part-*.parquet")))

    def read(
        self,
        model: str,
        version: str | None = None,
        *,
        since_s: float | None = None,
        limit: int | None = None,
    ) -> Samples:
        """The stored rows of ``model``, checked file by file: :class:`Samples` (tensors and problems).

        Every file is read whole or not at all: an empty, unreadable or row-less file, a file lacking a
        tensor the others have, or one whose rows of a tensor are not as wide as that tensor's rows
        elsewhere is left out and named in ``problems`` (so a verdict on the rest says it is incomplete,
        never narrower without a word). A tensor whose width varies everywhere (variable-length) is left
        out and named in ``skipped``. Versions never mix: with ``version=None`` the model must have
        traffic of one version folder only (``default`` holds calls that named no version).

        Raises:
            ObserveError: nothing stored for that model (or version), or traffic of several versions.
        """
        import pyarrow.parquet as pq

        if since_s is not None and not np.isfinite(since_s):
            raise ValueError(f"since_s must be a finite timestamp, not {since_s}")
        if limit is not None and limit <= 0:
            raise ValueError(f"limit must be a positive number of rows, not {limit}")
        sampled = self.versions(model)
        if version is None and len(sampled) > 1:
            raise ObserveError(
                f"traffic of {model!r} was sampled for versions {', '.join(sampled)} in "
                f"{self.root / _safe(model)}: pick one (--traffic-version; 'default' holds calls that "
                "named no version) so that versions never mix"
            )
        files = self.files(model, version)
        if not files:
            where = f"{self.root / _safe(model)}" + (f"/{_safe(version)}" if version else "")
            found = f" (sampled versions: {', '.join(sampled)}; 'default' holds calls that named no version)"
            raise ObserveError(
                f"no sampled traffic of {model!r}"
                + (f" for version {version}" if version else "")
                + f" in {where}"
                + (found if sampled else ": is a Sampler writing there?")
            )
        problems: list[str] = []
        tables: list[tuple[Path, Any]] = []
        for f in files:
            try:
                size = f.stat().st_size
                if size == 0:
                    problems.append(f"{f}: empty (0 bytes), a write cut off; delete it")
                    continue
                table = pq.read_table(f)
            except Exception as exc:  # pyarrow raises its own tree, OSError for I/O
                problems.append(f"{f}: not a readable Parquet file ({_first_line(exc)}); delete it")
                continue
            if table.num_rows == 0:
                problems.append(f"{f}: holds no rows; delete it")
                continue
            tables.append((f, table))
        names = sorted({n for _, t in tables for n in t.column_names} - {"ts"})
        widths: dict[str, Counter[int | None]] = {n: Counter() for n in names}
        per_file: list[tuple[Path, Any, dict[str, list[Any]]]] = []
        for f, t in tables:
            columns = {n: t.column(n).to_pylist() for n in names if n in t.column_names}
            for n, values in columns.items():
                widths[n].update(None if v is None else len(v) for v in values)
            per_file.append((f, t, columns))
        total = sum(t.num_rows for _, t in tables)
        rare = {n for n, c in widths.items() if sum(c.values()) * 2 <= total}  # in a minority of rows
        variable = {n for n, c in widths.items() if c.most_common(1)[0][1] * 2 < sum(c.values())} - rare
        expected = {n: c.most_common(1)[0][0] for n, c in widths.items() if n not in variable | rare}
        ts: list[float] = []
        kept: dict[str, list[Any]] = {n: [] for n in expected}
        for f, t, columns in per_file:
            lacking = sorted(n for n in expected if n not in columns)
            if lacking:
                problems.append(f"{f}: lacks tensor(s) {', '.join(lacking)} that the other files have")
                continue
            odd = []
            for n, width in expected.items():
                bad = [v for v in columns[n] if v is None or len(v) != width]
                if bad:
                    seen = sorted({"missing" if v is None else str(len(v)) for v in bad})
                    odd.append(f"{len(bad)} row(s) of {n!r} are {'/'.join(seen)} wide, not {width}")
            if odd:
                problems.append(f"{f}: {'; '.join(odd)}")
                continue
            ts.extend(t.column("ts").to_pylist() if "ts" in t.column_names else [0.0] * t.num_rows)
            for n in expected:
                kept[n].extend(columns[n])
        stamps = np.array(ts, np.float64)
        idx = np.flatnonzero(np.ones(len(stamps), bool) if since_s is None else stamps >= since_s)
        if limit is not None:
            idx = idx[-limit:]
        out: dict[str, np.ndarray] = {}
        for n, values in kept.items():
            picked = [values[i] for i in idx]
            if not picked or expected[n] == 0:
                continue
            if isinstance(picked[0][0], (bytes, str)):
                out[n] = np.array(picked, dtype=object)
            else:
                out[n] = np.array(picked, np.float64)
        skipped = [
            f"tensor {n!r} is in a minority of the sampled rows only: not judged" for n in sorted(rare)
        ]
        skipped += [
            f"tensor {n!r} has rows of varying width (variable-length): not judged" for n in sorted(variable)
        ]
        return Samples(out, problems, skipped, len(files), len(idx))

    def load(
        self,
        model: str,
        version: str | None = None,
        *,
        since_s: float | None = None,
        limit: int | None = None,
    ) -> dict[str, np.ndarray]:
        """The stored rows of ``model`` (newest ``limit`` rows, sampled at or after the timestamp
        ``since_s``) as ``{tensor: array}`` (rows first), when every file is sound (see :meth:`read`).

        Raises:
            ObserveError: nothing stored, traffic of several versions, or a file :meth:`read` would
                leave out (each named).
        """
        samples = self.read(model, version, since_s=since_s, limit=limit)
        if samples.problems:
            raise ObserveError(
                f"{len(samples.problems)} sample file(s) of {model!r} are unusable: "
                + " | ".join(samples.problems)
            )
        return samples.tensors


@dataclasses.dataclass
class Samples:
    """What :meth:`SampleStore.read` found: the usable rows, and what it left out and why."""

    tensors: dict[str, np.ndarray]
    problems: list[str]  # files left out (each named): a verdict on the rest is incomplete
    skipped: list[str]  # tensors not judgeable by design (variable-length)
    files: int
    rows: int


class Sampler:
    """Keeps ``share`` of the calls it sees in a :class:`SampleStore`, off the caller's thread.

    Args:
        store: a :class:`SampleStore` or its root folder.
        share: the fraction of calls kept (0..1).
        max_bytes: the store's bound (with a folder). rows_per_file / flush_interval_s: when a file is cut.
        queue_size: kept calls waiting to be written; beyond it, samples are dropped (never waited for).
        seed: for a reproducible choice of calls.

    Raises:
        ValueError: a share outside 0..1 or a non-positive size.
    """

    def __init__(
        self,
        store: SampleStore | str | os.PathLike[str],
        *,
        share: float = 0.01,
        max_bytes: int = 256 * 2**20,
        rows_per_file: int = 5000,
        flush_interval_s: float = 10.0,
        queue_size: int = 1000,
        seed: int | None = None,
    ) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share must be between 0 and 1, not {share}")
        if rows_per_file <= 0 or queue_size <= 0 or flush_interval_s <= 0:
            raise ValueError("rows_per_file, queue_size and flush_interval_s must be > 0")
        self.store = store if isinstance(store, SampleStore) else SampleStore(store, max_bytes=max_bytes)
        self.share = share
        self.rows_per_file = rows_per_file
        self.flush_interval_s = flush_interval_s
        self.stats = SamplerStats()
        self._draw = random.Random(seed).random
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._flushed = threading.Event()
        self._thread = threading.Thread(target=self._writer, name="tritonforge-sampler", daemon=True)
        self._thread.start()
        self._closed = False

    # -- the hot path: one random draw for a call not kept ------------------------------------------------

    def record(
        self,
        model: str,
        version: str | int | None,
        inputs: Mapping[str, Any],
        outputs: Mapping[str, Any] | None,
    ) -> bool:
        """Maybe keep this call (returns whether it was queued); never raises."""
        self.stats.seen += 1
        if self._draw() >= self.share or self._closed:
            return False
        try:
            item = (
                model,
                None if version is None else str(version),
                time.time(),
                {k: np.array(v, copy=True) for k, v in inputs.items()},
                {k: np.array(v, copy=True) for k, v in (outputs or {}).items()},
            )
            self._queue.put_nowait(item)
        except queue.Full:
            self.stats.dropped += 1
            return False
        except Exception:
            self.stats.errors += 1
            return False
        self.stats.kept += 1
        return True

    def __call__(self, event: Any) -> None:
        """The client hook: records a successful call's ``event.inputs`` / ``event.outputs`` (never raises);
        other events (retries, fallbacks, shadows, failed calls, events without tensors) are ignored."""
        try:
            inputs = event.inputs
            if event.kind != "request" or inputs is None or event.error is not None:
                return
            self.record(event.model, event.version, inputs, event.outputs)
        except Exception:
            self.stats.errors += 1

    def wrap(self, client: Any) -> Any:
        """Deprecated: ``client.add_hook(sampler)`` (or ``hooks=[sampler]``) does the same.

        Adds this sampler to ``client``'s hooks (once) and returns ``client`` itself, so that code written
        for the former proxy keeps working; every call of that client is now sampled.

        Raises:
            TypeError: ``client`` has no hooks (not a tritonforge client).
        """
        warnings.warn(
            "Sampler.wrap(client) is deprecated: the sampler is a client hook, pass hooks=[sampler] to the "
            "client or call client.add_hook(sampler)",
            DeprecationWarning,
            stacklevel=2,
        )
        hooks = getattr(client, "hooks", None)
        if not isinstance(hooks, list):
            raise TypeError(
                "Sampler.wrap needs a tritonforge Client or AsyncClient (with hooks), not "
                f"{type(client).__name__}; pass hooks=[sampler] to the client instead"
            )
        if not any(h is self for h in hooks):
            hooks.append(self)
        return client

    # -- the writer thread --------------------------------------------------------------------------------

    def _writer(self) -> None:
        pending: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
        last_flush = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=min(1.0, self.flush_interval_s))
            except queue.Empty:
                item = None
            flush_now = item is _STOP or (isinstance(item, threading.Event))
            if item is not None and not flush_now:
                try:
                    model, version, ts, inputs, outputs = item
                    rows = _rows(ts, {**inputs, **outputs})
                    pending.setdefault((model, version), []).extend(rows)
                except Exception:
                    self.stats.errors += 1
            due = time.monotonic() - last_flush >= self.flush_interval_s
            for key in list(pending):
                if flush_now or due or len(pending[key]) >= self.rows_per_file:
                    rows = pending.pop(key)
                    try:
                        self.store.write(key[0], key[1], rows)
                        self.stats.rows += len(rows)
                        self.stats.files += 1
                    except Exception:
                        self.stats.errors += 1
            if due or flush_now:
                last_flush = time.monotonic()
            if isinstance(item, threading.Event):
                item.set()
            if item is _STOP:
                return

    def flush(self, timeout_s: float = 30.0) -> None:
        """Write everything kept so far (blocks until written)."""
        done = threading.Event()
        if self._thread.is_alive():
            self._queue.put(done, timeout=timeout_s)
            done.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is left and stop the writer thread."""
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            self._queue.put(_STOP, timeout=timeout_s)
            self._thread.join(timeout_s)

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _rows(ts: float, tensors: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """One dict per batch row: ``{"ts": ts, name: flattened row as a list}``."""
    n = min((a.shape[0] for a in tensors.values() if a.ndim), default=0)
    out = []
    for i in range(n):
        row: dict[str, Any] = {"ts": ts}
        for name, array in tensors.items():
            if array.ndim == 0:
                continue
            values = array[i].reshape(-1)
            if values.dtype.kind in ("O", "S", "U"):
                row[name] = [v if isinstance(v, bytes) else str(v).encode() for v in values]
            else:
                row[name] = values.astype(np.float64).tolist()
        out.append(row)
    return out
