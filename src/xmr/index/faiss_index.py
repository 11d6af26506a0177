"""In-process FAISS backend: exact `flat`, graph-based `hnsw`, compressed `ivfpq`.

All kinds keep the float32 vectors themselves (vectors.npy): flat searches them directly, hnsw
needs them to rebuild without removed items, ivfpq re-ranks its approximate candidates exactly,
and `vectors(ids)` returns them. Side arrays (`add(..., extras=...)`) are kept by `BaseIndex` and
saved next to the vectors (extra.NAME.npy, see `xmr.index.storage`).

* flat: exact top-k by brute force (FAISS's blocked BLAS kernel), chunk by chunk over a
  memory-mapped vectors.npy when opened with mmap=True, so memory stays bounded.
* hnsw: IndexHNSWFlat; FAISS cannot delete from the graph, so removed rows are tombstones that a
  bitmap selector hides from results, and save() rebuilds the graph without them (a full rebuild:
  slow for millions of vectors). Its vectors.npy is always memory-mapped after loading, since the
  graph holds its own copy for search.
* ivfpq: IndexIVFPQ with our ids as labels (native remove_ids). Training needs data, so until
  `train_min` vectors have been added the index *buffers*: searches are exact over the stored
  vectors, and the add that reaches `train_min` trains on (a sample of) everything added so far.
  Candidates are re-ranked by exact inner product over the stored vectors (`rerank`).
  With `nlist` unset ("auto", the default) training waits for save(), which picks nlist and
  nprobe from the number of vectors by `auto_ivf_params` (measured rule, see there).

Opened with mmap=True, vectors.npy and the FAISS structure are memory-mapped (FAISS
IO_FLAG_MMAP for IVF lists, IO_FLAG_MMAP_IFC for HNSW's vectors): a 1M index opens in well under a second and its pages are read
only when a search touches them. A mapped FAISS structure is read-only, so the first add/remove
on a mapped hnsw/ivfpq index reads it into memory first.
"""

from __future__ import annotations

import math
import mmap as mmap_module
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from xmr.index import storage
from xmr.index.base import BaseIndex, IndexStoreError, Manifest, check_params, empty_results
from xmr.index.rows import Rows, RowTable

__all__ = ["KINDS", "FaissIndex", "auto_ivf_params"]

KINDS: dict[str, dict[str, Any]] = {
    "flat": {},
    # efConstruction 80 (was 200): 2.5x faster build (50k clustered 512-d: 19 s vs 48 s on 2 cores), same
    # recall at 50k-100k (1.0); at 1M recall@10 0.979 with efSearch 128 (0.934 with 64)
    "hnsw": {"M": 32, "efConstruction": 80, "efSearch": 128},
    # nlist=None: auto by size at save(); nprobe=None: auto from nlist; m=None: chosen from dim;
    # rerank=None: 10*k candidates; train_min/train_max=None: from nlist, nbits
    "ivfpq": {"nlist": None, "m": None, "nbits": 8, "nprobe": None, "rerank": None, "train_min": None,
              "train_max": None},
}
MMAP_BLOCK_ROWS = 65_536  # rows searched at once from a memory-mapped file (128 MiB at 512-d)
FAISS_MIN_BATCH = 20  # below this many queries numpy searches flat blocks faster
FAISS_FILE = "faiss.index"
RERANK_PER_K = 10  # ivfpq candidates re-ranked exactly per result: 4 gave recall@10 0.975 at 1M, 10 gave 0.999


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise IndexStoreError("the faiss index backend needs FAISS: pip install faiss-cpu") from e
    return faiss


