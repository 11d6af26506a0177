"""Row arrays of an index: the vectors and each named side array, as a mapped base plus appended parts.

A `Rows` holds the rows of one array of per-row shape `shape` and dtype `dtype` in insertion order:
an optional memory-mapped (or read) base from the live version folder, plus in-memory parts appended
since. Appended parts are merged like a binary counter (a part absorbs the next when it is at most
twice as big), so there are O(log n) parts and adding n rows in chunks copies O(n log n). Reads in
bounded blocks keep memory bounded over a mapped base.

A `RowTable` holds the ids and paths of those rows and the tombstones of removed ones. numpy only:
no other index module is imported here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BLOCK_BYTES", "RowTable", "Rows", "is_mapped"]

BLOCK_BYTES = 128 << 20  # bytes read at once from a memory-mapped part (65,536 rows of 512-d float32)


def is_mapped(a: np.ndarray) -> bool:
    """Whether `a` is (a view of) a memory-mapped file."""
    return isinstance(a, np.memmap) or isinstance(getattr(a, "base", None), np.memmap)


class Rows:
    """Rows of one array: (rows, *shape) of `dtype`, stored as a list of parts (see the module docstring)."""

    def __init__(self, shape: tuple[int, ...], dtype: Any, base: np.ndarray | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.parts: list[np.ndarray] = [] if base is None or len(base) == 0 else [base]

    @property
    def rows(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def row_bytes(self) -> int:
        return max(1, int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize)

    def block_rows(self) -> int:
        """Rows per block so that a block holds about BLOCK_BYTES."""
        return max(1, BLOCK_BYTES // self.row_bytes)

    def append(self, arr: np.ndarray) -> None:
        parts = self.parts + [np.array(arr, dtype=self.dtype, copy=True)]
        while len(parts) >= 2 and not is_mapped(parts[-2]) and len(parts[-2]) <= 2 * len(parts[-1]):
            parts[-2:] = [np.concatenate(parts[-2:])]
        self.parts = parts  # one assignment: concurrent readers see the old or the new list

    def truncate(self, rows: int) -> None:
        """Keep the first `rows` rows (undoes appends after a failed add)."""
        parts, kept = [], 0
        for part in self.parts:
            if kept + len(part) <= rows:
                parts.append(part)
                kept += len(part)
                continue
            if rows > kept:
                parts.append(part[: rows - kept])
            break
        self.parts = parts

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, contiguous block); memory-mapped parts come in blocks of `block_rows` rows."""
        step_mapped = block_rows or self.block_rows()
        start = 0
        for part in self.parts:
            step = step_mapped if is_mapped(part) else max(len(part), 1)
            for s in range(0, len(part), step):
                yield start + s, part[s : s + step]
            start += len(part)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows by row number (any shape of valid row numbers) -> (*rows.shape, *shape)."""
        rows = np.asarray(rows, dtype=np.int64)
        flat = rows.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.rows):
            raise IndexError(f"row numbers must lie in [0, {self.rows}), got {flat.min()}..{flat.max()}")
        out = np.empty((len(flat), *self.shape), dtype=self.dtype)
        start = 0
        for part in self.parts:
            sel = np.flatnonzero((flat >= start) & (flat < start + len(part)))
            if len(sel):
                order = np.argsort(flat[sel], kind="stable")  # sorted reads are kinder to a mapped file
                out[sel[order]] = part[flat[sel[order]] - start]
            start += len(part)
        return out.reshape(*rows.shape, *self.shape)

    def live_chunks(self, mask: np.ndarray | None, chunk: int | None = None) -> Iterator[np.ndarray]:
        """The rows where mask is True (all when None), in order, as contiguous chunks."""
        chunk = chunk or self.block_rows()
        start = 0
        for part in self.parts:
            for s in range(0, len(part), chunk):
                block = part[s : s + chunk]
                if mask is not None:
                    block = block[mask[start + s : start + s + len(block)]]
                if len(block):
                    yield np.ascontiguousarray(block)
            start += len(part)

    def write_npy(self, path: Path, mask: np.ndarray | None) -> None:
        """Stream the selected rows into a .npy file without building them in memory."""
        n = self.rows if mask is None else int(mask.sum())
        if n == 0 or 0 in self.shape:  # nothing to map: a zero-size array
            with open(path, "wb") as f:
                np.save(f, np.empty((n, *self.shape), dtype=self.dtype), allow_pickle=False)
            return
        out = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=(n, *self.shape))
        at = 0
        for block in self.live_chunks(mask):
            out[at : at + len(block)] = block
            at += len(block)
        out.flush()
        del out


class RowTable:
    """Ids and paths of an index's rows in insertion order, plus tombstones for removed rows.

    Ids are assigned in increasing order and compaction keeps the order, so the id array is sorted
    and id -> row is a binary search: no per-item dict (1M items would cost ~100 MB).
    """

    def __init__(self, ids: np.ndarray | None = None, paths: list[str] | None = None, next_id: int = 0) -> None:
        self._parts: list[np.ndarray] = [np.asarray(ids, dtype=np.int64)] if ids is not None else []
        self._ids: np.ndarray | None = None
        self.paths: list[str] = list(paths) if paths is not None else []
        self.dead: set[int] = set()  # removed rows, physically present until the next save compacts them
        self._dead_sorted: np.ndarray | None = None
        self.next_id = int(next_id)

    @property
    def row_ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.concatenate(self._parts) if self._parts else np.empty(0, np.int64)
            self._parts = [self._ids]
        return self._ids

    @property
    def rows(self) -> int:
        return len(self.paths)

    def __len__(self) -> int:
        return self.rows - len(self.dead)

    def allocate(self, paths: Sequence[str]) -> np.ndarray:
        """Give new rows fresh ids."""
        ids = np.arange(self.next_id, self.next_id + len(paths), dtype=np.int64)
        self._parts.append(ids)
        self._ids = None
        self.paths.extend(paths)
        self.next_id += len(paths)
        return ids

    def rows_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each id, -1 where the id is unknown or removed."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        table = self.row_ids
        rows = np.searchsorted(table, ids)
        found = rows < len(table)
        found[found] = table[rows[found]] == ids[found]
        rows = np.where(found, rows, -1)
        if self.dead:
            rows[np.isin(rows, self.dead_rows())] = -1
        return rows

    def remove(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tombstone the live rows of `ids`; returns those rows (unknown/removed ids are ignored)."""
        rows = np.unique(self.rows_of(ids))
        rows = rows[rows >= 0]
        self.dead.update(rows.tolist())
        self._dead_sorted = None
        return rows

    def dead_rows(self) -> np.ndarray:
        if self._dead_sorted is None:
            self._dead_sorted = np.array(sorted(self.dead), dtype=np.int64)
        return self._dead_sorted

    def live_mask(self) -> np.ndarray | None:
        """Boolean mask of live rows, or None when every row is live."""
        if not self.dead:
            return None
        mask = np.ones(self.rows, dtype=bool)
        mask[self.dead_rows()] = False
        return mask

    def path(self, id: int) -> str:
        row = int(self.rows_of([id])[0])
        if row < 0:
            raise KeyError(id)
        return self.paths[row]

    def live_ids(self) -> np.ndarray:
        mask = self.live_mask()
        return self.row_ids.copy() if mask is None else self.row_ids[mask]

    def items(self) -> Iterator[tuple[int, str]]:
        dead = self.dead
        for row, (id_, path) in enumerate(zip(self.row_ids.tolist(), self.paths)):
            if row not in dead:
                yield id_, path

    def compacted(self) -> RowTable:
        """The same live items without tombstones (rows renumbered, ids kept)."""
        mask = self.live_mask()
        if mask is None:
            return self
        paths = [p for p, keep in zip(self.paths, mask.tolist()) if keep]
        return RowTable(self.row_ids[mask], paths, self.next_id)
