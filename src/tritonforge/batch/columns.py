"""Columns to model inputs and model outputs to columns, row by row honest about bad values.

An input takes its column by name, or by an explicit mapping to one column, a list of columns or a glob
over column names (``pixel_*``: the scalar columns stacked in file order). A model with one input fed by a
dataset with one column needs no mapping. Text columns go to ``BYTES`` inputs as UTF-8. A row whose value
can't become the input (a null, a list of the wrong length, text that isn't a number) is a *bad row*: it is
reported with the reason and left out, the other rows go on.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tritonforge.config import DataType
from tritonforge.errors import BatchError

__all__ = ["InputPlan", "Prepared", "flat_arrow", "outputs_to_arrow", "plan_inputs", "prepare"]

# wire name (FP32, BYTES, ...) -> numpy scalar type (np.object_ for BYTES), from the one table in config
NUMPY_DTYPES: dict[str, Any] = {t.triton_name: t.to_numpy().type for t in DataType if t is not DataType.BF16}

Mapping_ = Mapping[str, "str | Sequence[str]"]


@dataclass(frozen=True)
class InputPlan:
    """Where one model input comes from: its name, Triton dtype, per-row dims, and source columns."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    columns: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.name,
            "datatype": self.datatype,
            "dims": list(self.dims),
            "columns": list(self.columns),
        }


def plan_inputs(
    inputs: Sequence[Any], batched: bool, columns: Sequence[str], mapping: Mapping_ | None = None
) -> list[InputPlan]:
    """Match the model's inputs (``TensorMetadata``: name, datatype, shape) with the dataset's columns.

    Raises:
        BatchError: a mapping names an input the model lacks or a column the data lacks, or an input has
            no column; the message lists what exists and how to map it (``--map INPUT=COLUMN``).
    """
    if mapping is not None and not isinstance(mapping, Mapping):
        raise BatchError(f"the mapping must be {{input: column(s)}}, not {type(mapping).__name__}")
    mapping = dict(mapping or {})
    names = [t.name for t in inputs]
    unknown = sorted(set(mapping) - set(names))
    if unknown:
        raise BatchError(f"--map names inputs the model doesn't have: {unknown}; its inputs are {names}")
    plans = []
    for spec in inputs:
        dims = tuple(int(d) for d in spec.shape[1:]) if batched else tuple(int(d) for d in spec.shape)
        if spec.datatype not in NUMPY_DTYPES:
            raise BatchError(
                f"input {spec.name!r} has datatype {spec.datatype}, which batch inference can't fill"
            )
        wanted = mapping.get(spec.name)
        if wanted is None:
            if spec.name in columns:
                chosen: tuple[str, ...] = (spec.name,)
            elif len(inputs) == 1 and len(columns) == 1:
                chosen = (columns[0],)
            else:
                raise BatchError(
                    f"input {spec.name!r} has no column of that name; the data has {list(columns)}: "
                    f"map one with --map {spec.name}=COLUMN (or several: --map '{spec.name}=col_*')"
                )
        else:
            patterns = _patterns(spec.name, wanted)
            chosen_list: list[str] = []
            for pattern in patterns:
                hits = (
                    [c for c in columns if fnmatch.fnmatchcase(c, pattern)]
                    if _is_glob(pattern)
                    else ([pattern] if pattern in columns else [])
                )
                if not hits:
                    raise BatchError(
                        f"--map {spec.name}={pattern}: no such column; the data has {list(columns)}"
                    )
                chosen_list.extend(h for h in hits if h not in chosen_list)
            chosen = tuple(chosen_list)
        if len(chosen) > 1:
            size = int(np.prod(dims)) if dims and all(d > 0 for d in dims) else None
            if size is not None and size != len(chosen):
                raise BatchError(
                    f"input {spec.name!r} takes {list(dims)} per row ({size} values) but is mapped to "
                    f"{len(chosen)} columns"
                )
        plans.append(InputPlan(spec.name, spec.datatype, dims, chosen))
    return plans


def _patterns(name: str, wanted: Any) -> list[str]:
    """A mapping's value as a list of column names or globs.

    Raises:
        BatchError: no column at all (``[]``, ``""``), or a value that is not text or a list of text.
    """
    patterns = [wanted] if isinstance(wanted, str) else wanted
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) for p in patterns):
        raise BatchError(
            f"the mapping of input {name!r} must be a column name, a list of them or a glob, not "
            f"{_short(wanted)} (--map {name}=COLUMN)"
        )
    if not patterns or not all(patterns):
        raise BatchError(
            f"the mapping of input {name!r} names no column ({_short(wanted)}); give one, a list or a glob: "
            f"--map {name}=COLUMN, --map {name}=col_a,col_b or --map '{name}=col_*'"
        )
    return list(patterns)


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


@dataclass
class Prepared:
    """A table's rows as model inputs: ``arrays`` holds the good rows (``rows``: their positions in the
    table), ``bad`` the positions and reasons of the others."""

    arrays: dict[str, np.ndarray]
    rows: np.ndarray
    bad: dict[int, str]