def _faiss_topk(queries: np.ndarray, block: np.ndarray, k: int, dead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of one block by FAISS's blocked BLAS kernel, over-fetching past the tombstones."""
    faiss = _faiss()
    kk = min(len(block), k + len(dead))
    scores, rows = faiss.knn(queries, block, kk, metric=faiss.METRIC_INNER_PRODUCT)
    if len(dead):
        hidden = np.isin(rows, dead)
        scores[hidden], rows[hidden] = -np.inf, -1
    return scores, rows


def _numpy_topk(queries: np.ndarray, block: np.ndarray, k: int, dead: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows of one block by a matmul and argpartition (unsorted; the merge sorts)."""
    sim = queries @ block.T
    sim[:, dead] = -np.inf
    kk = min(len(block), k)
    rows = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
    scores = np.take_along_axis(sim, rows, axis=1)
    return scores, np.where(np.isneginf(scores), -1, rows)


def _advise_random(a: np.ndarray) -> None:
    """Tell the kernel a memory-mapped array is read at random, so a touched row does not pull in
    ~128 KiB of readahead around it (resident memory then grows with the rows actually read)."""
    mapping = getattr(a, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap_module, "MADV_RANDOM"):
        try:
            mapping.madvise(mmap_module.MADV_RANDOM)
        except OSError:
            pass  # advice only


def _merge_topk(best: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Keep the k highest scores of two (n, *) candidate sets; stable, so earlier rows win ties."""
    scores = np.concatenate([best[0], new[0]], axis=1)
    rows = np.concatenate([best[1], new[1]], axis=1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


# ----------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------
class FaissIndex(BaseIndex):
    """See the module docstring. Create with `xmr.index.create_index`, open with `open_index`."""

    def __init__(self, manifest: Manifest, table: RowTable, vectors: Rows, index: Any,
                 directory: Path | None, mmap: bool, faiss_file: Path | None = None,
                 extras: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__(manifest, table, directory, extras)
        self._vectors = vectors
        self._index = index  # None for flat, and for an "auto" ivfpq until it is trained
        self._mmap = mmap
        self._faiss_file = faiss_file if mmap else None  # the file _index is mapped from, if it is
        self._selector: tuple[int, int, Any, Any] | None = None  # (rows, dead, bitmap, selector)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def create(cls, manifest: Manifest, params: dict[str, Any] | None) -> FaissIndex:
        faiss = _faiss()
        kind = manifest.kind.lower()
        if kind not in KINDS:
            raise IndexStoreError(f"kind={manifest.kind!r}: the faiss backend offers {sorted(KINDS)}")
        manifest.kind = kind
        manifest.params = _resolve_params(kind, manifest.dim, params)
        index = None
        if kind != "ivfpq" or manifest.params["nlist"] is not None:  # "auto" ivfpq: created when it trains
            index = _new_faiss_index(faiss, kind, manifest.dim, manifest.params)
        return cls(manifest, RowTable(), _vector_rows(manifest.dim), index, None, mmap=False)

    @classmethod
    def load(cls, folder: Path, manifest: Manifest, directory: Path, *, mmap: bool = False) -> FaissIndex:
        kind = manifest.kind
        if kind not in KINDS:
            raise IndexStoreError(f"{folder / storage.MANIFEST}: kind {kind!r} is not a faiss kind {sorted(KINDS)}")
        manifest.params = _resolve_params(kind, manifest.dim, manifest.params, source=str(folder / storage.MANIFEST))
        table = storage.load_table(folder, manifest)
        path = folder / "vectors.npy"
        vectors = storage.load_npy(path, mmap=mmap or kind == "hnsw", dtype=np.float32, ndim=2)
        if vectors.shape != (table.rows, manifest.dim):
            raise IndexStoreError(f"{path}: shape {vectors.shape} does not match the {table.rows} ids of dimension "
                                  f"{manifest.dim}; the index is corrupt, rebuild it")
        if mmap and kind == "ivfpq":
            _advise_random(vectors)  # re-ranking reads scattered rows: no readahead of their neighbours
        extras = storage.load_extras(folder, manifest, table.rows, mmap=mmap)
        faiss_file = folder / FAISS_FILE
        index = None
        if kind == "hnsw" or (kind == "ivfpq" and (manifest.params["nlist"] is not None or faiss_file.exists())):
            index = _read_faiss(faiss_file, manifest, table, mmap=mmap)
        return cls(manifest, table, _vector_rows(manifest.dim, vectors), index, directory, mmap,
                   faiss_file if index is not None else None, extras)

    def _ivf_trained(self) -> bool:
        return self._index is not None and self._index.is_trained

    def _own_faiss(self) -> None:
        """Before mutating: read a memory-mapped FAISS structure into memory (mapped ones are read-only)."""
        if self._faiss_file is None:
            return
        if not self._faiss_file.is_file():
            raise IndexStoreError(f"{self._faiss_file}: the version this index was opened from has been replaced "
                                  "by another save; reopen the index before changing it")
        self._index = _read_faiss(self._faiss_file, self.manifest, self._table, mmap=False,
                                  expected=self._index.ntotal)
        self._faiss_file = None

    # -- mutation hooks ----------------------------------------------------------------------------
    def _add_rows(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        kind = self.manifest.kind
        self._own_faiss()
        if kind == "hnsw":
            self._index.add(vectors)  # labels = row numbers: the graph is append-only like our rows
        elif kind == "ivfpq" and self._ivf_trained():
            self._index.add_with_ids(vectors, ids)
        self._vectors.append(vectors)
        if kind == "ivfpq" and not self._ivf_trained():
            train_min = self.manifest.params["train_min"]
            if train_min is not None and len(self._table) >= train_min:
                self._train_ivfpq()

    def _remove_rows(self, rows: np.ndarray, ids: np.ndarray) -> None:
        if self.manifest.kind == "ivfpq" and self._ivf_trained():
            self._own_faiss()
            self._index.remove_ids(ids)
        # flat and hnsw: the tombstones in the row table hide the rows until save() compacts them

    def _train_ivfpq(self) -> None:
        p, table = self.manifest.params, self._table
        live = np.flatnonzero(table.live_mask()) if table.dead else np.arange(table.rows)
        if p["nlist"] is None:  # auto: sized for the vectors present now
            auto = auto_ivf_params(len(live), p["nbits"])
            p.update(nlist=auto["nlist"], nprobe=p["nprobe"] or auto["nprobe"])
            p.update(_resolve_params("ivfpq", self.manifest.dim, p))
            self._index = _new_faiss_index(_faiss(), "ivfpq", self.manifest.dim, p)
        rng = np.random.default_rng(0)  # a fixed sample: the same data trains the same index
        sample = np.sort(rng.choice(live, p["train_max"], replace=False)) if len(live) > p["train_max"] else live
        self._index.train(self._vectors.gather(sample))
        mask = table.live_mask()
        ids = table.row_ids if mask is None else table.row_ids[mask]
        at = 0
        for block in self._vectors.live_chunks(mask):
            self._index.add_with_ids(block, ids[at : at + len(block)])
            at += len(block)

    # -- search ------------------------------------------------------------------------------------
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kind = self.manifest.kind
        if kind == "hnsw":
            scores, rows = self._search_hnsw(queries, k)
            return self._rows_to_ids(scores, rows)
        if kind == "ivfpq" and self._ivf_trained():
            return self._search_ivfpq(queries, k)
        return self._rows_to_ids(*self._search_exact(queries, k))

    def _rows_to_ids(self, scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        table = self._table
        valid = (rows >= 0) & np.isfinite(scores)
        if table.dead:  # belt and braces: a tombstoned row must never come out
            valid &= ~np.isin(rows, table.dead_rows())
        ids = np.where(valid, table.row_ids[np.where(valid, rows, 0)], -1)
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        order = np.argsort(~valid, axis=1, kind="stable")  # pushes holes to the end, keeps score order
        return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def _gather_vectors(self, rows: np.ndarray) -> np.ndarray:
        return self._vectors.gather(rows)  # every kind keeps its float32 vectors (vectors.npy)

    def _search_exact(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over all rows, block by block, skipping tombstones: (scores, rows)."""
        dead = self._table.dead_rows() if self._table.dead else np.empty(0, np.int64)
        # FAISS's kernel is single-threaded per query below 20 queries; numpy's BLAS matvec is not
        block_topk = _numpy_topk if len(queries) < FAISS_MIN_BATCH else _faiss_topk
        best = empty_results(len(queries), k)
        for start, block in self._vectors.blocks(MMAP_BLOCK_ROWS):
            lo, hi = np.searchsorted(dead, [start, start + len(block)])
            scores, rows = block_topk(queries, block, k, dead[lo:hi] - start)
            best = _merge_topk(best, (scores, np.where(rows >= 0, rows + start, -1)), k)
        return best

    def _hnsw_selector(self) -> tuple[int, int, np.ndarray, Any]:
        """A bitmap of live rows for FAISS's search-time filter, rebuilt when rows or tombstones change.

        Returns the whole cache entry: the caller holds it while searching, since the selector only
        points into the bitmap (a concurrent rebuild must not free it mid-search).
        """
        table = self._table
        cached = self._selector
        if cached is not None and cached[0] == table.rows and cached[1] == len(table.dead):
            return cached
        faiss = _faiss()
        bitmap = np.packbits(table.live_mask(), bitorder="little")
        cached = (table.rows, len(table.dead), bitmap, faiss.IDSelectorBitmap(table.rows, faiss.swig_ptr(bitmap)))
        self._selector = cached
        return cached

    def _search_hnsw(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        params = faiss.SearchParametersHNSW()
        ef = max(self.manifest.params["efSearch"], k)
        params.efSearch = ef
        keep_alive = self._hnsw_selector() if self._table.dead else None
        if keep_alive is not None:
            params.sel = keep_alive[3]
        want = min(k, len(self._table))
        scores, rows = self._index.search(queries, k, params=params)
        for _ in range(3):  # heavy filtering can starve the beam: widen it for the rows that came up short
            short = np.flatnonzero((rows[:, :want] < 0).any(axis=1))
            if not len(short):
                break
            ef *= 4
            params.efSearch = ef
            scores[short], rows[short] = self._index.search(queries[short], k, params=params)
        del keep_alive  # the bitmap may go only after the last search that uses it
        return scores, rows

    def _search_ivfpq(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        p = self.manifest.params
        rerank = RERANK_PER_K * k if p["rerank"] is None else int(p["rerank"])
        fetch = max(k, rerank)
        params = faiss.SearchParametersIVF()
        params.nprobe = p["nprobe"]
        scores, ids = self._index.search(queries, fetch, params=params)
        if rerank:
            scores = self._exact_scores(queries, ids)
        scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)  # FAISS pads with -FLT_MAX
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
        return scores, np.where(np.isfinite(scores), ids, -1)

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Exact inner products of each query with its candidates (-inf for holes)."""
        rows = self._table.rows_of(ids).reshape(ids.shape)
        out = np.full(ids.shape, -np.inf, dtype=np.float32)
        for s in range(0, len(queries), 256):  # bounds the gathered (batch, candidates, dim) block
            r = rows[s : s + 256]
            valid = r >= 0
            cand = self._vectors.gather(np.where(valid, r, 0))
            exact = np.einsum("nd,nkd->nk", queries[s : s + 256], cand)
            out[s : s + 256] = np.where(valid, exact, -np.inf)
        return out

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: str | Path | None = None) -> Path:
        """Write a new version atomically (see storage); removed items are compacted away."""
        faiss = _faiss()
        with self._lock:
            target = self._target(directory)
            p = self.manifest.params
            if (self.manifest.kind == "ivfpq" and p["nlist"] is None and not self._ivf_trained()
                    and len(self._table) >= auto_ivf_min(p["nbits"])):
                self._train_ivfpq()  # "auto": now the gallery's size is known
            mask = self._table.live_mask()
            table = self._table.compacted()
            index, mapped_from = self._index, self._faiss_file
            if self.manifest.kind == "hnsw" and mask is not None:
                index, mapped_from = self._rebuild_hnsw(mask), None
            writers = {**storage.table_writers(table), "vectors.npy": lambda p: self._vectors.write_npy(p, mask),
                       **storage.extra_writers(self._extras, mask)}
            if mapped_from is not None:  # unchanged since mapped: copy the file (FAISS would write a reference)
                writers[FAISS_FILE] = lambda p: shutil.copyfile(mapped_from, p)
            elif index is not None:
                writers[FAISS_FILE] = lambda p: faiss.write_index(index, str(p))
            manifest = self._next_manifest(len(table))
            folder = storage.save_version(target, manifest.to_dict(), writers)
            self._faiss_file = folder / FAISS_FILE if mapped_from is not None else None
            self._adopt(folder, manifest, mask)
            self._table, self._index, self._selector = table, index, None
            self.manifest, self._directory = manifest, target
            return folder

    def _adopt(self, folder: Path, manifest: Manifest, mask: np.ndarray | None) -> None:
        """After a save, use the new version's compacted rows: mapped when they were (the old files go), else read."""
        if mask is not None or self._mmap or self.manifest.kind == "hnsw" or len(self._vectors.parts) > 1:
            mapped = self._mmap or self.manifest.kind == "hnsw"
            base = storage.load_npy(folder / "vectors.npy", mmap=mapped)
            self._vectors = _vector_rows(manifest.dim, base)
        self._adopt_extras(lambda: storage.load_extras(folder, manifest, manifest.count, mmap=self._mmap), mask,
                           self._mmap)

    def _rebuild_hnsw(self, mask: np.ndarray) -> Any:
        faiss = _faiss()
        index = _new_faiss_index(faiss, "hnsw", self.manifest.dim, self.manifest.params)
        for block in self._vectors.live_chunks(mask):
            index.add(block)
        return index


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _vector_rows(dim: int, base: np.ndarray | None = None) -> Rows:
    return Rows((dim,), np.float32, base)


MIN_POINTS_PER_CENTROID = 39  # FAISS's k-means warns below this many training points per centroid


def auto_ivf_params(n: int, nbits: int = 8) -> dict[str, int]:
    """nlist and nprobe for an IVF-PQ index over n vectors: the rule behind nlist=None / nprobe=None.

    nlist ~ 2 sqrt(n), a power of two: the single-query cost is a scan of the nlist centroids plus
    nprobe/nlist of the n codes, which 2 sqrt(n) keeps small, while k-means training (the build's
    main cost) grows with nlist. On clustered 512-d vectors (benchmarks/search.py) recall@10 did not
    move with nprobe from 16 to 128 at 1M (nlist 2048): it is bounded by the PQ candidates that
    reach the exact re-ranking (10*k candidates: 0.999; 4*k: 0.975), so nprobe = nlist / 128, at
    least 16: 1M vectors -> nlist 2048, nprobe 16. nlist is capped so that k-means has
    MIN_POINTS_PER_CENTROID points per centroid.
    """
    if n < 1:
        raise IndexStoreError(f"auto_ivf_params(n): need at least one vector, got {n}")
    nlist = 2 ** max(0, round(math.log2(2 * math.sqrt(n))))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return {"nlist": nlist, "nprobe": _auto_nprobe(nlist)}


def _auto_nprobe(nlist: int) -> int:
    return min(nlist, max(16, nlist // 128))


def auto_ivf_min(nbits: int) -> int:
    """Fewest vectors an "auto" ivfpq trains on (PQ k-means needs 2**nbits centroids); below, it stays exact."""
    return MIN_POINTS_PER_CENTROID * 2**nbits


def _resolve_params(kind: str, dim: int, params: dict[str, Any] | None, source: str = "create_index()"
                    ) -> dict[str, Any]:
    """Defaults filled in and checked, so the manifest records the values actually used."""
    p = check_params(params, KINDS[kind], f"faiss kind {kind!r} ({source})")

    def positive(name: str) -> None:
        if isinstance(p[name], bool) or not isinstance(p[name], int) or p[name] < 1:
            raise IndexStoreError(f"{source}: params[{name!r}] must be a positive integer, got {p[name]!r}")

    if kind == "hnsw":
        for name in p:
            positive(name)
    if kind == "ivfpq":
        if p["m"] is None:
            p["m"] = next(m for m in (64, 48, 32, 24, 16, 12, 8, 6, 4, 3, 2, 1) if dim % m == 0 and m <= dim)
        for name in ("nlist", "m", "nbits", "nprobe", "train_min", "train_max"):
            if p[name] is not None or name in ("m", "nbits"):
                positive(name)
        if dim % p["m"]:
            raise IndexStoreError(f"{source}: params['m']={p['m']} must divide the dimension {dim}")
        if p["nbits"] > 16:
            raise IndexStoreError(f"{source}: params['nbits'] must be <= 16, got {p['nbits']}")
        if p["nlist"] is None:  # auto: nlist, nprobe and the training sizes are chosen when it trains
            return p
        if p["nprobe"] is None:
            p["nprobe"] = _auto_nprobe(p["nlist"])
        cells = max(p["nlist"], 2 ** p["nbits"])
        if p["train_min"] is None:
            p["train_min"] = MIN_POINTS_PER_CENTROID * cells
        if p["train_max"] is None:
            p["train_max"] = max(64 * cells, p["train_min"])
        if p["train_min"] < cells:
            raise IndexStoreError(f"{source}: params['train_min'] must be >= max(nlist, 2**nbits) = {cells}")
        if p["rerank"] is not None and (isinstance(p["rerank"], bool) or not isinstance(p["rerank"], int)
                                        or p["rerank"] < 0):
            raise IndexStoreError(f"{source}: params['rerank'] must be null (10*k) or an integer >= 0")
    return p


def _new_faiss_index(faiss: Any, kind: str, dim: int, p: dict[str, Any]) -> Any:
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, p["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["efConstruction"]
        index.hnsw.efSearch = p["efSearch"]
        return index
    if kind == "ivfpq":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT)
        index.own_fields = True  # the IVF index frees its quantizer
        quantizer.this.disown()
        return index
    return None


def _read_faiss(path: Path, manifest: Manifest, table: RowTable, *, mmap: bool = False,
                expected: int | None = None) -> Any:
    """Read (or with mmap=True, memory-map) a stored FAISS structure and check it against the rows."""
    faiss = _faiss()
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    # IVF lists map through IO_FLAG_MMAP (OnDiskInvertedLists); HNSW's flat storage through _IFC.
    # Combined, FAISS refuses (the IFC reader is not a plain file), so one flag per kind.
    flags = 0 if not mmap else faiss.IO_FLAG_MMAP if manifest.kind == "ivfpq" else faiss.IO_FLAG_MMAP_IFC
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise IndexStoreError(f"{path}: not a readable FAISS index ({str(e).splitlines()[0][:200]}); the index "
                              "is corrupt, rebuild it") from e
    if index.d != manifest.dim:
        raise IndexStoreError(f"{path}: dimension {index.d} differs from the manifest's {manifest.dim}")
    if expected is None:
        expected = table.rows if manifest.kind == "hnsw" or index.is_trained else 0
    if index.ntotal != expected:
        raise IndexStoreError(f"{path}: holds {index.ntotal} vectors but ids.npy lists {table.rows}; the index "
                              "is corrupt, rebuild it")
    return index
