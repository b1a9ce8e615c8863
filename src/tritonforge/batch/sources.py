"""Input datasets: Parquet, CSV, JSON Lines or NumPy files — one file, a folder or a glob — read in order.

Rows are numbered across the files in sorted path order, starting at 0: that number is the ``row_id`` the
outputs carry. The tabular formats are read with pyarrow; a ``.npy`` file is one column (``array``) of its
rows, a ``.npz`` file one column per array (all of the same length). Every file becomes Arrow record
batches, so the rest of the run sees one kind of table whatever the format.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import zipfile
import zlib
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
# what a damaged or mislabelled file raises while read (zipfile: a bad CRC, an unknown compression method)
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)
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
    #: JSON Lines only: the schema of the whole file, when its first block's types don't fit every row
    schema: Any = None


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
        names = _columns(self.files[0])
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise BatchError(
                f"{self.files[0].path}: column name(s) {twice} appear more than once (a repeated header?); "
                "give every column its own name"
            )
        for f in self.files[1:]:
            missing = [n for n in names if n not in _columns(f)]
            if missing:
                raise BatchError(
                    f"{f.path}: has no column {missing}, which {self.files[0].path.name} has; every input "
                    "file needs the same columns"
                )
        return names

    def read(self, start: int = 0, rows: int = _READ_ROWS) -> Iterator[tuple[int, Any]]:
        """``(first row id, pyarrow.RecordBatch)`` from row ``start`` on, in order, at most ``rows`` rows a
        batch for the array formats (what a reader holds at once); files before it are skipped unread."""
        offset = 0
        for f in self.files:
            if offset + f.rows <= start:
                offset += f.rows
                continue
            skip = max(0, start - offset)
            row = offset + skip
            for batch in _read(f, skip, max(1, rows)):
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
    if p.exists():
        raise BatchError(f"{text}: not a regular file or a folder (a device, FIFO or socket); give a file")
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


_JSON_BLOCK = 1 << 22


def _jsonl_file(path: Path) -> DatasetFile:
    """A JSON Lines file with its rows counted, streamed a block at a time. The stream takes its types
    from the first block; when a later row doesn't fit them (ints, then a float), the whole file is read
    once here for types that fit every row, and its reads stream with those."""
    pa = _pa()
    import pyarrow.json as pjson

    try:
        return DatasetFile(path, "jsonl", _count(path, "jsonl"))
    except BatchError as exc:
        if not isinstance(exc.__cause__, pa.ArrowInvalid) or "convert" not in str(exc.__cause__):
            raise
    try:
        table = pjson.read_json(path, read_options=pjson.ReadOptions(block_size=_JSON_BLOCK))
    except (pa.ArrowException, *_READ_ERRORS) as exc:
        raise BatchError(f"{path}: can't read it as jsonl: {exc}") from None
    return DatasetFile(path, "jsonl", table.num_rows, table.schema)


def _count(path: Path, fmt: str) -> int:
    """The file's number of rows, from its metadata or header where the format has one (reading no rows).

    Raises:
        BatchError: a file that can't be read as ``fmt`` (truncated, another format), or arrays batch
            inference can't read (see :func:`_check_array`).
    """
    pa = _pa()
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return int(pq.ParquetFile(path).metadata.num_rows)
        if fmt == "npy":
            with open(path, "rb") as fh:
                header = _npy_header(fh)
                expected = fh.tell() + header.shape[0] * header.row_bytes if header.shape else 0
            _check_array(path, None, header)
            size = path.stat().st_size
            if size < expected:
                raise BatchError(
                    f"{path}: can't read it as npy: {size} bytes, but its header promises {expected} "
                    f"({header.shape[0]} rows of {header.dtype} {list(header.shape[1:])}); is it truncated?"
                )
            return header.shape[0]
        if fmt == "npz":
            lengths = {name: h.shape[0] for name, h in _npz_headers(path).items()}
            if len(set(lengths.values())) > 1:
                raise BatchError(f"{path}: its arrays have different numbers of rows: {lengths}")
            return next(iter(lengths.values()), 0)
        return sum(batch.num_rows for batch in _read(DatasetFile(path, fmt, -1), 0, _READ_ROWS))
    except BatchError:
        raise
    except (pa.ArrowException, *_READ_ERRORS) as exc:
        raise BatchError(f"{path}: can't read it as {fmt} (truncated, or not a {fmt} file?): {exc}") from exc


@dataclass(frozen=True)
class _ArrayHeader:
    """What a ``.npy`` header says: the array's shape, whether it is Fortran-ordered, its dtype."""

    shape: tuple[int, ...]
    fortran: bool
    dtype: np.dtype[Any]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def _npy_header(fh: Any) -> _ArrayHeader:
    """The header of the ``.npy`` data ``fh`` is at (left just after it); reads no array data.

    Raises:
        ValueError: not a ``.npy`` header.
    """
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    return _ArrayHeader(tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype))


