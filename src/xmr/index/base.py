"""Index interface, manifest, side-array specs, row bookkeeping and the behaviour shared by the backends.

An index maps int64 ids (assigned by the index, monotonic, never reused) to an image path, a vector
and, optionally, named side arrays (e.g. per-image region features for a second scoring stage).
Vectors are compared by inner product; callers L2-normalise them, so scores are cosines. The side
arrays of an index are fixed by the rows it holds: the first add() into an index without rows names
them (and their per-row shapes), and every later add() must bring the same ones.

This module imports no backend and not the storage layer: `xmr.index.factory` creates and opens
indexes through the registry `xmr.registry.INDEX_BACKENDS`, and the backends (FAISS in-process,
Milvus for scale-out) import this module, so `import xmr.index` works without either package.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from xmr.errors import XmrError
from xmr.index.rows import Rows, RowTable
from xmr.registry import INDEX_BACKENDS

__all__ = [
    "BACKENDS",
    "FORMAT_VERSION",
    "BaseIndex",
    "ExtraSpec",
    "Index",
    "IndexStoreError",
    "Manifest",
    "RowTable",
    "check_extras",
]

FORMAT_VERSION = 2  # 2: side arrays (manifest "extras", extra.NAME.npy); version 1 folders read as before
BACKENDS = ("faiss", "milvus")  # the built-in backends; xmr.registry.INDEX_BACKENDS may hold more
METRICS = ("ip",)


class IndexStoreError(XmrError):
    """An index directory, its files or an index operation's arguments are invalid."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------------
# Side arrays
# ----------------------------------------------------------------------------------------------
EXTRA_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")  # a file-name component: extra.NAME.npy


def stored_dtype(dtype: Any) -> np.dtype | None:
    """The dtype a side array is stored in: float16 for floating arrays, bool and integers as they are."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return np.dtype(np.float16)
    if dtype == np.bool_ or np.issubdtype(dtype, np.integer):
        return dtype
    return None


@dataclass(frozen=True)
class ExtraSpec:
    """A named side array: every row of the index has one value of per-row `shape`, stored as `dtype`."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float16" for floating arrays; bool and integer arrays keep their dtype

    @classmethod
    def of(cls, name: Any, array: Any, where: str) -> ExtraSpec:
        """The spec of a side array given to add(): `array` is (n, *shape)."""
        if not isinstance(name, str) or not EXTRA_NAME.match(name):
            raise IndexStoreError(f"{where}: side array name {name!r} must be a letter followed by up to 63 "
                                  "letters, digits or underscores")
        if not isinstance(array, np.ndarray) or array.ndim < 1:
            got = f"shape {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
            raise IndexStoreError(f"{where}[{name!r}]: expected a numpy array of shape (n, ...), got {got}")
        dtype = stored_dtype(array.dtype)
        if dtype is None:
            raise IndexStoreError(f"{where}[{name!r}]: dtype {array.dtype} cannot be stored; use a floating "
                                  "(stored as float16), integer or bool array")
        return cls(name, tuple(int(s) for s in array.shape[1:]), dtype.name)

    @classmethod
    def from_dict(cls, d: Any, source: str) -> ExtraSpec:
        ok = (isinstance(d, dict) and isinstance(d.get("name"), str) and EXTRA_NAME.match(d["name"])
              and isinstance(d.get("shape"), (list, tuple)) and all(_is_int(x) and x >= 0 for x in d["shape"])
              and isinstance(d.get("dtype"), str))
        if ok:
            try:
                ok = stored_dtype(d["dtype"]) == np.dtype(d["dtype"])
            except TypeError:
                ok = False
        if not ok:
            raise IndexStoreError(f"{source}: field 'extras' must list {{name, shape, dtype}} objects (a name of "
                                  f"letters, digits and underscores, a per-row shape, a stored dtype), got {d!r}")
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    def describe(self) -> str:
        return f"{self.name!r} (per-row shape {self.shape}, {self.dtype})"

    def cast(self, array: Any, n: int, where: str) -> np.ndarray:
        """`array` checked against this spec ((n, *shape), storable, finite) and cast to the stored dtype."""
        if not isinstance(array, np.ndarray) or array.shape != (n, *self.shape):
            got = f"shape {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
            raise IndexStoreError(f"{where}[{self.name!r}]: expected a numpy array of shape {(n, *self.shape)} "
                                  f"(one row per vector), got {got}")
        dtype = np.dtype(self.dtype)
        if stored_dtype(array.dtype) != dtype and not (dtype != np.float16 and np.can_cast(array.dtype, dtype)):
            raise IndexStoreError(f"{where}[{self.name!r}]: this side array is stored as {self.dtype}, got "
                                  f"dtype {array.dtype}")
        if dtype == np.float16:
            with np.errstate(over="ignore", invalid="ignore"):
                out = np.ascontiguousarray(array, dtype=np.float16)
            finite = np.isfinite(out).reshape(n, -1).all(axis=1)
            if not finite.all():
                raise IndexStoreError(f"{where}[{self.name!r}]: row {int(np.flatnonzero(~finite)[0])} has NaN, "
                                      "infinite or out-of-float16-range (|x| > 65504) values")
            return out
        return np.ascontiguousarray(array, dtype=dtype)


