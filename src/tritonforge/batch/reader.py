"""Reading a run's shards in order from one pass over the dataset, a bounded piece at a time."""

from __future__ import annotations

from typing import Any

from tritonforge.batch.plan import Shard
from tritonforge.batch.sources import Dataset
from tritonforge.errors import BatchError

__all__ = ["ShardReader"]


class ShardReader:
    """Reads the shards to do, in order, from one pass over the dataset (skipping what isn't needed)."""

    def __init__(self, dataset: Dataset, shard_rows: int, shards: list[Shard]) -> None:
        self.shards = list(shards)
        self.shard_rows = shard_rows
        # read no more than a shard at a time: memory follows the shard size, not the file's
        start = self.shards[0].first_row if self.shards else 0
        self._stream = dataset.read(start, rows=min(shard_rows, 65_536)) if self.shards else iter(())
        self._pending: list[tuple[int, Any]] = []  # (first row, batch) read but not yet used

    def next(self) -> Shard | None:
        import pyarrow as pa

        if not self.shards:
            return None
        shard = self.shards.pop(0)
        start, stop = shard.first_row, shard.first_row + shard.rows
        pieces = []
        while True:
            if not self._pending:
                item = next(self._stream, None)
                if item is None:
                    break
                self._pending.append(item)
            first, batch = self._pending[0]
            end = first + batch.num_rows
            if end <= start:
                self._pending.pop(0)
                continue
            if first >= stop:
                break
            lo, hi = max(start, first), min(stop, end)
            pieces.append(batch.slice(lo - first, hi - lo))
            if end <= stop:
                self._pending.pop(0)
            if hi >= stop:
                break
        table = pa.Table.from_batches(pieces) if pieces else None
        if table is None or table.num_rows != shard.rows:
            raise BatchError(
                f"shard {shard.index}: expected {shard.rows} rows from row {start}, read "
                f"{0 if table is None else table.num_rows}; did the input change?"
            )
        shard.table = table
        return shard