# numpy kinds a model input can be filled from: bool, ints, floats, fixed-width bytes and text
_ARRAY_KINDS = {"b": "bool", "i": "int", "u": "uint", "f": "float", "S": "bytes", "U": "str"}
_REFUSED_KINDS = {
    "c": "complex values (save the real and imaginary parts as two arrays or columns)",
    "V": "a structured dtype (save each field as its own array of a .npz)",
    "O": "Python objects (pickles are never loaded; save numbers, bytes or str)",
    "M": "datetimes (save them as int64 or text)",
    "m": "timedeltas (save them as int64)",
}


def _check_array(path: Path, name: str | None, header: _ArrayHeader) -> None:
    """Refuse an array a run can't read row by row, naming the file (and the array of a ``.npz``).

    Raises:
        BatchError: a single value (0-d: no rows), a dtype no model input takes, or (in a ``.npz``) a
            Fortran-ordered array of rows (its rows are not contiguous, so it can't be read in parts).
    """
    where = f"{path}" if name is None else f"{path}: array {name!r}"
    if not header.shape:
        raise BatchError(
            f"{where} is a single value (shape ()); batch inference reads rows along the first axis: save "
            "an array of rows, e.g. np.save(path, values.reshape(-1, 1))"
        )
    kind = header.dtype.kind
    if kind not in _ARRAY_KINDS:
        why = _REFUSED_KINDS.get(kind, f"dtype {header.dtype}")
        raise BatchError(f"{where} holds {why}; batch inference reads bool, int, float, bytes or str arrays")
    if name is not None and header.fortran and len(header.shape) > 1:
        raise BatchError(
            f"{where} is Fortran-ordered, so its rows can't be read a shard at a time; save it C-ordered "
            "(np.ascontiguousarray) or as a .npy"
        )


def _npz_headers(path: Path) -> dict[str, _ArrayHeader]:
    """Each array's header, read from the archive without decompressing any data.

    Raises:
        BatchError: a member that is not a ``.npy`` array, or an array :func:`_check_array` refuses.
    """
    headers: dict[str, _ArrayHeader] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise BatchError(f"{path}: member {info.filename!r} is not a .npy array; is it a .npz?")
            name = info.filename[: -len(".npy")]
            with archive.open(info) as fh:
                headers[name] = header = _npy_header(fh)
                promised = fh.tell() + (header.shape[0] * header.row_bytes if header.shape else 0)
            _check_array(path, name, header)
            if info.file_size < promised:  # the archive's own record of the member's size
                raise BatchError(
                    f"{path}: array {name!r} holds {info.file_size} bytes, but its header promises "
                    f"{promised} ({header.shape[0]} rows of {header.dtype} {list(header.shape[1:])}); is it "
                    "damaged?"
                )
    return headers


