"""The search facade: a checkpoint (method + tokenizer + transforms) over an index of images.

`xmr.load(index_dir)` gives a Retriever; the CLI's `xmr search` and the HTTP service both use it.
Queries go through the method's `encode_query` and the same two-stage function as evaluation
(`xmr.evaluation.shortlist.two_stage`): stage 1 is the index's top K', stage 2 the method's `rerank`
when it is a `Reranker` (over the candidates' stored vectors and side arrays). An index remembers the
model that embedded its images (`manifest.model_id`, the weights' digest); a Retriever refuses to pair it
with another checkpoint, since the vectors would not be comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xmr.errors import UnsupportedQuery, XmrError
from xmr.evaluation.shortlist import Fetch, Ranked, two_stage
from xmr.evaluation.shortlist import rerank_depth as resolve_depth
from xmr.index.base import Index
from xmr.methods.base import Refinable, Reranker, supports_query
from xmr.methods.inference import prepare_encoder
from xmr.methods.loading import LoadedModel
from xmr.outputs import Embedded, QueryBatch

COMPOSE_MODES = ("native", "sum")
__all__ = ["Hit", "ModelMismatch", "Retriever", "UnsupportedQuery", "load"]


class ModelMismatch(XmrError):
    """The index was built with another model than the checkpoint given."""


@dataclass
class Hit:
    """One result: `score` is the final score; `first_stage_score` the index's cosine (equal for one stage);
    `parts` the parts of a second-stage score when the method reports them (MMRef: initial_score,
    reference_score), absent for items that were not re-scored."""

    id: int
    path: str
    score: float
    first_stage_score: float | None = None
    parts: dict[str, float] = field(default_factory=dict)


def index_fetch(index: Index) -> Fetch:
    """The second stage's `fetch` over an index: the candidates' stored vectors and side arrays,
    (Q, K', ...) with zeros in padding slots (ids -1)."""

    def fetch(ids: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        flat = ids.reshape(-1)
        valid = flat >= 0
        dim = index.manifest.dim
        vectors = np.zeros((len(flat), dim), dtype=np.float32)
        extras: dict[str, np.ndarray] = {}
        if valid.any():
            vectors[valid] = index.vectors(flat[valid])
            for name, values in index.extras(flat[valid], names).items():
                full = np.zeros((len(flat), *values.shape[1:]), dtype=values.dtype)
                full[valid] = values
                extras[name] = full.reshape(*ids.shape, *values.shape[1:])
        return vectors.reshape(*ids.shape, dim), extras

    return fetch


class Retriever:
    """Encode queries with a loaded checkpoint and search an index; thread-safe for concurrent callers.

    Composed queries (image + modifying text) use the method's own composed encoder when its
    `query_kinds` include "composed". Otherwise they are refused, unless `compose="sum"` is chosen: the
    zero-shot late-fusion baseline normalise(normalise(f_image) + normalise(f_text)), which any dual
    encoder can do, but which is a baseline, not a composed-retrieval model.
    `rerank_depth`: K' of the second stage for reranking methods (None: the method's own; 0: stage 1 only).
    """

    def __init__(self, model: LoadedModel, index: Any, *, images_root: str | Path | None = None,
                 precision: str = "bf16", device: str = "cpu", compose: str | None = None,
                 check_model: bool = True, compile: bool = False, rerank_depth: int | None = None) -> None:
        from xmr.search.embed import model_fingerprint

        if compose is not None and compose not in COMPOSE_MODES:
            raise XmrError(f"compose={compose!r}: use one of {COMPOSE_MODES} or None")
        self.model, self.index = model, index
        self.model_id = model_fingerprint(model.path)
        if check_model and index.manifest.model_id != self.model_id:
            raise ModelMismatch(f"the index was built with model {index.manifest.model_id} but checkpoint "
                                f"{model.path} is model {self.model_id}; embed the images again with this "
                                "checkpoint or pass the checkpoint that built the index")
        root = images_root or index.manifest.extra.get("images_root")
        if root is None:
            raise XmrError("the index manifest records no images_root; pass images_root=")
        self.images_root = Path(root).resolve()
        self.precision, self.device = precision, torch.device(device)
        self.query_transform = model.method.query_transform()
        self.compose = compose
        self.reranker = model.method if isinstance(model.method, Reranker) else None
        self.rerank_depth = resolve_depth(model.method, rerank_depth)
        # Queries go through the inference fast path (bf16 on CPU: a bf16 copy of the weights, no per-call
        # casts); `compile` adds torch.compile + freezing (slow first query per batch shape).
        self.encoder = prepare_encoder(model.method, precision, compile=compile, device=self.device)

    # -- properties ------------------------------------------------------------------------------
    @property
    def native_composed(self) -> bool:
        return supports_query(self.model.method, "composed")

    @property
    def supports_composed(self) -> bool:
        return self.native_composed or self.compose == "sum"

    def __len__(self) -> int:
        return len(self.index)

    def info(self) -> dict[str, Any]:
        m = self.index.manifest
        return {"model_id": self.model_id, "checkpoint": self.model.path, "count": len(self.index),
                "backend": m.backend, "kind": m.kind, "dim": m.dim, "metric": m.metric,
                "supports_composed": self.supports_composed, "method": self.model.method.name,
                "compose": "native" if self.native_composed else self.compose, "rerank_depth": self.rerank_depth}

    def set_refinement(self, *, k: int | None = None, lam: float | None = None) -> None:
        """Change the second stage's K' (`k`) and, for methods with a tunable fusion weight (MMRef), `lam`."""
        if lam is not None:
            if not isinstance(self.model.method, Refinable):
                raise XmrError(f"method {self.model.method.name} has no refinement weight (lambda) to set")
            self.model.method.set_refinement(lam=lam)
        if k is not None:
            if k < 0:
                raise XmrError(f"refine k must be >= 0, got {k}")
            self.rerank_depth = int(k) if self.reranker is not None else 0

    # -- encoding --------------------------------------------------------------------------------
    def _images(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.query_transform(im.convert("RGB")) for im in images])

    @torch.inference_mode()
    def encode(self, query: QueryBatch) -> Embedded:
        """Queries -> Embedded with L2-normalised float32 vectors (the encoder serialises callers itself)."""
        return self.encoder.encode_query(query.to(self.device)).normalized()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self.encode(self.model.text_query(texts)).vectors.cpu().numpy()

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        return self.encode(QueryBatch(images=self._images(images))).vectors.cpu().numpy()

    def _composed(self, image: Image.Image, text: str) -> Embedded:
        if self.native_composed:
            return self.encode(QueryBatch(ids=self.model.tokenize([text]), images=self._images([image])))
        if self.compose == "sum":
            fused = self.encode_images([image]) + self.encode_texts([text])
            fused /= np.linalg.norm(fused, axis=-1, keepdims=True).clip(1e-12)
            return Embedded(torch.from_numpy(fused))
        raise UnsupportedQuery(
            f"this model ({self.model.method.name}, a text-to-image model) cannot compose an image with a "
            "modifying text; search by text or by image, use a composed-retrieval model, or enable the "
            "late-fusion baseline (--compose sum)")

    def encode_composed(self, image: Image.Image, text: str) -> np.ndarray:
        return self._composed(image, text).vectors.cpu().numpy()

    # -- search ----------------------------------------------------------------------------------
    def _stage1(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(vectors, min(k, max(len(self.index), 1)))

    def rank(self, query: Embedded, k: int = 10, *, rerank_depth: int | None = None,
             refine: bool | None = None) -> Ranked:
        """The two stages for normalised queries: index top K', then the method's rerank (if any).

        `refine`: False = stage 1 only; True or None = the second stage at `rerank_depth` (None: the
        retriever's K', itself the method's default unless set).
        """
        if k < 1:
            raise XmrError(f"k must be >= 1, got {k}")
        depth = self.rerank_depth if rerank_depth is None else int(rerank_depth)
        if refine is False:
            depth = 0
        if depth < 0:
            raise XmrError(f"rerank_depth must be >= 0, got {depth}")
        return two_stage(query, k, self._stage1, reranker=self.reranker, depth=depth if self.reranker else 0,
                         fetch=index_fetch(self.index))

    def _hits(self, ranked: Ranked) -> list[list[Hit]]:
        out = []
        for q, (scores, ids, first) in enumerate(zip(ranked.scores, ranked.ids, ranked.first_stage)):
            hits = []
            for j, (s, i, f) in enumerate(zip(scores, ids, first)):
                if i < 0:
                    continue
                parts = {name: float(v[q, j]) for name, v in ranked.parts.items() if np.isfinite(v[q, j])}
                hits.append(Hit(int(i), self.index.path(int(i)), float(s), float(f), parts))
            out.append(hits)
        return out

    def search_vectors(self, queries: np.ndarray | Embedded, k: int = 10, *,
                       rerank_depth: int | None = None, refine: bool | None = None) -> list[list[Hit]]:
        """Search with ready query vectors (rows L2-normalised) or an Embedded (with its extras).

        `rerank_depth`: K' of the second stage (None: the retriever's); `refine=False`: stage 1 only."""
        query = queries if isinstance(queries, Embedded) else Embedded(torch.from_numpy(
            np.ascontiguousarray(queries, dtype=np.float32)))
        return self._hits(self.rank(query, k, rerank_depth=rerank_depth, refine=refine))

    def search_text(self, text: str, k: int = 10, **options: Any) -> list[Hit]:
        if not text or not text.strip():
            raise XmrError("empty query text")
        return self.search_vectors(self.encode(self.model.text_query([text])), k, **options)[0]

    def search_image(self, image: Image.Image, k: int = 10, **options: Any) -> list[Hit]:
        return self.search_vectors(self.encode(QueryBatch(images=self._images([image]))), k, **options)[0]

    def search_composed(self, image: Image.Image, text: str, k: int = 10, **options: Any) -> list[Hit]:
        if not text or not text.strip():
            raise XmrError("empty modification text")
        return self.search_vectors(self._composed(image, text), k, **options)[0]

    def search_similar(self, id: int, k: int = 10, **options: Any) -> list[Hit]:
        """Images like indexed image `id` (itself left out), from its stored vector: nothing is re-encoded."""
        try:
            vector = self.index.vectors(np.asarray([int(id)], dtype=np.int64))
        except KeyError:
            raise KeyError(f"id {id} is not in the index") from None
        hits = self.search_vectors(vector, k + 1, **options)[0]
        return [h for h in hits if h.id != int(id)][:k]

    def image_path(self, id: int) -> Path:
        """Absolute path of an indexed image; KeyError when the id is not (or no longer) indexed."""
        relative = self.index.path(int(id))
        path = Path(relative)
        return path if path.is_absolute() else self.images_root / path


def load(index: str | Path, checkpoint: str | Path | None = None, *, device: str = "cpu",
         precision: str = "bf16", compose: str | None = None, mmap: bool = False, compile: bool = False,
         rerank_depth: int | None = None) -> Retriever:
    """Open an index and the checkpoint that built it (default: the one its manifest records).

    `precision` ("fp32" | "bf16" | "fp16") and `compile` choose the query encoders' recipe
    (`xmr.methods.inference`); `rerank_depth` the second stage's K' for reranking methods.
    """
    from xmr.index import open_index
    from xmr.methods.loading import load_checkpoint

    opened = open_index(index, mmap=mmap)
    checkpoint = checkpoint or opened.manifest.extra.get("checkpoint")
    if checkpoint is None:
        raise XmrError(f"{index}: the manifest records no checkpoint; pass checkpoint=")
    return Retriever(load_checkpoint(checkpoint, device=device), opened, precision=precision, device=device,
                     compose=compose, compile=compile, rerank_depth=rerank_depth)
