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
import os
import queue
import random
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.atomic import atomic_path
from tritonforge.errors import TritonForgeError

__all__ = ["SampleStore", "Sampler", "SamplerStats"]

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

    def load(
        self,
        model: str,
        version: str | None = None,
        *,
        since_s: float | None = None,
        limit: int | None = None,
    ) -> dict[str, np.ndarray]:
        """The stored rows of ``model`` (newest ``limit`` rows) as ``{tensor: array}`` (rows first).

        Raises:
            TritonForgeError: nothing stored for that model.
        """
        import pyarrow.parquet as pq

        files = self.files(model, version)
        if not files:
            where = f"{self.root / _safe(model)}" + (f"/{version}" if version else "")
            raise TritonForgeError(f"no sampled traffic of {model!r} in {where}: is a Sampler writing there?")
        tables = [pq.read_table(f) for f in files]
        columns: dict[str, list[Any]] = {}
        for t in tables:
            for name in t.column_names:
                columns.setdefault(name, [])
        for t in tables:
            n = t.num_rows
            for name, values in columns.items():
                values.extend(t.column(name).to_pylist() if name in t.column_names else [None] * n)
        ts = np.array(columns.pop("ts", []), np.float64)
        keep = np.ones(len(ts), bool) if since_s is None else ts >= since_s
        idx = np.flatnonzero(keep)
        if limit is not None:
            idx = idx[-limit:]
        out: dict[str, np.ndarray] = {}
        for name, values in columns.items():
            picked = [values[i] for i in idx if values[i] is not None]
            if not picked:
                continue
            if len({len(p) for p in picked}) > 1:
                continue  # rows of different lengths (a variable-length tensor): no fixed features to judge
            if isinstance(picked[0][0], (bytes, str)):
                out[name] = np.array(picked, dtype=object)
            else:
                out[name] = np.array(picked, np.float64)
        return out


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
