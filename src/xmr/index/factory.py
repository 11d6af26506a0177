"""Create and open indexes: the one place that dispatches to a backend.

Backends are found by name in the registry `xmr.registry.INDEX_BACKENDS` ("faiss" ->
xmr.index.faiss_index:FaissIndex, "milvus" -> xmr.index.milvus_index:MilvusIndex), imported on
first use. A backend class provides `create(manifest, params)` and `load(folder, manifest,
directory, mmap=...)`. Imports go one way: factory -> storage, base (and the backends, lazily);
storage -> base; backends -> base, rows, storage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from xmr.errors import ConfigError
from xmr.index import storage
from xmr.index.base import Index, IndexStoreError, Manifest
from xmr.registry import INDEX_BACKENDS

__all__ = ["backend_class", "create_index", "open_index", "read_manifest"]


def backend_class(name: str) -> Any:
    """The backend class registered under `name`; IndexStoreError for an unknown name."""
    try:
        return INDEX_BACKENDS.get(name)
    except ConfigError as e:
        raise IndexStoreError(f"backend={name!r}: {e}") from None


def create_index(dim: int, model_id: str, *, backend: str = "faiss", kind: str = "flat",
                 params: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> Index:
    """A new, empty, unsaved index; `save(directory)` writes it. Its side arrays are named by the first add."""
    manifest = Manifest(model_id=model_id, dim=dim, backend=backend, kind=kind, extra=dict(extra or {}))
    manifest.validate("create_index()")
    return backend_class(backend).create(manifest, params)


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of the index's live version (validated)."""
    path = storage.current_version(Path(directory)) / storage.MANIFEST
    return Manifest.from_dict(storage.read_json(path), str(path))


def open_index(directory: str | Path, *, mmap: bool = False) -> Index:
    """Open a saved index; with mmap=True the stored vectors and side arrays are memory-mapped, not read."""
    directory = Path(directory)
    for attempt in range(3):
        folder = storage.current_version(directory)
        path = folder / storage.MANIFEST
        try:
            manifest = Manifest.from_dict(storage.read_json(path), str(path))
            index = backend_class(manifest.backend).load(folder, manifest, directory, mmap=mmap)
        except FileNotFoundError as e:
            if attempt < 2 and storage.current_version(directory) != folder:
                time.sleep(0.05)  # a concurrent save replaced this version while we read it: retry
                continue
            raise IndexStoreError(f"{e.filename}: missing from the index's live version; the index is corrupt, "
                                  "rebuild it with `xmr index build`") from e
        storage.clean_stale(directory)
        return index
    raise AssertionError("unreachable")