def prepare(table: Any, plans: Sequence[InputPlan]) -> Prepared:
    """Convert a pyarrow Table / RecordBatch into input arrays, one row per table row.

    Rows of different shapes under a variable dim (-1) are fine: :func:`shape_groups` batches rows of one
    shape together.
    """
    n = table.num_rows
    bad: dict[int, str] = {}
    values: dict[str, Any] = {}
    for plan in plans:
        values[plan.name] = _input_values(table, plan, n, bad)
    good = np.array([i for i in range(n) if i not in bad], dtype=np.int64) if bad else np.arange(n)
    arrays: dict[str, np.ndarray] = {}
    for name, value in values.items():
        if isinstance(value, list):  # ragged: an object array of per-row arrays
            arr = np.empty(len(good), dtype=object)
            for j, i in enumerate(good):
                arr[j] = value[i]
            arrays[name] = arr
        else:
            arrays[name] = value[good] if bad else value
    return Prepared(arrays, good, bad)


def _column(table: Any, name: str) -> Any:
    col = table.column(name)
    if hasattr(col, "combine_chunks"):
        col = col.combine_chunks()
    return col


def _input_values(table: Any, plan: InputPlan, n: int, bad: dict[int, str]) -> Any:
    dtype = NUMPY_DTYPES[plan.datatype]
    if len(plan.columns) > 1:
        parts = [_scalars(_column(table, c), c, dtype, plan, bad) for c in plan.columns]
        stacked = np.stack(parts, axis=1)
        if plan.dims and all(d > 0 for d in plan.dims):
            stacked = stacked.reshape((n, *plan.dims))
        return stacked
    name = plan.columns[0]
    col = _column(table, name)
    import pyarrow as pa

    if (
        pa.types.is_list(col.type)
        or pa.types.is_large_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
    ):
        return _lists(col, name, dtype, plan, n, bad)
    flat = _scalars(col, name, dtype, plan, bad)
    want = tuple(d if d > 0 else 1 for d in plan.dims)
    if int(np.prod(want)) != 1:
        raise BatchError(
            f"input {plan.name!r} takes {list(plan.dims)} values per row but column {name!r} holds one "
            f"value per row; map it to a list column or to several columns (--map '{plan.name}=col_*')"
        )
    return flat.reshape((n, *want))


def _scalars(col: Any, name: str, dtype: Any, plan: InputPlan, bad: dict[int, str]) -> np.ndarray:
    """One value per row as ``dtype``; nulls and values that don't convert are marked bad (and zeroed)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(col)
    if col.null_count:
        for i in np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False)):
            bad.setdefault(int(i), f"column {name!r} is null")
    if dtype is np.object_:
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            return np.array([b"" if v is None else v.encode() for v in col.to_pylist()], dtype=object)
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            return np.array([b"" if v is None else v for v in col.to_pylist()], dtype=object)
        return np.array([b"" if v is None else str(v).encode() for v in col.to_pylist()], dtype=object)
    target = pa.from_numpy_dtype(np.dtype(dtype))
    try:
        cast = pc.cast(col, target, safe=True)
        if cast.null_count:
            cast = cast.fill_null(pa.scalar(0, target))
        return np.asarray(cast.to_numpy(zero_copy_only=False))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    out = np.zeros(n, dtype=dtype)
    for i, value in enumerate(col.to_pylist()):
        if value is None:
            continue
        try:
            converted = pc.cast(pa.array([value]), target, safe=True)[0].as_py()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            bad.setdefault(
                i, f"column {name!r}: {value!r} is not a valid {plan.datatype} value for input {plan.name!r}"
            )
            continue
        out[i] = converted
    return out


def _lists(col: Any, name: str, dtype: Any, plan: InputPlan, n: int, bad: dict[int, str]) -> Any:
    """A (nested) list column: a dense array when every row has the shape the model takes (or one shared
    shape under variable dims), else a list of per-row arrays; rows that can't fit are marked bad."""

    dense = _dense(col)
    if dense is not None:  # the fast path: every row has one shape, no nulls, and it fits
        flat, shape = dense
        bad_flat: dict[int, str] = {}
        if _fits(shape, plan.dims):
            values = _scalars(flat, name, dtype, plan, bad_flat)
            if not bad_flat:
                return values.reshape((n, *shape))
    rows = col.to_pylist()
    per_row: list[Any] = [None] * n
    shapes: set[tuple[int, ...]] = set()
    for i, value in enumerate(rows):
        if value is None:
            bad.setdefault(i, f"column {name!r} is null")
            continue
        try:
            arr = np.array(value, dtype=dtype if dtype is not np.object_ else object)
        except (TypeError, ValueError) as exc:
            bad.setdefault(
                i, f"column {name!r}: {_short(value)} is not a valid {plan.datatype} array ({exc})"
            )
            continue
        if dtype is np.object_:
            arr = np.vectorize(lambda v: v.encode() if isinstance(v, str) else v, otypes=[object])(arr)
        if arr.dtype == object and dtype is not np.object_:
            bad.setdefault(i, f"column {name!r}: {_short(value)} is ragged or holds nulls")
            continue
        if not _fits(arr.shape, plan.dims):
            bad.setdefault(
                i,
                f"column {name!r}: a value of shape {list(arr.shape)} doesn't fit input {plan.name!r} "
                f"{list(plan.dims)}",
            )
            continue
        per_row[i] = arr
        shapes.add(arr.shape)
    if len(shapes) <= 1:
        common: tuple[int, ...] = next(iter(shapes), tuple(d if d > 0 else 0 for d in plan.dims))
        out = np.zeros((n, *common), dtype=dtype)
        for i, arr in enumerate(per_row):
            if arr is not None:
                out[i] = arr
        return out
    return [np.zeros(0, dtype=dtype) if a is None else a for a in per_row]


