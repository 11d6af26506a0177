"""Milvus backend: the vectors live in a Milvus collection, ids/paths/manifest in the index directory.

The default `uri` is a Milvus Lite file inside the index directory (INDEX/milvus.db, stored in the
manifest relative to the directory so the folder can be moved); a server URI (`http://host:19530`,
with `token`) scales out. Metric: inner product. Kinds: FLAT (exact), HNSW, IVF_FLAT.

Milvus applies inserts at once, but the index directory is the source of truth, which keeps the
directory's crash safety:
* add() upserts right away (searches see it); ids in Milvus that the saved table does not list
  (a writer that died before saving) are filtered out of results, overwritten when their ids are
  handed out again, and deleted by the next save (everything >= next_id).
* remove() only tombstones; save() writes the new version first and deletes from Milvus after.
  Ids whose deletion may not have happened are recorded (deleted.npy) and deleted again next save.
Searches over-fetch to make up for tombstones and strays.

`vectors(ids)` queries Milvus by id (live ids only: the table is checked first). Side arrays
(`add(..., extras=...)`) stay out of Milvus: like the id -> path map they are local files of each
version folder (extra.NAME.npy, aligned with ids.npy), memory-mapped when opened with mmap=True.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from xmr.index import storage
from xmr.index.base import BaseIndex, IndexStoreError, Manifest, RowTable, check_params, empty_results

__all__ = ["KINDS", "MilvusIndex"]

KINDS: dict[str, dict[str, Any]] = {
    "FLAT": {},
    "HNSW": {"M": 32, "efConstruction": 200, "ef": 128},
    "IVF_FLAT": {"nlist": 1024, "nprobe": 16},
}
COMMON = {"uri": "milvus.db", "token": "", "collection": "xmr"}
MAX_TOPK = 16_384  # Milvus's largest search limit
BATCH_ROWS = 1_000  # rows per upsert or get request (well below the 64 MiB gRPC message limit at 512-d)
DELETED_FILE = "deleted.npy"

_clients: dict[tuple[str, str], Any] = {}  # one client per server/file: Milvus Lite starts a process each
_clients_lock = threading.Lock()


def _pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as e:
        raise IndexStoreError("the milvus index backend needs pymilvus: pip install pymilvus milvus-lite") from e
    return pymilvus


def _is_local(uri: str) -> bool:
    return "://" not in uri


def _client(uri: str, token: str) -> Any:
    with _clients_lock:
        key = (uri, token)
        if key not in _clients:
            pymilvus = _pymilvus()
            if _is_local(uri):
                try:
                    import milvus_lite  # noqa: F401  (pymilvus needs it for local files)
                except ImportError as e:
                    raise IndexStoreError(f"uri {uri} is a Milvus Lite file, which needs milvus-lite: pip install "
                                          "milvus-lite (or give params['uri'] of a Milvus server)") from e
                Path(uri).parent.mkdir(parents=True, exist_ok=True)
            try:
                with _quiet_unimplemented():
                    _clients[key] = pymilvus.MilvusClient(uri=uri, token=token)
            except Exception as e:  # pymilvus raises several types for an unreachable server
                raise IndexStoreError(f"cannot connect to Milvus at {uri}: {e}") from e
        return _clients[key]


class _DropUnimplemented(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Method not implemented" not in record.getMessage()


@contextmanager
def _quiet_unimplemented() -> Iterator[None]:
    """Milvus Lite's in-process gRPC server logs a harmless traceback when pymilvus probes an RPC it
    lacks (AllocTimestamp) while connecting; hide just that record."""
    logger, drop = logging.getLogger("grpc._server"), _DropUnimplemented()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class MilvusIndex(BaseIndex):
    """See the module docstring. Create with `xmr.index.create_index`, open with `open_index`."""

    def __init__(self, manifest: Manifest, table: RowTable, directory: Path | None, *, mmap: bool = False,
                 extras: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__(manifest, table, directory, extras)
        self._mmap = mmap  # side arrays mapped from the version folder
        self._pending_delete: set[int] = set()  # removed before, their Milvus delete not yet confirmed
        self._conn: Any = None

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def create(cls, manifest: Manifest, params: dict[str, Any] | None) -> MilvusIndex:
        manifest.kind = _kind(manifest.kind, "create_index()")
        manifest.params = _resolve_params(manifest.kind, params, "create_index()")
        index = cls(manifest, RowTable(), None)
        if not _is_local(manifest.params["uri"]) or Path(manifest.params["uri"]).is_absolute():
            index._connect(create=True)  # surface a clash or a bad URI now, not at the first add
        return index

    @classmethod
    def load(cls, folder: Path, manifest: Manifest, directory: Path, *, mmap: bool = False) -> MilvusIndex:
        source = str(folder / storage.MANIFEST)
        manifest.kind = _kind(manifest.kind, source)
        manifest.params = _resolve_params(manifest.kind, manifest.params, source)
        table = storage.load_table(folder, manifest)
        extras = storage.load_extras(folder, manifest, table.rows, mmap=mmap)
        index = cls(manifest, table, directory, mmap=mmap, extras=extras)
        deleted = folder / DELETED_FILE
        if deleted.is_file():
            index._pending_delete = set(storage.load_npy(deleted, dtype=np.int64, ndim=1).tolist())
        index._connect(create=False)
        return index

    # -- connection ------------------------------------------------------------------------------
    def _uri(self, directory: Path | None = None) -> str:
        uri = self.manifest.params["uri"]
        if not _is_local(uri) or Path(uri).is_absolute():
            return uri
        base = self._directory or directory  # where the file already is, else where it will go
        if base is None:
            raise IndexStoreError(f"milvus index with the relative uri {uri!r}: save(directory) it first (the Milvus "
                                  "Lite file goes inside the index directory) or pass an absolute params['uri']")
        return str((Path(base) / uri).resolve())

    def _connect(self, create: bool, directory: Path | None = None) -> Any:
        if self._conn is not None:
            return self._conn
        p, uri = self.manifest.params, self._uri(directory)
        client, name = _client(uri, p["token"]), p["collection"]
        try:
            with _quiet_unimplemented():
                self._open_collection(client, name, uri, create)
        except IndexStoreError:
            raise
        except Exception as e:
            raise IndexStoreError(f"Milvus at {uri}, collection {name!r}: {e}") from e
        self._conn = client
        return client

    def _open_collection(self, client: Any, name: str, uri: str, create: bool) -> None:
        exists = client.has_collection(name)
        if create and exists:
            raise IndexStoreError(f"Milvus collection {name!r} already exists at {uri}; choose another "
                                  "params['collection'] or drop it, or open its index directory instead")
        if not create and not exists:
            raise IndexStoreError(f"Milvus collection {name!r} not found at {uri}, but the index directory "
                                  f"{self._directory} refers to it; it was dropped or the uri is wrong")
        if create:
            self._create_collection(client, name)
        else:
            self._check_collection(client, name, uri)
            client.load_collection(name)

    def _create_collection(self, client: Any, name: str) -> None:
        DataType = _pymilvus().DataType
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.manifest.dim)
        index_params = client.prepare_index_params()
        build = {k: v for k, v in self.manifest.params.items() if k in ("M", "efConstruction", "nlist")}
        index_params.add_index(field_name="vector", index_type=self.manifest.kind, metric_type="IP", params=build)
        client.create_collection(name, schema=schema, index_params=index_params, consistency_level="Strong")

    def _check_collection(self, client: Any, name: str, uri: str) -> None:
        fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
        dim = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
        if "id" not in fields or dim != self.manifest.dim:
            raise IndexStoreError(f"Milvus collection {name!r} at {uri} does not hold {self.manifest.dim}-d vectors "
                                  "under fields id/vector; it belongs to something else")

    # -- mutation hooks ----------------------------------------------------------------------------
    def add(self, vectors: np.ndarray, paths: Sequence[str],
            extras: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        self._connect(create=False)  # fail before ids are handed out when there is nowhere to put vectors
        return super().add(vectors, paths, extras)

    def _add_rows(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        client, name = self._connect(create=False), self.manifest.params["collection"]
        for s in range(0, len(ids), BATCH_ROWS):
            rows = [{"id": int(i), "vector": v} for i, v in zip(ids[s : s + BATCH_ROWS].tolist(),
                                                                 vectors[s : s + BATCH_ROWS].tolist())]
            client.upsert(name, rows)  # upsert: overwrites a stray left by a writer that never saved

    def _remove_rows(self, rows: np.ndarray, ids: np.ndarray) -> None:
        pass  # tombstoned in the table; deleted from Milvus once save() has recorded it

    # -- search ------------------------------------------------------------------------------------
    def _search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        client, p = self._connect(create=False), self.manifest.params
        table = self._table
        scores, ids = empty_results(len(queries), k)
        todo = np.arange(len(queries))
        limit = min(MAX_TOPK, k + len(table.dead) + len(self._pending_delete) + 16)
        while len(todo):
            hits = client.search(p["collection"], data=queries[todo].tolist(), limit=limit,
                                 search_params={"metric_type": "IP", "params": self._search_params(limit)},
                                 output_fields=["id"])
            again = []
            for q, row in zip(todo.tolist(), hits):
                got = np.array([h["id"] for h in row], dtype=np.int64)
                dist = np.array([h["distance"] for h in row], dtype=np.float32)
                live = table.rows_of(got) >= 0  # drops tombstones and strays
                got, dist = got[live][:k], dist[live][:k]
                if len(got) < min(k, len(table)) and len(row) == limit < MAX_TOPK:
                    again.append(q)  # filtering left too few: ask for more
                    continue
                ids[q, : len(got)], scores[q, : len(got)] = got, dist
            todo, limit = np.array(again, dtype=np.int64), min(MAX_TOPK, limit * 4)
        return scores, ids

    def _gather_vectors(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of live rows, fetched from Milvus by id (each distinct id once)."""
        client, name = self._connect(create=False), self.manifest.params["collection"]
        ids = self._table.row_ids[rows.reshape(-1)]
        unique, inverse = np.unique(ids, return_inverse=True)
        found = np.zeros((len(unique), self.manifest.dim), dtype=np.float32)
        seen = np.zeros(len(unique), dtype=bool)
        for s in range(0, len(unique), BATCH_ROWS):
            for hit in client.get(name, ids=unique[s : s + BATCH_ROWS].tolist(), output_fields=["vector"]):
                at = int(np.searchsorted(unique, int(hit["id"])))
                found[at], seen[at] = np.asarray(hit["vector"], dtype=np.float32), True
        if not seen.all():
            missing = int(unique[np.flatnonzero(~seen)[0]])
            raise IndexStoreError(f"Milvus collection {name!r} at {self._uri()} has no vector for id {missing}, which "
                                  f"the index directory {self._directory} lists; the collection was changed by "
                                  "something else: rebuild the index with `xmr index build`")
        return found[inverse].reshape(*rows.shape, self.manifest.dim)

    def _search_params(self, limit: int) -> dict[str, Any]:
        p, kind = self.manifest.params, self.manifest.kind
        if kind == "HNSW":
            return {"ef": max(p["ef"], limit)}
        if kind == "IVF_FLAT":
            return {"nprobe": p["nprobe"]}
        return {}

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: str | Path | None = None) -> Path:
        """Record ids/paths/manifest atomically (the vectors are in Milvus), then apply deletions."""
        with self._lock:
            target = self._target(directory).resolve()
            client = self._connect(create=self._conn is None and self._directory is None, directory=target)
            name = self.manifest.params["collection"]
            mask = self._table.live_mask()
            table = self._table.compacted()
            dead = set(self._table.row_ids[~mask].tolist()) if mask is not None else set()
            pending = np.array(sorted(self._pending_delete | dead), dtype=np.int64)
            client.flush(name)  # the vectors must be durable before the directory says they exist
            writers = {**storage.table_writers(table), **storage.extra_writers(self._extras, mask),
                       DELETED_FILE: lambda path: storage.write_npy(path, pending)}
            manifest = self._next_manifest(len(table), uri=self._stored_uri(target))
            folder = storage.save_version(target, manifest.to_dict(), writers)
            self._adopt_extras(lambda: storage.load_extras(folder, manifest, len(table), mmap=self._mmap), mask,
                               self._mmap)
            self._table, self.manifest, self._directory = table, manifest, target
            self._pending_delete = set(pending.tolist())
            self._apply_deletes(client, name, pending, table.next_id)
            return folder

    def _apply_deletes(self, client: Any, name: str, ids: np.ndarray, next_id: int) -> None:
        try:
            for s in range(0, len(ids), 10_000):
                client.delete(name, ids=ids[s : s + 10_000].tolist())
            client.delete(name, filter=f"id >= {int(next_id)}")  # strays of writers that never saved
            client.flush(name)
        except Exception:  # noqa: BLE001  (recorded in deleted.npy: retried by the next save)
            return
        self._pending_delete = set()

    def _stored_uri(self, target: Path) -> str:
        """A Milvus Lite file inside the index directory is stored relative to it (movable folder)."""
        uri = self._uri(target)
        if _is_local(uri):
            try:
                return str(Path(uri).resolve().relative_to(target))
            except ValueError:
                return str(Path(uri).resolve())
        return uri

    def close(self) -> None:
        """Forget the connection (the shared client stays open for other indexes in this process)."""
        self._conn = None


def _kind(kind: str, source: str) -> str:
    upper = kind.upper()
    if upper not in KINDS:
        raise IndexStoreError(f"{source}: kind {kind!r} is not a milvus kind; use one of {sorted(KINDS)}")
    return upper


def _resolve_params(kind: str, params: dict[str, Any] | None, source: str) -> dict[str, Any]:
    p = check_params(params, {**COMMON, **KINDS[kind]}, f"milvus kind {kind!r} ({source})")
    for name in ("uri", "token", "collection"):
        if not isinstance(p[name], str):
            raise IndexStoreError(f"{source}: params[{name!r}] must be a string, got {p[name]!r}")
    if _is_local(p["uri"]) and not p["uri"].endswith(".db"):
        raise IndexStoreError(f"{source}: params['uri']={p['uri']!r}: a Milvus Lite file name must end in .db "
                              "(or give a server URI such as http://localhost:19530)")
    for name in KINDS[kind]:
        if isinstance(p[name], bool) or not isinstance(p[name], int) or p[name] < 1:
            raise IndexStoreError(f"{source}: params[{name!r}] must be a positive integer, got {p[name]!r}")
    return p