def _npz_batches(path: Path, skip: int, rows: int) -> Iterator[Any]:
    """Record batches of a ``.npz`` from row ``skip`` on, ``rows`` at a time, each array streamed out of
    the archive: memory holds one batch, never a whole (possibly highly compressed) array."""
    pa = _pa()
    headers = _npz_headers(path)
    n = next(iter(headers.values())).shape[0] if headers else 0
    with zipfile.ZipFile(path) as archive, contextlib.ExitStack() as stack:
        streams = {}
        for name, header in headers.items():
            fh = stack.enter_context(archive.open(name + ".npy"))
            _npy_header(fh)
            _read_exactly(fh, skip * header.row_bytes, path, name)  # decompressed and dropped, in chunks
            streams[name] = fh
        for start in range(skip, n, rows):
            count = min(rows, n - start)
            arrays = []
            for name, header in headers.items():
                data = _read_exactly(streams[name], count * header.row_bytes, path, name, keep=True)
                array = np.frombuffer(data, dtype=header.dtype).reshape((count, *header.shape[1:]))
                arrays.append(numpy_to_arrow(array))
            yield pa.record_batch(arrays, names=list(headers))


_CHUNK = 1 << 22


def _read_exactly(fh: Any, size: int, path: Path, name: str, *, keep: bool = False) -> bytes:
    """``size`` bytes of ``fh`` (``keep=False``: read in chunks and dropped, to skip them).

    Raises:
        BatchError: the array ends first (a truncated archive).
    """
    parts = []
    left = size
    while left > 0:
        chunk = fh.read(min(left, _CHUNK))
        if not chunk:
            raise BatchError(f"{path}: array {name!r} ends early (truncated?); its header promises more rows")
        left -= len(chunk)
        if keep:
            parts.append(chunk)
    return b"".join(parts)


def _columns(f: DatasetFile) -> list[str]:
    pa = _pa()
    try:
        if f.format == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(f.path).names)
        if f.format == "npy":
            return [NPY_COLUMN]
        if f.format == "npz":
            return list(_npz_headers(f.path))
        if f.format == "csv":
            import pyarrow.csv as pcsv

            return list(pcsv.open_csv(f.path, read_options=pcsv.ReadOptions(block_size=1 << 22)).schema.names)
        for batch in _read(f, 0, _READ_ROWS):
            return list(batch.schema.names)
    except BatchError:
        raise
    except UnicodeDecodeError as exc:  # a column name that is not UTF-8
        raise BatchError(
            f"{f.path}: a column name is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except (pa.ArrowException, *_READ_ERRORS) as exc:
        raise BatchError(f"{f.path}: can't read it as {f.format}: {exc}") from exc
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

            options = pjson.ReadOptions(block_size=_JSON_BLOCK)
            parse = pjson.ParseOptions(explicit_schema=f.schema) if f.schema is not None else None
            if hasattr(pjson, "open_json"):  # pyarrow >= 19: streamed, a block at a time
                yield from _skip(pjson.open_json(f.path, read_options=options, parse_options=parse), skip)
            else:  # pragma: no cover - older pyarrow reads the whole file
                yield from pjson.read_json(f.path, read_options=options).slice(skip).to_batches(rows)
        elif f.format == "npy":
            with open(f.path, "rb") as fh:
                _check_array(f.path, None, _npy_header(fh))
            array = np.load(f.path, mmap_mode="r")  # paged in a batch at a time
            for start in range(skip, array.shape[0], rows):
                chunk = np.asarray(array[start : start + rows])
                yield pa.record_batch([numpy_to_arrow(chunk)], names=[NPY_COLUMN])
        elif f.format == "npz":
            yield from _npz_batches(f.path, skip, rows)
    except (pa.ArrowException, *_READ_ERRORS) as exc:
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
        out.append(_jsonl_file(p) if fmt == "jsonl" else DatasetFile(p, fmt, _count(p, fmt)))
    return Dataset(out)


def digest(value: Any) -> str:
    """A short stable hash of a JSON-able value (settings that must match on resume)."""
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
