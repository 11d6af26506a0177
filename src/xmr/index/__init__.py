"""Vector indexes for search: exact and approximate FAISS indexes in-process, Milvus for scale-out.

    from xmr.index import create_index, open_index
    index = create_index(512, model_id, kind="hnsw")
    ids = index.add(vectors, paths)          # float32 (n, 512), L2-normalised by the caller
    ids = index.add(vectors, paths, extras={"regions": regions})   # + named side arrays (n, ...)
    index.save("gallery.index")               # atomic: a crash leaves the previous version
    index = open_index("gallery.index", mmap=True)
    scores, ids = index.search(queries, k=10)
    index.vectors(ids[0]), index.extras(ids[0])["regions"]   # stored rows of those ids

FAISS and pymilvus are imported only by the backend that needs them.
"""

from xmr.index.base import (
    BACKENDS,
    FORMAT_VERSION,
    ExtraSpec,
    Index,
    IndexStoreError,
    Manifest,
)
from xmr.index.factory import create_index, open_index, read_manifest

__all__ = ["BACKENDS", "FORMAT_VERSION", "ExtraSpec", "Index", "IndexStoreError", "Manifest", "create_index",
           "open_index", "read_manifest"]
