"""Index interface, manifest, row bookkeeping and the create/open entry points.

An index maps int64 ids (assigned by the index, monotonic, never reused) to an image path and a
vector. Vectors are compared by inner product; callers L2-normalise them, so scores are cosines.
The backends (FAISS in-process, Milvus for scale-out) live in their own modules and are imported
only when used, so `import xmr.index` works without either package installed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from xmr.errors import XmrError

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "Index",
    "IndexStoreError",
    "Manifest",
    "RowTable",
    "create_index",
    "open_index",
    "read_manifest",
]

FORMAT_VERSION = 1
BACKENDS = ("faiss", "milvus")
METRICS = ("ip",)


class IndexStoreError(XmrError):
    """An index directory, its files or an index operation's arguments are invalid."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------------------------
@dataclass
class Manifest:
    """What an index holds and how it was built; stored as manifest.json in each version folder."""

    model_id: str  # the model that produced the vectors; callers refuse queries from another model
    dim: int
    metric: str = "ip"  # inner product on L2-normalised vectors (cosine)
    backend: str = "faiss"  # faiss | milvus
    kind: str = "flat"  # faiss: flat | hnsw | ivfpq ; milvus: FLAT | HNSW | IVF_FLAT
    params: dict[str, Any] = field(default_factory=dict)  # kind parameters, defaults filled in
    count: int = 0  # live vectors
    version: int = FORMAT_VERSION
    created: str = field(default_factory=_now)
    updated: str = field(default_factory=_now)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form (images_root, checkpoint, ...)
    next_id: int = 0  # the id the next added vector gets: persisted so ids are never reused

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any, source: str = "manifest") -> Manifest:
        """Validate a decoded manifest.json; errors name `source` (the file) and the field."""
        if not isinstance(d, dict):
            raise IndexStoreError(f"{source}: expected a JSON object, got {type(d).__name__}")
        version = d.get("version", FORMAT_VERSION)
        if not _is_int(version) or version < 1:
            raise IndexStoreError(f"{source}: field 'version' must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise IndexStoreError(f"{source}: index format version {version} was written by a newer xmr (this one "
                                  f"reads up to {FORMAT_VERSION}); upgrade xmr to open it")
        for key in ("model_id", "dim"):
            if key not in d:
                raise IndexStoreError(f"{source}: required field {key!r} is missing; the manifest is corrupt, "
                                      "rebuild the index with `xmr index build`")
        known = {f for f in cls.__dataclass_fields__}
        m = cls(**{k: v for k, v in d.items() if k in known})  # unknown keys: ignored (forward compatible)
        m.validate(source)
        return m

    def validate(self, source: str = "manifest") -> None:
        def bad(name: str, want: str) -> IndexStoreError:
            return IndexStoreError(f"{source}: field {name!r} must be {want}, got {getattr(self, name)!r}")

        if not isinstance(self.model_id, str) or not self.model_id:
            raise bad("model_id", "a non-empty string")
        if not _is_int(self.dim) or self.dim < 1:
            raise bad("dim", "a positive integer")
        if self.metric not in METRICS:
            raise bad("metric", f"one of {METRICS}")
        if self.backend not in BACKENDS:
            raise bad("backend", f"one of {BACKENDS}")
        if not isinstance(self.kind, str) or not self.kind:
            raise bad("kind", "a non-empty string")
        for name in ("params", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "a JSON object")
        for name in ("count", "next_id"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a non-negative integer")
        for name in ("created", "updated"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "an ISO time string")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------
# Interface
# ----------------------------------------------------------------------------------------------
@runtime_checkable
class Index(Protocol):
    """What every backend provides. Search is safe from several threads; mutations need exclusive use."""

    manifest: Manifest

    def add(self, vectors: np.ndarray, paths: Sequence[str]) -> np.ndarray: ...

    def remove(self, ids: Sequence[int]) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def path(self, id: int) -> str: ...

    def ids(self) -> np.ndarray: ...

    def items(self) -> Iterator[tuple[int, str]]: ...

    def save(self, directory: str | Path | None = None) -> Path: ...

    def __len__(self) -> int: ...


# ----------------------------------------------------------------------------------------------
# Row bookkeeping shared by the backends
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the backends
# ----------------------------------------------------------------------------------------------
def check_vectors(vectors: Any, dim: int, paths: Sequence[str]) -> np.ndarray:
    """add()'s vectors: a finite float32 (n, dim) array with one path per row."""
    if not isinstance(vectors, np.ndarray):
        raise IndexStoreError(f"add(vectors): expected a numpy array, got {type(vectors).__name__}")
    if vectors.dtype != np.float32:
        raise IndexStoreError(f"add(vectors): expected dtype float32, got {vectors.dtype}; convert with "
                              "vectors.astype(np.float32)")
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise IndexStoreError(f"add(vectors): expected shape (n, {dim}) for this index, got {vectors.shape}; "
                              "the vectors come from a model with another embedding size")
    if isinstance(paths, (str, bytes)) or len(paths) != len(vectors):
        raise IndexStoreError(f"add(paths): expected a sequence of {len(vectors)} paths (one per vector), got "
                              f"{len(paths) if not isinstance(paths, (str, bytes)) else 'a single string'}")
    if not all(isinstance(p, str) and p for p in paths):
        raise IndexStoreError("add(paths): every path must be a non-empty string")
    if not np.isfinite(vectors).all():
        bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
        raise IndexStoreError(f"add(vectors): row {bad} ({paths[bad]}) has NaN or infinite values")
    return np.ascontiguousarray(vectors)


def check_queries(queries: Any, dim: int, k: Any) -> tuple[np.ndarray, int]:
    """search()'s arguments: queries become a contiguous float32 (n, dim) array (1-D = one query)."""
    if not _is_int(k) or k < 1:
        raise IndexStoreError(f"search(k): must be an integer >= 1, got {k!r}")
    q = np.asarray(queries)
    if not np.issubdtype(q.dtype, np.floating):
        raise IndexStoreError(f"search(queries): expected a floating-point array, got dtype {q.dtype}")
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2 or q.shape[1] != dim:
        raise IndexStoreError(f"search(queries): expected shape (n, {dim}) or ({dim},), got {np.shape(queries)}; "
                              "the queries come from a model with another embedding size")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise IndexStoreError("search(queries): NaN or infinite values")
    return q, int(k)


def empty_results(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Padding: score -inf, id -1."""
    return np.full((n, k), -np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64)


def check_params(params: dict[str, Any] | None, defaults: dict[str, Any], where: str) -> dict[str, Any]:
    """Fill in defaults; unknown keys are refused so a typo does not silently fall back to a default."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise IndexStoreError(f"params: unknown key(s) {unknown} for {where}; known: {sorted(defaults)}")
    return {**defaults, **params}


# ----------------------------------------------------------------------------------------------
# Common behaviour of the backends
# ----------------------------------------------------------------------------------------------
class BaseIndex:
    """Row bookkeeping, argument checks and locking; backends implement the vector side."""

    def __init__(self, manifest: Manifest, table: RowTable, directory: Path | None) -> None:
        self.manifest = manifest
        self._table = table
        self._directory = directory
        self._lock = threading.RLock()  # serialises mutations (add/remove/save)

    # -- backend hooks ---------------------------------------------------------------------------
    def _add_rows(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        raise NotImplementedError

    def _remove_rows(self, rows: np.ndarray, ids: np.ndarray) -> None:
        raise NotImplementedError

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, paths: Sequence[str]) -> np.ndarray:
        """Add (n, dim) float32 vectors (already L2-normalised) with their paths; returns their new ids."""
        vectors = check_vectors(vectors, self.manifest.dim, paths)
        if len(vectors) == 0:
            return np.empty(0, dtype=np.int64)
        with self._lock:
            ids = self._table.allocate(list(paths))
            try:
                self._add_rows(vectors, ids)
            except BaseException:
                self._rollback(len(ids))
                raise
            return ids.copy()

    def _rollback(self, n: int) -> None:
        """Forget the last n allocated rows after a failed add (ids stay consumed: never reused)."""
        table = self._table
        keep = table.rows - n
        ids, paths = table.row_ids[:keep], table.paths[:keep]
        fresh = RowTable(ids, paths, table.next_id)
        fresh.dead = table.dead
        self._table = fresh

    def remove(self, ids: Sequence[int]) -> int:
        """Remove items by id; unknown or already removed ids are ignored. Returns how many were removed."""
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise IndexStoreError(f"remove(ids): expected integer ids, got dtype {ids.dtype}")
        with self._lock:
            rows = self._table.remove(ids)
            if len(rows):
                self._remove_rows(rows, self._table.row_ids[rows])
            return len(rows)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (n, k) float32 scores, descending, and (n, k) int64 ids; -inf/-1 pad."""
        q, k = check_queries(queries, self.manifest.dim, k)
        if len(self._table) == 0 or len(q) == 0:
            return empty_results(len(q), k)
        return self._search(q, k)

    def path(self, id: int) -> str:
        """Path of a live item; KeyError for an unknown or removed id."""
        return self._table.path(int(id))

    def ids(self) -> np.ndarray:
        return self._table.live_ids()

    def items(self) -> Iterator[tuple[int, str]]:
        """(id, path) of every live item, in id order."""
        return self._table.items()

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        m = self.manifest
        return f"<{type(self).__name__} {m.backend}/{m.kind} dim={m.dim} items={len(self)} at {self._directory}>"

    def _target(self, directory: str | Path | None) -> Path:
        if directory is None:
            if self._directory is None:
                raise IndexStoreError("save(): this index was never saved; pass the directory to save it to")
            return self._directory
        return Path(directory)

    def _next_manifest(self, count: int, **params: Any) -> Manifest:
        m = self.manifest
        return Manifest(**{**m.to_dict(), "count": count, "next_id": self._table.next_id, "updated": _now(),
                           "version": FORMAT_VERSION, "params": {**m.params, **params}})


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
def _backend(name: str) -> Any:
    if name == "faiss":
        from xmr.index.faiss_index import FaissIndex

        return FaissIndex
    if name == "milvus":
        from xmr.index.milvus_index import MilvusIndex

        return MilvusIndex
    raise IndexStoreError(f"backend={name!r}: use one of {BACKENDS}")


def create_index(dim: int, model_id: str, *, backend: str = "faiss", kind: str = "flat",
                 params: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Index:
    """A new, empty, unsaved index; `save(directory)` writes it."""
    cls = _backend(backend)
    manifest = Manifest(model_id=model_id, dim=dim, backend=backend, kind=kind, extra=dict(extra or {}))
    manifest.validate("create_index()")
    return cls.create(manifest, params)


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of the index's live version (validated)."""
    from xmr.index import storage

    path = storage.current_version(Path(directory)) / storage.MANIFEST
    return Manifest.from_dict(storage.read_json(path), str(path))


def open_index(directory: str | Path, *, mmap: bool = False) -> Index:
    """Open a saved index; with mmap=True the stored vectors are memory-mapped instead of read."""
    from xmr.index import storage

    directory = Path(directory)
    for attempt in range(3):
        folder = storage.current_version(directory)
        path = folder / storage.MANIFEST
        try:
            manifest = Manifest.from_dict(storage.read_json(path), str(path))
            index = _backend(manifest.backend).load(folder, manifest, directory, mmap=mmap)
        except FileNotFoundError as e:
            if attempt < 2 and storage.current_version(directory) != folder:
                time.sleep(0.05)  # a concurrent save replaced this version while we read it: retry
                continue
            raise IndexStoreError(f"{e.filename}: missing from the index's live version; the index is corrupt, "
                                  "rebuild it with `xmr index build`") from e
        storage.clean_stale(directory)
        return index
    raise AssertionError("unreachable")