def check_extras(extras: Mapping[str, np.ndarray] | None, n: int, specs: Sequence[ExtraSpec] | None,
                 where: str = "add(extras)", holder: str = "this index"
                 ) -> tuple[dict[str, np.ndarray], tuple[ExtraSpec, ...]]:
    """Side arrays for n new rows, checked and cast to their stored dtypes, and their specs.

    `specs` are those the rows must bring (the holder's, once it has rows); None: these arrays define
    them. Errors name `where` (the call) and the side array, and speak of `holder` (what keeps them).
    """
    if extras is None:
        extras = {}
    if not isinstance(extras, Mapping):
        raise IndexStoreError(f"{where}: expected a dict of name -> numpy array, got {type(extras).__name__}")
    if specs is None:
        specs = [ExtraSpec.of(name, extras[name], where) for name in extras]
    specs = tuple(specs)
    names = [s.name for s in specs]
    for spec in specs:
        if spec.name not in extras:
            raise IndexStoreError(f"{where}: side array {spec.describe()} is missing; {holder} keeps it for every "
                                  f"row, so pass extras={{{spec.name!r}: array of shape (n, *{spec.shape})}}")
    for name in extras:
        if name not in names:
            raise IndexStoreError(f"{where}: {name!r} is not a side array of {holder} (it keeps "
                                  f"{', '.join(map(repr, names)) or 'none'}); the side arrays are fixed by the first "
                                  "rows added, so use a separate one for other side arrays")
    return {s.name: s.cast(extras[s.name], n, where) for s in specs}, specs


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
    extras: list[dict[str, Any]] = field(default_factory=list)  # side arrays (ExtraSpec.to_dict() each); not `extra`

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
        if self.backend not in INDEX_BACKENDS:
            raise bad("backend", f"one of {tuple(INDEX_BACKENDS.names())}")
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
        if not isinstance(self.extras, list):
            raise bad("extras", "a list of side-array specs")
        names = [spec.name for spec in self.extra_specs(source)]
        if len(set(names)) != len(names):
            raise bad("extras", "a list of side arrays with distinct names")

    def extra_specs(self, source: str = "manifest") -> tuple[ExtraSpec, ...]:
        """The side arrays the index keeps for every row (empty for an index without them)."""
        return tuple(ExtraSpec.from_dict(d, source) for d in self.extras)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------------
# Interface
# ----------------------------------------------------------------------------------------------
IdArray = Sequence[int] | np.ndarray