def _dense(col: Any) -> tuple[Any, tuple[int, ...]] | None:
    """(flat values, per-row shape) of a (nested) list column whose rows all have one shape and no nulls."""
    import pyarrow as pa
    import pyarrow.compute as pc

    shape: list[int] = []
    cur = col
    while (
        pa.types.is_list(cur.type)
        or pa.types.is_large_list(cur.type)
        or pa.types.is_fixed_size_list(cur.type)
    ):
        if cur.null_count:
            return None
        if pa.types.is_fixed_size_list(cur.type):
            size = cur.type.list_size
        else:
            lengths = pc.list_value_length(cur).to_numpy(zero_copy_only=False)
            if len(lengths) and (lengths != lengths[0]).any():
                return None
            size = int(lengths[0]) if len(lengths) else 0
        shape.append(size)
        cur = cur.flatten()
    if cur.null_count:
        return None
    return cur, tuple(shape)


def _fits(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    return len(shape) == len(dims) and all(d in (-1, s) for d, s in zip(dims, shape, strict=True))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def shape_groups(arrays: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Positions of rows that can share a request: all of them when every input is dense, else grouped by
    the shapes of the ragged inputs' rows (in order of first appearance)."""
    ragged = [
        a
        for a in arrays.values()
        if a.dtype == object and a.ndim == 1 and len(a) and isinstance(a[0], np.ndarray)
    ]
    n = len(next(iter(arrays.values()))) if arrays else 0
    if not ragged:
        return [np.arange(n)]
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i in range(n):
        groups.setdefault(tuple(a[i].shape for a in ragged), []).append(i)
    return [np.array(g, dtype=np.int64) for g in groups.values()]


def take(arrays: Mapping[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``idx`` (increasing positions) of every input, ragged inputs stacked (their rows share
    one shape). A run of consecutive rows, the usual request, is a view: no copy."""
    n = len(idx)
    rows: Any = idx
    if n and int(idx[-1]) - int(idx[0]) == n - 1:  # increasing and as many as the span: consecutive
        rows = slice(int(idx[0]), int(idx[0]) + n)
    out = {}
    for name, a in arrays.items():
        part = a[rows]
        if a.dtype == object and a.ndim == 1 and len(part) and isinstance(part[0], np.ndarray):
            part = np.stack(list(part))
        out[name] = part
    return out


def outputs_to_arrow(name: str, array: np.ndarray, variable: bool) -> Any:
    """One output's rows as an Arrow array: one value per row becomes a plain column, more a (nested)
    fixed-size list — a variable-size list when the model's dims vary (``variable``), so batches of
    different padded lengths still concatenate. BYTES become binary."""
    import pyarrow as pa

    n = array.shape[0]
    inner = array.shape[1:]
    if int(np.prod(inner)) == 1 and len(inner) <= 1:
        array = array.reshape(n)
        inner = ()
    if array.dtype == object:
        flat = pa.array([bytes(v) if not isinstance(v, bytes) else v for v in array.reshape(-1)], pa.binary())
    else:
        flat = flat_arrow(array)
    for size in reversed(inner):
        flat = pa.FixedSizeListArray.from_arrays(flat, size)
    if variable and inner:
        flat = flat.cast(_variable_type(flat.type))
    return flat


def flat_arrow(array: np.ndarray) -> Any:
    """A numeric ndarray's values as a flat Arrow array; integers and floats share the ndarray's memory
    (``pa.array`` copies floats value by value: ~40 ns each, the most of writing a shard's outputs)."""
    import pyarrow as pa

    flat = np.ascontiguousarray(array).reshape(-1)
    if not flat.dtype.isnative:
        flat = flat.astype(flat.dtype.newbyteorder("="))
    if flat.dtype.kind in "iuf":
        return pa.Array.from_buffers(pa.from_numpy_dtype(flat.dtype), len(flat), [None, pa.py_buffer(flat)])
    return pa.array(flat)


def _variable_type(t: Any) -> Any:
    import pyarrow as pa

    if pa.types.is_fixed_size_list(t):
        return pa.list_(_variable_type(t.value_type))
    return t
