"""Build and update a search index from embedding directories (`xmr index build/add/remove`).

One index covers one images root and one model: embedding directories (whole runs, `--shard i/n`
parts, `--processes N` or torchrun's `shard-*` folders) are merged only when both agree, since mixing
models would make scores meaningless and mixing roots would make the stored relative paths ambiguous.
Their side arrays (per-image features for a second scoring stage) must agree too, and travel with
their vectors into the index (`Index.add(vectors, paths, extras)`); an image embedded twice is
indexed once, with the side arrays of its first copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xmr.errors import XmrError
from xmr.search.embed import EmbeddingStore, find_stores


@dataclass
class IndexUpdate:
    index: Path
    added: int
    skipped: int
    removed: int
    count: int


def _check_compatible(stores: Sequence[EmbeddingStore], model_id: str | None = None,
                      images_root: str | None = None) -> tuple[str, str, int]:
    if not stores:
        raise XmrError("no embedding directories given")
    first = stores[0]
    model_id = model_id or first.model_id
    images_root = images_root or first.manifest["images_root"]
    _check_same_extras(stores)
    for store in stores:
        if store.model_id != model_id:
            raise XmrError(f"{store.directory} was embedded by model {store.model_id}, but the index uses "
                           f"model {model_id}; embed it again with the same checkpoint")
        if store.manifest["images_root"] != images_root:
            raise XmrError(f"{store.directory} holds images under {store.manifest['images_root']}, but the index "
                           f"covers {images_root}; one index serves one images root, build a separate one")
    return model_id, images_root, int(first.manifest["dim"])


def _check_same_extras(stores: Sequence[EmbeddingStore]) -> None:
    """Stores holding chunks must hold the same side arrays (a store with none written yet has no say)."""
    fixed = [(store, store.extra_specs) for store in stores if store.extra_specs is not None and store.chunk_names()]
    for store, specs in fixed[1:]:
        if specs != fixed[0][1]:
            first, first_specs = fixed[0]
            raise XmrError(f"{store.directory} holds side arrays {_describe(specs)}, but {first.directory} holds "
                           f"{_describe(first_specs)}; embed both with the same checkpoint and xmr version")


def _describe(specs: Sequence[Any]) -> str:
    return ", ".join(spec.describe() for spec in specs) or "none"


def _add_stores(index: Any, stores: Sequence[EmbeddingStore], known: set[str]) -> tuple[int, int]:
    added = skipped = 0
    for store in stores:
        for chunk in store.chunks():
            paths = chunk.paths
            keep = [i for i, p in enumerate(paths) if p not in known]
            skipped += len(paths) - len(keep)
            if keep:
                rows = np.asarray(keep)
                index.add(chunk.vectors[rows], [paths[i] for i in keep],
                          {name: values[rows] for name, values in chunk.extras.items()})
                known.update(paths[i] for i in keep)
                added += len(keep)
    return added, skipped


def build_index(embeddings: Sequence[str | Path], out: str | Path, *, backend: str = "faiss", kind: str = "flat",
                params: dict[str, Any] | None = None) -> IndexUpdate:
    """A new index at `out` from embedding directories (an image embedded twice is indexed once)."""
    from xmr.index import create_index

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise XmrError(f"{out} already exists; use `xmr index add` to update it or choose another --out")
    stores = find_stores(embeddings)
    model_id, images_root, dim = _check_compatible(stores)
    checkpoint = stores[0].manifest.get("checkpoint")
    params = dict(params or {})
    if backend == "milvus" and "uri" not in params:
        out.mkdir(parents=True, exist_ok=True)
        params["uri"] = str(out.resolve() / "milvus.db")  # Milvus Lite file beside the manifest
    index = create_index(dim, model_id, backend=backend, kind=kind, params=params,
                         extra={"images_root": images_root, "checkpoint": checkpoint})
    added, skipped = _add_stores(index, stores, set())
    index.save(out)
    return IndexUpdate(out, added, skipped, 0, len(index))


def add_to_index(index_dir: str | Path, embeddings: Sequence[str | Path]) -> IndexUpdate:
    """Add the images of embedding directories that the index does not hold yet (no rebuild)."""
    from xmr.index import open_index

    index = open_index(index_dir)
    stores = find_stores(embeddings)
    _check_compatible(stores, index.manifest.model_id, index.manifest.extra.get("images_root"))
    known = {path for _, path in index.items()}
    added, skipped = _add_stores(index, stores, known)
    if added:
        index.save(index_dir)
    return IndexUpdate(Path(index_dir), added, skipped, 0, len(index))


def remove_from_index(index_dir: str | Path, targets: Sequence[str]) -> IndexUpdate:
    """Remove items given by id or by their relative path; unknown targets raise before anything changes."""
    from xmr.index import open_index

    index = open_index(index_dir)
    by_path = {path: id_ for id_, path in index.items()}
    live = set(by_path.values())
    ids, unknown = [], []
    for target in targets:
        if target in by_path:
            ids.append(by_path[target])
        elif target.lstrip("-").isdigit() and int(target) in live:
            ids.append(int(target))
        else:
            unknown.append(target)
    if unknown:
        raise XmrError(f"{index_dir}: not in the index: {', '.join(unknown[:5])}"
                       + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    removed = index.remove(ids)
    if removed:
        index.save(index_dir)
    return IndexUpdate(Path(index_dir), 0, 0, removed, len(index))
