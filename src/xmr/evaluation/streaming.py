"""Feature sources for the bounded-memory metrics: the gallery is read block by block, never whole.

:func:`feature_source` wraps whatever holds an (N, D) embedding matrix into one interface that the
ranking code reads in blocks of rows, normalised, cast to the compute dtype and on the device:

* a ``torch.Tensor`` or an in-memory ``np.ndarray``: sliced (no copy of the whole matrix);
* an ``np.memmap`` (e.g. ``np.load(path, mmap_mode="r")``): each block is copied out of the mapping,
  then the mapping's pages for that block are released with ``madvise(MADV_DONTNEED)`` (shared,
  read-only or ``r+`` mappings only), so the file's pages do not pile up in this process's resident
  memory (they stay in the kernel's page cache, which is not the process's memory);
* a path (``str`` / ``os.PathLike``) to a ``.npy`` file: read with positioned file reads (``pread``)
  into one reusable buffer, no mapping at all: resident memory is bounded by a block;
* :class:`ChunkedFeatures` (or a re-iterable such as a list of arrays): consecutive row chunks from
  any producer (a database cursor, shards on disk, an embedding job); read twice (once to fetch the
  few rows that are correct items, once to count), so it must be able to start over;
* anything else with a 2-D ``shape`` and slice indexing (an h5py dataset, ...).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ChunkedFeatures", "NpyFeatures", "feature_source"]

_PAGE = mmap.PAGESIZE


class ChunkedFeatures:
    """An (N, D) matrix given as consecutive row chunks: ``make_chunks()`` returns a fresh iterable.

    ``make_chunks`` is called once per pass over the gallery (the metrics make two). Each chunk is a
    2-D tensor or array of D columns; their row counts must add up to ``num_rows``.
    """

    def __init__(self, make_chunks: Callable[[], Iterable[Any]], num_rows: int, dim: int):
        self.make_chunks, self.shape = make_chunks, (int(num_rows), int(dim))

    def __len__(self) -> int:
        return self.shape[0]


class NpyFeatures:
    """A 2-D ``.npy`` file read by row ranges with ``os.pread`` (no memory map, no whole-file read)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            try:
                version = np.lib.format.read_magic(handle)
            except ValueError as err:
                raise ValueError(f"{self.path} is not a .npy file: {err}") from None
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if len(shape) != 2:
            raise ValueError(f"{self.path} holds an array of shape {shape}; expected (N, D)")
        if fortran or dtype.hasobject or dtype.kind != "f":
            raise ValueError(f"{self.path} must hold a C-ordered float array, got dtype {dtype} "
                             f"{'(Fortran order)' if fortran else ''}")
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), dtype
        self.row_bytes = self.shape[1] * dtype.itemsize
        self.reads: list[int] = []  # rows per read call, kept short: for tests and diagnostics

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, fd: int, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        view, pos = memoryview(out).cast("B"), 0
        while pos < len(view):  # pread may return short counts
            got = os.preadv(fd, [view[pos:]], self.offset + start * self.row_bytes + pos)
            if got <= 0:
                raise OSError(f"{self.path}: unexpected end of file at row {start} (truncated file?)")
            pos += got
        if len(self.reads) < 4096:
            self.reads.append(stop - start)
        return out

    def __getitem__(self, index: Any) -> np.ndarray:
        """Rows by a slice (one read) or by an ascending integer array (one read per run of rows)."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if isinstance(index, slice):
                start, stop, step = index.indices(self.shape[0])
                if step != 1:
                    raise IndexError("NpyFeatures supports contiguous slices only")
                return self._read(fd, start, max(start, stop))
            index = np.asarray(index, dtype=np.int64)
            if len(index) == 0:
                return np.empty((0, self.shape[1]), dtype=self.dtype)
            if index.min() < 0 or index.max() >= self.shape[0]:
                raise IndexError(f"row index out of range [0, {self.shape[0]}) for {self.path}")
            breaks = np.flatnonzero(np.diff(index) != 1) + 1  # runs of consecutive rows
            parts = [self._read(fd, int(run[0]), int(run[-1]) + 1) for run in np.split(index, breaks)]
            return np.concatenate(parts)
        finally:
            os.close(fd)


def _release_pages(block: np.ndarray) -> None:
    """Drop this process's mapping of a memmap block's pages (the page cache keeps them)."""
    mapping = getattr(block, "_mmap", None)
    if mapping is None or getattr(block, "mode", "c") not in ("r", "r+", "w+") or block.size == 0:
        return
    try:
        base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        start = block.ctypes.data - base
        first = start - start % _PAGE
        end = min(start + block.nbytes, len(mapping))
        mapping.madvise(mmap.MADV_DONTNEED, first, end - first)
    except (AttributeError, ValueError, OSError):  # no madvise on this platform: memory is just higher
        pass


class FeatureSource:
    """Block-wise access to an (N, D) feature matrix, returned normalised, cast and on the device."""

    def __init__(self, feats: Any, *, device: torch.device, dtype: torch.dtype, normalize: bool):
        if isinstance(feats, (str, os.PathLike)):
            feats = NpyFeatures(feats)
        elif not hasattr(feats, "shape") and isinstance(feats, Iterable):
            if iter(feats) is feats:
                raise TypeError("a one-shot iterator cannot be read twice: pass a list of chunks or "
                                "ChunkedFeatures(lambda: <new iterator>, num_rows, dim)")
            chunks = list(feats) if not isinstance(feats, (list, tuple)) else feats
            shapes = [tuple(getattr(c, "shape", ())) for c in chunks]
            if not shapes or any(len(s) != 2 for s in shapes):
                raise ValueError("every gallery chunk must be a 2-D (rows, D) array or tensor")
            feats = ChunkedFeatures(lambda: chunks, sum(s[0] for s in shapes), shapes[0][1])
        shape = getattr(feats, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"features must be 2-D (N, D), got shape {shape}")
        self.feats, self.n, self.dim = feats, int(shape[0]), int(shape[1])
        self.device, self.dtype, self.normalize = device, dtype, normalize

    def finish(self, block: Any) -> torch.Tensor:
        """Normalise and cast one block of rows (a tensor or array-like)."""
        if not isinstance(block, torch.Tensor):
            array = np.array(block, dtype=np.float32)  # a copy: memmaps are read-only
            if isinstance(block, np.memmap):
                _release_pages(block)
            block = torch.from_numpy(array)
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ValueError(f"a feature block has shape {tuple(block.shape)}; expected (rows, {self.dim})")
        block = block.to(self.device).float()
        if self.normalize:
            block = F.normalize(block, dim=1)
        return block.to(self.dtype)

    def blocks(self, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, rows)`` for consecutive blocks of at most ``chunk`` rows covering all N rows."""
        if isinstance(self.feats, ChunkedFeatures):
            offset = 0
            for part in self.feats.make_chunks():
                for start in range(0, int(part.shape[0]), chunk):
                    block = self.finish(part[start : start + chunk])
                    yield offset, block
                    offset += len(block)
            if offset != self.n:
                raise ValueError(f"the gallery chunks hold {offset} rows, expected {self.n}")
            return
        for start in range(0, self.n, chunk):
            yield start, self.slice(start, min(start + chunk, self.n))

    def slice(self, start: int, stop: int) -> torch.Tensor:
        if isinstance(self.feats, ChunkedFeatures):
            return self.take(np.arange(start, stop))
        return self.finish(self.feats[start:stop])

    def take(self, index: np.ndarray) -> torch.Tensor:
        """Rows at ``index`` (ascending, distinct)."""
        if isinstance(self.feats, torch.Tensor):
            picked = self.feats.index_select(0, torch.as_tensor(index, device=self.feats.device))
            return self.finish(picked)
        if isinstance(self.feats, ChunkedFeatures):
            out, offset = [], 0
            for part in self.feats.make_chunks():  # one pass, keeping only the wanted rows
                size = int(part.shape[0])
                lo, hi = np.searchsorted(index, [offset, offset + size])
                if hi > lo:
                    rows = torch.as_tensor(index[lo:hi] - offset)
                    part = part if isinstance(part, torch.Tensor) else torch.from_numpy(np.asarray(part))
                    out.append(self.finish(part.index_select(0, rows)))
                offset += size
            if sum(len(o) for o in out) != len(index):
                raise ValueError(f"the gallery chunks hold {offset} rows, fewer than row {int(index[-1])}")
            return torch.cat(out) if out else torch.empty(0, self.dim, dtype=self.dtype, device=self.device)
        if isinstance(self.feats, np.memmap) and len(index):
            # Scattered rows fault in whole neighbourhoods of the mapping (kernel fault-around):
            # read them window by window and release each window, so resident pages stay bounded.
            window = max(1, (16 << 20) // max(1, self.feats[:1].nbytes))
            parts = []
            for first in range(int(index[0]) - int(index[0]) % window, int(index[-1]) + 1, window):
                lo, hi = np.searchsorted(index, [first, first + window])
                if hi > lo:
                    parts.append(self.finish(np.asarray(self.feats[index[lo:hi]])))
                    _release_pages(self.feats[first : first + window])
            return torch.cat(parts)
        try:
            block = self.feats[index]
        except (TypeError, IndexError, ValueError):  # slice-only containers
            block = np.stack([np.asarray(self.feats[i : i + 1])[0] for i in index.tolist()])
        return self.finish(block)


@contextmanager
def chunk_workers(device: torch.device) -> Iterator[Callable[[list[Callable[[], Any]]], list[Any]]]:
    """Runs a list of tasks (one per query chunk) on ``torch.get_num_threads()`` single-threaded workers
    and returns their results in order.

    The per-block work after the matmul is many small operations; run multi-threaded each pays a
    thread synchronisation that costs more than the work (badly so on a busy machine). Query chunks
    are independent, so one chunk per core, each single-threaded (its matmul included), keeps every
    core busy with no synchronisation inside a block. Results do not depend on the schedule.
    """
    workers = torch.get_num_threads()
    if device.type != "cpu" or workers <= 1:
        yield lambda tasks: [task() for task in tasks]
        return
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield lambda tasks: [future.result() for future in [pool.submit(task) for task in tasks]]
    finally:
        torch.set_num_threads(workers)



def feature_source(feats: Any, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   normalize: bool = True) -> FeatureSource:
    """Wrap ``feats`` (see the module docstring for what is accepted) for block-wise reading."""
    return FeatureSource(feats, device=torch.device(device), dtype=dtype, normalize=normalize)
