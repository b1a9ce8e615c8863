"""The one atomic file write (tritonforge.atomic): whole or not at all, flushed, nothing left behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tritonforge.atomic import TEMP_MARK, atomic_path, write_atomic


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "state.json"
    assert write_atomic(target, "old") == target  # the folder is made
    write_atomic(target, b"new \xe2\x9c\x93")
    assert target.read_text(encoding="utf-8") == "new \u2713"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    target.write_text("old")

    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".{target.name}{TEMP_MARK}")
        tmp.write_text("half")
        raise RuntimeError("the writer broke")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_a_rename_that_fails_is_an_oserror_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    (target / "inside").mkdir(parents=True)  # a folder where the file should go: the rename fails
    with pytest.raises(OSError):
        write_atomic(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in target.iterdir()] == ["inside"]


def test_a_writer_handed_the_path_writes_through_it(tmp_path: Path) -> None:
    target = tmp_path / "rows.csv"
    with atomic_path(target) as tmp, tmp.open("w", newline="") as handle:
        handle.write("a,b\r\n1,2\r\n")
    assert target.read_bytes() == b"a,b\r\n1,2\r\n"
