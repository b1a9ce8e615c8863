"""The output folder of a run: Parquet shards, their errors, and the manifest of finished shards.

Layout (readers such as ``pyarrow.dataset`` skip names starting with ``_`` or ``.``, so
``pq.read_table(DIR)`` reads exactly the outputs)::

    DIR/part-000012.parquet          row_id + the model's outputs for shard 12's good rows
    DIR/_errors/part-000012.jsonl    {"row_id", "stage", "error"} per failed row of shard 12
    DIR/_manifest.json               settings + finished shards (``_manifest.K-of-N.json`` for --shard K/N)

A shard is committed in this order: its errors file and its outputs file are each written to a temporary
name and renamed into place (a file absent this time is removed), then the manifest is rewritten the same
way. The manifest entry is the commit point. A run killed anywhere (SIGKILL included) leaves either the
old manifest, so the shard is redone and its files replaced, or the new one; never half a file, and never
a row in two places.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tritonforge.atomic import atomic_path, write_atomic
from tritonforge.errors import BatchError

__all__ = [
    "FORMAT_VERSION",
    "Manifest",
    "atomic_write_bytes",
    "committed",
    "read_errors",
    "read_outputs",
    "shard_paths",
]

FORMAT_VERSION = 1
ERRORS_DIR = "_errors"


def shard_paths(root: Path, index: int) -> tuple[Path, Path]:
    """(outputs file, errors file) of shard ``index``."""
    name = f"part-{index:06d}"
    return root / f"{name}.parquet", root / ERRORS_DIR / f"{name}.jsonl"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (:func:`tritonforge.atomic.write_atomic`)."""
    write_atomic(path, data)


def atomic_write_table(path: Path, table: Any) -> None:
    """Write a pyarrow Table as Parquet to ``path`` whole or not at all."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", use_dictionary=_dictionary_columns(table))


def _dictionary_columns(table: Any) -> list[str]:
    """The columns worth dictionary encoding: not ``row_id`` (every value new) nor floating point (model
    scores rarely repeat: trying costs more than the rest of writing them and makes the file bigger)."""
    import pyarrow as pa

    names = []
    for f in table.schema:
        inner = f.type
        while pa.types.is_list(inner) or pa.types.is_large_list(inner) or pa.types.is_fixed_size_list(inner):
            inner = inner.value_type
        if f.name != "row_id" and not pa.types.is_floating(inner):
            names.append(f.name)
    return names


def manifest_name(shard: tuple[int, int]) -> str:
    k, n = shard
    return "_manifest.json" if n == 1 else f"_manifest.{k}-of-{n}.json"


class Manifest:
    """The record of a run in its output folder: the settings it runs with and its finished shards.

    Opening a folder that holds a run with other settings (another model, input, mapping or shard size)
    is refused, because its shards would not line up with this run's.

    Raises:
        BatchError: the folder holds another run, or an unreadable manifest.
    """

    def __init__(self, root: Path, shard: tuple[int, int], settings: Mapping[str, Any]) -> None:
        self.root = Path(root)
        self.shard = shard
        self.path = self.root / manifest_name(shard)
        self.settings = dict(settings)
        self.shards: dict[int, dict[str, Any]] = {}
        self.started_at = time.time()
        self._lock = (
            threading.Lock()
        )  # shards are committed from worker threads; one manifest write at a time
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as exc:
                raise BatchError(
                    f"{self.path}: unreadable manifest ({exc}); remove it to start over"
                ) from exc
            if data.get("settings") != json.loads(json.dumps(self.settings)):
                old = data.get("settings", {})
                diff = sorted(
                    k
                    for k in set(old) | set(self.settings)
                    if old.get(k) != json.loads(json.dumps(self.settings.get(k)))
                )
                raise BatchError(
                    f"{self.root} holds a run with other settings ({', '.join(diff)} differ); "
                    "use another --out folder, or remove this one to start over"
                )
            self.shards = {int(k): v for k, v in data.get("shards", {}).items()}
            self.started_at = data.get("started_at", self.started_at)

    @property
    def done(self) -> set[int]:
        return set(self.shards)

    def totals(self) -> tuple[int, int]:
        """(rows answered, rows failed) over the finished shards."""
        return (
            sum(s["rows_ok"] for s in self.shards.values()),
            sum(s["rows_failed"] for s in self.shards.values()),
        )

    def clean_temporaries(self, owned: set[int]) -> None:
        """Remove temporary files a killed run of this shard set left (not other processes' shards)."""
        names = {shard_paths(self.root, i)[0].name for i in owned} | {
            shard_paths(self.root, i)[1].name for i in owned
        }
        names.add(self.path.name)
        for folder in (self.root, self.root / ERRORS_DIR):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.name.startswith(".") and ".tmp-" in p.name and p.name[1:].split(".tmp-")[0] in names:
                    with contextlib.suppress(OSError):
                        p.unlink()

    def commit(
        self, index: int, outputs: Any | None, errors: list[dict[str, Any]], entry: Mapping[str, Any]
    ) -> None:
        """Write shard ``index``'s files, then record it (the commit point)."""
        out_path, err_path = shard_paths(self.root, index)
        if errors:
            atomic_write_bytes(err_path, "".join(json.dumps(e) + "\n" for e in errors).encode())
        elif err_path.exists():
            err_path.unlink()
        if outputs is not None and outputs.num_rows:
            atomic_write_table(out_path, outputs)
        elif out_path.exists():
            out_path.unlink()
        with self._lock:
            self.shards[index] = {**entry, "finished_at": round(time.time(), 3)}
            self.save()

    def save(self) -> None:
        data = {
            "format": FORMAT_VERSION,
            "settings": self.settings,
            "started_at": self.started_at,
            "shards": {str(k): v for k, v in sorted(self.shards.items())},
        }
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode())


def committed(root: str | Path) -> set[int]:
    """The shards every manifest in a run folder records as finished (all ``--shard K/N`` processes)."""
    done: set[int] = set()
    for f in Path(root).glob("_manifest*.json"):
        with contextlib.suppress(OSError, ValueError):
            done |= {int(k) for k in json.loads(f.read_text()).get("shards", {})}
    return done


def read_outputs(root: str | Path) -> Any:
    """The outputs of every finished shard of a run folder as one pyarrow Table, sorted by ``row_id``
    (files of shards no manifest records, left by a killed run, are not read).

    Raises:
        BatchError: the folder has no finished outputs.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = committed(root)
    files = [p for p in (shard_paths(Path(root), i)[0] for i in sorted(done)) if p.exists()]
    if not files:
        raise BatchError(f"{root}: no finished output shards here")
    table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    return table.sort_by("row_id")


def read_errors(root: str | Path) -> list[dict[str, Any]]:
    """Every failed row of the finished shards of a run folder (``row_id``, ``stage``, ``error``), sorted."""
    rows: list[dict[str, Any]] = []
    for i in sorted(committed(root)):
        f = shard_paths(Path(root), i)[1]
        if f.exists():
            rows.extend(json.loads(line) for line in f.read_text().splitlines() if line.strip())
    return sorted(rows, key=lambda r: r["row_id"])
