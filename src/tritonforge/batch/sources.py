"""Input datasets: Parquet, CSV, JSON Lines or NumPy files — one file, a folder or a glob — read in order.

Rows are numbered across the files in sorted path order, starting at 0: that number is the ``row_id`` the
outputs carry. The tabular formats are read with pyarrow; a ``.npy`` file is one column (``array``) of its
rows, a ``.npz`` file one column per array (all of the same length). Every file becomes Arrow record
batches, so the rest of the run sees one kind of table whatever the format.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.errors import BatchError

__all__ = ["FORMATS", "Dataset", "DatasetFile", "open_dataset"]

# suffix -> format name
FORMATS: dict[str, str] = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".npy": "npy",
    ".npz": "npz",
}
NPY_COLUMN = "array"
_READ_ROWS = 65_536
_PARQUET_BATCH_ROWS = 8_192


def _pa() -> Any:
    try:
        import pyarrow
    except ImportError as exc:  # pragma: no cover - pyarrow comes with the [batch] extra
        raise BatchError(
            "batch inference reads and writes files with pyarrow: pip install 'tritonforge[batch]'"
        ) from exc
    return pyarrow


def numpy_to_arrow(array: np.ndarray) -> Any:
    """An ndarray of rows as an Arrow array: scalars per row stay flat, each further dim a fixed-size list."""
    pa = _pa()
    array = np.asarray(array)
    if array.dtype.kind in "OSU":
        flat = pa.array(array.reshape(-1).tolist())
    else:
        from tritonforge.batch.columns import flat_arrow

        flat = flat_arrow(array)
    for size in reversed(array.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    return flat


@dataclass(frozen=True)
class DatasetFile:
    """One input file, its format and its number of rows."""

    path: Path
    format: str
    rows: int


class Dataset:
    """The input files of a run, in order, with their row counts (read from metadata where the format
    has it, counted otherwise).

    Raises:
        BatchError: no file matches, a file has an unknown suffix, or a file can't be read.
    """

    def __init__(self, files: Sequence[DatasetFile]) -> None:
        self.files = tuple(files)
        self.rows = sum(f.rows for f in self.files)

    def fingerprint(self) -> list[dict[str, Any]]:
        """What identifies the input for a resumed run: names, sizes and row counts (not mtimes, which
        change when a pod copies its input)."""
        return [{"name": f.path.name, "bytes": f.path.stat().st_size, "rows": f.rows} for f in self.files]

    def columns(self) -> list[str]:
        """The column names of the first file (every file must have them), from its schema where the
        format has one (reading no rows), else from its first rows."""
        return _columns(self.files[0])

    def read(self, start: int = 0) -> Iterator[tuple[int, Any]]:
        """``(first row id, pyarrow.RecordBatch)`` from row ``start`` on, in order; files before it are
        skipped without reading them."""
        offset = 0
        for f in self.files:
            if offset + f.rows <= start:
                offset += f.rows
                continue
            skip = max(0, start - offset)
            row = offset + skip
            for batch in _read(f, skip, _READ_ROWS):
                if batch.num_rows:
                    yield row, batch
                    row += batch.num_rows
            if row != offset + f.rows:
                raise BatchError(f"{f.path}: read {row - offset} rows but counted {f.rows}; was it changed?")
            offset += f.rows


def _files(path: str | Path) -> list[Path]:
    text = str(path)
    p = Path(text)
    if p.is_dir():
        found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in FORMATS)
        found = [q for q in found if not any(part.startswith((".", "_")) for part in q.relative_to(p).parts)]
        if not found:
            raise BatchError(f"{p}: no input files in this folder (looked for {', '.join(sorted(FORMATS))})")
        return found
    if p.is_file():
        return [p]
    if glob.has_magic(text):
        found = sorted(Path(q) for q in glob.glob(text, recursive=True) if Path(q).is_file())
        if not found:
            raise BatchError(f"{text}: no file matches this pattern")
        return found
    raise BatchError(f"{text}: no such file or folder")


def _format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise BatchError(
            f"{path}: unknown input format {path.suffix!r}; use one of {', '.join(sorted(FORMATS))}"
        )
    return fmt


def _count(path: Path, fmt: str) -> int:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(path).metadata.num_rows)
    if fmt == "npy":
        return int(np.load(path, mmap_mode="r").shape[0])
    if fmt == "npz":
        with np.load(path) as data:
            lengths = {name: data[name].shape[0] if data[name].ndim else 1 for name in data.files}
        if len(set(lengths.values())) > 1:
            raise BatchError(f"{path}: its arrays have different numbers of rows: {lengths}")
        return next(iter(lengths.values()), 0)
    return sum(batch.num_rows for batch in _read(DatasetFile(path, fmt, -1), 0, _READ_ROWS))


def _columns(f: DatasetFile) -> list[str]:
    pa = _pa()
    try:
        if f.format == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(f.path).names)
        if f.format == "npy":
            return [NPY_COLUMN]
        if f.format == "npz":
            with np.load(f.path) as data:
                return list(data.files)
        if f.format == "csv":
            import pyarrow.csv as pcsv

            return list(pcsv.open_csv(f.path, read_options=pcsv.ReadOptions(block_size=1 << 22)).schema.names)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise BatchError(f"{f.path}: can't read it as {f.format}: {exc}") from exc
    for batch in _read(f, 0, _READ_ROWS):
        return list(batch.schema.names)
    return []


def _read(f: DatasetFile, skip: int, rows: int) -> Iterator[Any]:
    """Record batches of a file from row ``skip`` on (at most ``rows`` rows each, for the array formats)."""
    pa = _pa()
    try:
        if f.format == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(f.path)
            first = 0
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if first + n <= skip:
                    first += n
                    continue
                at = first  # streamed: the first rows are ready before the whole row group is decoded
                for batch in pf.iter_batches(batch_size=min(rows, _PARQUET_BATCH_ROWS), row_groups=[group]):
                    lo = max(0, skip - at)
                    if lo < batch.num_rows:
                        yield batch.slice(lo) if lo else batch
                    at += batch.num_rows
                first += n
        elif f.format == "csv":
            import pyarrow.csv as pcsv

            reader = pcsv.open_csv(f.path, read_options=pcsv.ReadOptions(block_size=1 << 22))
            yield from _skip(reader, skip)
        elif f.format == "jsonl":
            import pyarrow.json as pjson

            table = pjson.read_json(f.path, read_options=pjson.ReadOptions(block_size=1 << 22))
            yield from table.slice(skip).to_batches(max_chunksize=rows)
        elif f.format == "npy":
            array = np.load(f.path, mmap_mode="r")
            for start in range(skip, array.shape[0], rows):
                chunk = np.asarray(array[start : start + rows])
                yield pa.record_batch([numpy_to_arrow(chunk)], names=[NPY_COLUMN])
        elif f.format == "npz":
            with np.load(f.path) as data:
                arrays = {name: data[name] for name in data.files}
            n = next(iter(arrays.values())).shape[0] if arrays else 0
            for start in range(skip, n, rows):
                yield pa.record_batch(
                    [numpy_to_arrow(a[start : start + rows]) for a in arrays.values()], names=list(arrays)
                )
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise BatchError(f"{f.path}: can't read it as {f.format}: {exc}") from exc


def _skip(batches: Any, skip: int) -> Iterator[Any]:
    for batch in batches:
        if skip >= batch.num_rows:
            skip -= batch.num_rows
            continue
        yield batch.slice(skip) if skip else batch
        skip = 0


def open_dataset(path: str | Path | Sequence[str | Path]) -> Dataset:
    """The input files at ``path`` (a file, a folder read recursively, a glob, or a list of these).

    Example:
        >>> ds = open_dataset("data/*.parquet")          # doctest: +SKIP
        >>> ds.rows, [f.path.name for f in ds.files]

    Raises:
        BatchError: nothing matches, a suffix is unknown, or a file can't be read.
    """
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    files: list[Path] = []
    for p in paths:
        files.extend(_files(p))
    seen: set[Path] = set()
    out = []
    for p in files:
        if p in seen:
            continue
        seen.add(p)
        fmt = _format(p)
        out.append(DatasetFile(p, fmt, _count(p, fmt)))
    return Dataset(out)


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (settings that must match on resume)."""
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