@runtime_checkable
class Index(Protocol):
    """What every backend provides. Reads (search, vectors, extras, path) are safe from several threads;
    mutations (add, remove, save) need exclusive use."""

    manifest: Manifest

    def add(self, vectors: np.ndarray, paths: Sequence[str],
            extras: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Add (n, dim) float32 vectors with their paths and side arrays {name: (n, ...)}; returns the new ids."""
        ...

    def remove(self, ids: IdArray) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def vectors(self, ids: IdArray) -> np.ndarray:
        """The stored (normalised) float32 vectors of live ids: (*ids.shape, dim); KeyError for another id."""
        ...

    def extras(self, ids: IdArray, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Side arrays of live ids: {name: (*ids.shape, *per-row shape)}, all of them when names is None."""
        ...

    @property
    def extra_names(self) -> tuple[str, ...]:
        """Names of the side arrays this index keeps for every row."""
        ...

    def path(self, id: int) -> str: ...

    def ids(self) -> np.ndarray: ...

    def items(self) -> Iterator[tuple[int, str]]: ...

    def save(self, directory: str | Path | None = None) -> Path: ...

    def __len__(self) -> int: ...


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
    """Row bookkeeping, side arrays, argument checks and locking; backends implement the vector side.

    The side arrays live here for every backend, one `Rows` per name aligned with the row table; the
    backends save them (`storage.extra_writers`) and load them (`storage.load_extras`) with their rows.
    """

    def __init__(self, manifest: Manifest, table: RowTable, directory: Path | None,
                 extras: Mapping[str, np.ndarray] | None = None) -> None:
        self.manifest = manifest
        self._table = table
        self._directory = directory
        self._lock = threading.RLock()  # serialises mutations (add/remove/save)
        self._extras = _extra_rows(manifest.extra_specs(), extras)

    # -- backend hooks ---------------------------------------------------------------------------
    def _add_rows(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        raise NotImplementedError

    def _remove_rows(self, rows: np.ndarray, ids: np.ndarray) -> None:
        raise NotImplementedError

    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def _gather_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of valid, live row numbers (any shape) -> (*rows.shape, dim) float32."""
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, paths: Sequence[str],
            extras: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Add (n, dim) float32 vectors (already L2-normalised) with their paths and side arrays; returns
        their new ids. `extras` maps each side-array name to an (n, ...) array (floating ones are stored
        as float16); an index with rows needs exactly the side arrays it keeps, an empty one takes any."""
        vectors = check_vectors(vectors, self.manifest.dim, paths)
        with self._lock:
            defining = self._table.rows == 0  # no rows, live or removed: this add names the side arrays
            arrays, specs = check_extras(extras, len(vectors), None if defining else self.manifest.extra_specs())
            if len(vectors) == 0:
                return np.empty(0, dtype=np.int64)
            if defining:
                self.manifest.extras = [spec.to_dict() for spec in specs]
                self._extras = _extra_rows(specs, None)
            ids = self._table.allocate(list(paths))
            try:
                for name, array in arrays.items():
                    self._extras[name].append(array)
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
        for rows in self._extras.values():
            rows.truncate(keep)

    def remove(self, ids: IdArray) -> int:
        """Remove items by id; unknown or already removed ids are ignored. Returns how many were removed."""
        ids = _id_array(ids, "remove").reshape(-1)
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

    def vectors(self, ids: IdArray) -> np.ndarray:
        """The stored (normalised) vectors of live ids: (*ids.shape, dim) float32 (a list of n ids: (n, dim)).
        KeyError naming the first unknown or removed id."""
        rows = self._live_rows(ids, "vectors")
        if rows.size == 0:
            return np.empty((*rows.shape, self.manifest.dim), dtype=np.float32)
        return self._gather_vectors(rows)

    def extras(self, ids: IdArray, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Side arrays of live ids, {name: (*ids.shape, *per-row shape)} in their stored dtypes (floating
        ones float16); all of them when `names` is None. KeyError naming the first unknown or removed id."""
        if names is None:
            names = self.extra_names
        if isinstance(names, str):
            names = [names]
        for name in names:
            if name not in self._extras:
                raise IndexStoreError(f"extras(names): {name!r} is not a side array of this index (it keeps "
                                      f"{', '.join(map(repr, self.extra_names)) or 'none'})")
        rows = self._live_rows(ids, "extras")
        extras = self._extras
        return {name: extras[name].gather(rows) for name in names}

    @property
    def extra_names(self) -> tuple[str, ...]:
        """Names of the side arrays kept for every row, in the manifest's order."""
        return tuple(spec["name"] for spec in self.manifest.extras)

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

    # -- helpers for the backends ----------------------------------------------------------------
    def _live_rows(self, ids: IdArray, where: str) -> np.ndarray:
        """Row numbers of live ids (same shape as ids); KeyError naming the first other id."""
        ids = _id_array(ids, where)
        rows = self._table.rows_of(ids.reshape(-1))
        if len(rows) and rows.min() < 0:
            bad = int(ids.reshape(-1)[np.flatnonzero(rows < 0)[0]])
            raise KeyError(f"id {bad}: not in the index (unknown or removed)")
        return rows.reshape(ids.shape)

    def _adopt_extras(self, load: Callable[[], Mapping[str, np.ndarray]], mask: np.ndarray | None,
                      mapped: bool) -> None:
        """After a save: take the side arrays from the new version (`load()`) when the ones in memory are laid
        out otherwise (tombstoned rows, several parts, or mapped from a version that is now deleted)."""
        if self._extras and (mask is not None or mapped or any(len(r.parts) > 1 for r in self._extras.values())):
            arrays = load()
            self._extras = {name: Rows(r.shape, r.dtype, arrays[name]) for name, r in self._extras.items()}

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


def _extra_rows(specs: Sequence[ExtraSpec], arrays: Mapping[str, np.ndarray] | None) -> dict[str, Rows]:
    arrays = arrays or {}
    return {spec.name: Rows(spec.shape, spec.dtype, arrays.get(spec.name)) for spec in specs}


def _id_array(ids: Any, where: str) -> np.ndarray:
    """ids (a sequence, an array of any shape, an iterator) as an int64 array; other dtypes are refused."""
    if not isinstance(ids, (np.ndarray, Sequence)) and not hasattr(ids, "__array__"):
        ids = list(ids)  # an iterator, a set
    arr = np.asarray(ids)
    if arr.size == 0:
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise IndexStoreError(f"{where}(ids): expected integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)
