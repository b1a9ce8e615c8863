"""batch-infer's inputs, hostile or broken: every problem is one clear error (never a raw exception), and
a run holds about a shard in memory whatever the file (a 1 MB .npz that expands to 1 GB included).

One real server (module scope) runs ``double`` (x[N, 4] FP32 -> 2x, a Python model).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from batch_fixtures import DOUBLE_PY  # noqa: E402
from tiny_models import python_model  # noqa: E402
from tiny_models import spec as _spec  # noqa: E402
from tritonforge.batch import open_dataset, plan_inputs, read_outputs, run_batch  # noqa: E402
from tritonforge.client import TensorMetadata  # noqa: E402
from tritonforge.config import DataType, DynamicBatching, ModelConfig  # noqa: E402
from tritonforge.errors import BatchError  # noqa: E402
from tritonforge.server import EmbeddedServer  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
X = np.arange(40, dtype=np.float32).reshape(10, 4)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("batch_inputs")
    config = ModelConfig(
        name="double",
        backend="python",
        max_batch_size=16,
        inputs=(_spec("x", DataType.FP32, (4,)),),
        outputs=(_spec("y", DataType.FP32, (4,)),),
        dynamic_batching=DynamicBatching(),
    )
    python_model(root / "repo", root / "_src", config, DOUBLE_PY.format(sleep=0))
    with EmbeddedServer(root / "repo") as server:
        yield server.grpc_url


def _bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """{case: (file, what the error says)} for each input problem."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "zero_d.npy", np.array(5.0))
    np.savez(folder / "zero_d.npz", x=np.array(5.0))
    np.save(folder / "complex.npy", np.zeros((3, 4), np.complex64))
    np.save(folder / "structured.npy", np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]))
    np.save(folder / "objects.npy", np.array([b"a", None], dtype=object), allow_pickle=True)
    (folder / "repeated_header.csv").write_text("x,x\n1,2\n3,4\n")
    pq.write_table(pa.table({"x": list(range(1000))}), folder / "full.parquet")
    data = (folder / "full.parquet").read_bytes()
    (folder / "truncated.parquet").write_bytes(data[: len(data) // 2])
    np.save(folder / "full.npy", X)
    data = (folder / "full.npy").read_bytes()
    (folder / "truncated.npy").write_bytes(data[: len(data) // 2])
    np.savez_compressed(folder / "full.npz", x=X)
    data = (folder / "full.npz").read_bytes()
    (folder / "truncated.npz").write_bytes(data[: len(data) // 2])
    return {
        "0-d npy": (folder / "zero_d.npy", r"is a single value \(shape \(\)\)"),
        "0-d npz": (folder / "zero_d.npz", r"array 'x' is a single value"),
        "complex npy": (folder / "complex.npy", "holds complex values"),
        "structured npy": (folder / "structured.npy", "holds a structured dtype"),
        "object npy": (folder / "objects.npy", "pickles are never loaded"),
        "repeated CSV header": (
            folder / "repeated_header.csv",
            r"column name\(s\) \['x'\] appear more than once",
        ),
        "truncated parquet": (folder / "truncated.parquet", "can't read it as parquet"),
        "truncated npy": (folder / "truncated.npy", "is it truncated"),
        "truncated npz": (folder / "truncated.npz", "can't read it as npz"),
    }


CASES = [
    "0-d npy", "0-d npz", "complex npy", "structured npy", "object npy", "repeated CSV header",
    "truncated parquet", "truncated npy", "truncated npz",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_batch_run_refuses_a_broken_input_with_one_clear_error(tmp_path: Path, url: str, case: str) -> None:
    path, says = _bad_files(tmp_path / "in")[case]
    with pytest.raises(BatchError, match=says) as caught:
        run_batch("double", url, path, tmp_path / "out")
    assert str(path) in caught.value.message and "\n" not in caught.value.message
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("case", ["truncated npy", "repeated CSV header", "0-d npz"])
def test_batch_infer_cli_reports_a_broken_input_in_one_line(tmp_path: Path, url: str, case: str) -> None:
    path, _ = _bad_files(tmp_path / "in")[case]
    done = _cli("double", "--url", url, "--input", str(path), "--out", str(tmp_path / "out"))
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(path) in line


@pytest.mark.parametrize("mapping", [{"x": []}, {"x": ""}, {"x": [""]}, {"x": 5}, {"x": [1]}])
def test_a_mapping_that_names_no_column_is_refused_in_one_line(
    tmp_path: Path, url: str, mapping: Any
) -> None:
    np.save(tmp_path / "x.npy", X)
    with pytest.raises(BatchError, match="the mapping of input 'x'"):
        run_batch("double", url, tmp_path / "x.npy", tmp_path / "out", mapping=mapping)


def test_an_output_that_is_a_file_is_refused_before_anything_is_read(tmp_path: Path, url: str) -> None:
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "out").write_text("a file")
    with pytest.raises(BatchError, match=r"output folder .*out is a file; give a folder"):
        run_batch("double", url, tmp_path / "missing.npy", tmp_path / "out")
    with pytest.raises(BatchError, match=r"lies under .*out, which is a file"):
        run_batch("double", url, tmp_path / "x.npy", tmp_path / "out" / "sub")
    done = _cli("double", "--url", url, "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "out"))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "is a file" in done.stderr


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("timeout_s", -1.0, "timeout_s must be a finite number of seconds > 0"),
        ("timeout_s", 0, "timeout_s must be"),
        ("timeout_s", float("nan"), "timeout_s must be"),
        ("batch_size", 0, "batch_size must be a whole number >= 1"),
        ("grace_s", -5, "grace_s must be"),
        ("concurrency", 0, "concurrency must be"),
        ("max_errors", -2, "max_errors must be"),
    ],
)
def test_a_bad_option_is_refused_up_front_not_row_by_row(
    tmp_path: Path, url: str, option: str, value: Any, says: str
) -> None:
    np.save(tmp_path / "x.npy", X)
    with pytest.raises(ValueError, match=says):
        run_batch("double", url, tmp_path / "x.npy", tmp_path / "out", **{option: value})
    assert not (tmp_path / "out").exists()


def test_batch_infer_cli_refuses_a_negative_timeout_in_one_line(tmp_path: Path, url: str) -> None:
    np.save(tmp_path / "x.npy", X)
    args = ["double", "--url", url, "--input", str(tmp_path / "x.npy"), "--out", str(tmp_path / "out")]
    done = _cli(*args, "--timeout-s", "-1")
    assert done.returncode != 0 and "timeout_s must be" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_npz_and_npy_read_in_parts_answer_every_row_like_the_array(tmp_path: Path, url: str) -> None:
    x = np.random.default_rng(0).random((1234, 4), dtype=np.float32)
    np.savez_compressed(tmp_path / "x.npz", x=x)
    np.save(tmp_path / "x.npy", x)
    for name in ("x.npz", "x.npy"):
        out = tmp_path / f"out_{name}"
        result = run_batch("double", url, tmp_path / name, out, shard_rows=100, shard=(0, 1))
        assert result.rows_ok == 1234 and result.rows_failed == 0
        table = read_outputs(out)
        np.testing.assert_array_equal(np.stack(table.column("y").to_pylist()), x * 2)
        assert table.column("row_id").to_pylist() == list(range(1234))


# -- memory: a compressed .npz that expands to 1 GB ------------------------------------------------------

ROWS = 64 * 1024 * 1024  # x[ROWS, 4] float32: 1 GiB of zeros, about 1 MB compressed


def _zeros_npz(path: Path, rows: int) -> Path:
    """``x`` = zeros[rows, 4] float32 as a compressed .npz, written a chunk at a time (never whole)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("x.npy", "w", force_zip64=True) as fh,
    ):
        np.lib.format.write_array_header_2_0(fh, {**header, "shape": (rows, 4)})
        chunk = bytes(1 << 24)
        left = rows * 16
        while left:
            fh.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))
    return path


MEASURE = """
import json, resource, sys
from tritonforge.batch import run_batch
url, path, out, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
shards = -(-rows // 10_000)
result = run_batch("double", url, path, out, shard_rows=10_000, shard=(shards - 1, shards), streams=False)
print(json.dumps({"rows_ok": result.rows_ok, "rows_failed": result.rows_failed,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _measure(url: str, path: Path, out: Path, rows: int) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, url, str(path), str(out), str(rows)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_1_mb_npz_expanding_to_1_gb_is_read_a_shard_at_a_time(tmp_path: Path, url: str) -> None:
    big = _zeros_npz(tmp_path / "big.npz", ROWS)
    assert big.stat().st_size < 2_000_000  # about 1 MB on disk
    small = _zeros_npz(tmp_path / "small.npz", 20_000)
    base = _measure(url, small, tmp_path / "out_small", 20_000)
    # the last shard: every row before it is decompressed and dropped on the way
    measured = _measure(url, big, tmp_path / "out_big", ROWS)
    last = ROWS - (-(-ROWS // 10_000) - 1) * 10_000
    assert measured["rows_ok"] == last and measured["rows_failed"] == 0
    # a shard is 10,000 x 16 bytes; the whole array would be 1024 MB
    assert measured["max_rss_mb"] - base["max_rss_mb"] < 64, (measured, base)


def test_an_npz_whose_header_promises_more_rows_than_it_holds_is_refused_when_counted(tmp_path: Path) -> None:
    header = {"descr": "<f4", "fortran_order": False, "shape": (10**9, 4)}
    with zipfile.ZipFile(tmp_path / "liar.npz", "w") as archive, archive.open("x.npy", "w") as fh:
        np.lib.format.write_array_header_2_0(fh, header)
        fh.write(bytes(64))
    with pytest.raises(BatchError, match=r"array 'x' holds \d+ bytes, but its header promises 16000000\d+"):
        open_dataset(tmp_path / "liar.npz")


def test_json_lines_whose_types_change_after_the_first_block_are_read_whole_and_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tritonforge.batch.sources as sources

    monkeypatch.setattr(sources, "_JSON_BLOCK", 1 << 16)  # the first block: ints only
    path = tmp_path / "scores.jsonl"
    path.write_text("".join(json.dumps({"x": i}) + "\n" for i in range(20_000)) + '{"x": 1.5}\n')
    dataset = open_dataset(path)
    batches = [batch for _, batch in dataset.read(0, rows=1000)]
    assert dataset.rows == 20_001 == sum(b.num_rows for b in batches)
    assert batches[-1].column("x").to_pylist()[-1] == 1.5


def test_input_files_without_the_first_files_columns_are_refused_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"x": [1.0], "t": ["a"]}), tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"t": ["b"]}), tmp_path / "in" / "b.parquet")
    with pytest.raises(BatchError, match=r"b.parquet: has no column \['x'\], which a.parquet has"):
        open_dataset(tmp_path / "in").columns()


def test_an_input_that_is_a_device_or_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    import os

    (tmp_path / "zero.npy").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo.csv")
    for name in ("zero.npy", "fifo.csv"):
        with pytest.raises(BatchError, match="not a regular file or a folder"):
            open_dataset(tmp_path / name)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_column_name_that_is_not_utf8_is_refused_in_one_line(tmp_path: Path, suffix: str) -> None:
    # found by the property test below: a flipped byte in a JSON Lines key
    path = tmp_path / f"x{suffix}"
    path.write_bytes(b"\x80x,t\n1,2\n" if suffix == ".csv" else b'{"\x80x": 1}\n')
    with pytest.raises(BatchError, match="a column name is not UTF-8 text"):
        open_dataset(path).columns()


# -- property-based: any file under an input suffix is read or refused with our error ---------------------

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _valid_bytes(tmp: Path, suffix: str) -> bytes:
    path = tmp / f"valid{suffix}"
    if suffix == ".npy":
        np.save(path, X)
    elif suffix == ".npz":
        np.savez_compressed(path, x=X, y=X[:, 0])
    elif suffix == ".parquet":
        pq.write_table(pa.table({"x": X[:, 0], "t": [str(i) for i in range(len(X))]}), path)
    elif suffix == ".csv":
        path.write_text("x,t\n" + "".join(f"{i},{i}\n" for i in range(10)))
    else:
        path.write_text("".join(json.dumps({"x": i, "t": str(i)}) + "\n" for i in range(10)))
    return path.read_bytes()


@PROPERTY
@given(
    suffix=st.sampled_from([".npy", ".npz", ".parquet", ".csv", ".jsonl"]),
    cut=st.one_of(st.none(), st.integers(0, 4000)),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3),
    noise=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_any_damaged_input_file_is_read_or_refused_with_a_batch_error(
    tmp_path_factory: pytest.TempPathFactory,
    suffix: str,
    cut: int | None,
    flips: list[Any],
    noise: bytes | None,
) -> None:
    tmp = tmp_path_factory.mktemp("damaged")
    data = bytearray(noise if noise is not None else _valid_bytes(tmp, suffix))
    if cut is not None:
        del data[cut:]
    for at, value in flips:
        if at < len(data):
            data[at] = value
    path = tmp / f"input{suffix}"
    path.write_bytes(bytes(data))
    try:
        dataset = open_dataset(path)
        dataset.columns()
        rows = sum(batch.num_rows for _, batch in dataset.read(0, rows=3))
    except BatchError as exc:
        assert "\n" not in exc.message and str(path) in exc.message
        return
    assert rows == dataset.rows


@PROPERTY
@given(
    mapping=st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["x", "y", ""]),
            st.one_of(
                st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3), st.integers(), st.none()
            ),
            max_size=2,
        ),
        st.integers(),
    )
)
def test_any_mapping_plans_the_inputs_or_gets_a_batch_error(mapping: Any) -> None:
    inputs = [TensorMetadata("x", "FP32", (-1, 4))]
    try:
        plans = plan_inputs(inputs, True, ["x", "a", "b", "c", "d"], mapping)
    except BatchError:
        return
    assert [p.name for p in plans] == ["x"] and plans[0].columns


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tritonforge", "batch-infer", *args, "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PROJECT_ROOT,
    )
