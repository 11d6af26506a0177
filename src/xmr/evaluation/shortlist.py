"""Two-stage scoring, one function for evaluation and search.

Stage 1 takes each query's top K' gallery items by cosine similarity of the normalised vectors: from an
index (search) or from the gallery matrix in bounded memory (evaluation, `topk_bounded`). Stage 2, when
the method is a `Reranker`, re-scores those K' candidates with the method's own score (it may read the
candidates' stored vectors and named side arrays) and the shortlist is re-sorted by it; items beyond
K' keep their first-stage order after the re-scored ones. Without a reranker (or with depth 0) the
result is stage 1's, bit for bit. Because search and evaluation both call `two_stage`, a served score
equals an evaluated one.

Ties in stage 2 are broken by the first-stage order (a stable sort), so a rerank that returns the
first-stage scores reproduces stage 1 exactly, and a rerank at full depth equals sorting every pair by
the method's score with the tie rule of `evaluation/metrics.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from xmr.evaluation.metrics import topk_bounded
from xmr.methods.base import ExplainedReranker, Method, Reranker
from xmr.outputs import Candidates, Embedded

# stage 1: (normalised query vectors (Q, D) float32, k) -> (scores (Q, k), ids (Q, k)), ids -1 past the end
Stage1 = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]
# candidates' stored data: (ids (Q, K') with -1 padding, extra names) -> (vectors (Q, K', D), extras)
Fetch = Callable[[np.ndarray, tuple[str, ...]], tuple[np.ndarray, dict[str, np.ndarray]]]


@dataclass
class Ranked:
    """Final top-k of each query: scores (Q, k) float32 and ids (Q, k) int64 (-1 = no item), best first.

    first_stage: the stage-1 scores of the same items (equal to `scores` for single-stage methods).
    depth: K', the number of stage-1 candidates re-scored (0 when there was no second stage).
    parts: name -> (Q, k) parts of the final score reported by an `ExplainedReranker` (NaN for items
    beyond K', which were not re-scored).
    """

    scores: np.ndarray
    ids: np.ndarray
    first_stage: np.ndarray
    depth: int
    parts: dict[str, np.ndarray] = field(default_factory=dict)


def rerank_depth(method: Method, depth: int | None) -> int:
    """K' in use: `depth` when given, else the method's own `rerank_depth`; 0 for single-stage methods."""
    if not isinstance(method, Reranker):
        return 0
    return int(method.rerank_depth if depth is None else depth)


def two_stage(query: Embedded, k: int, stage1: Stage1, *, reranker: Reranker | None = None,
              depth: int = 0, fetch: Fetch | None = None) -> Ranked:
    """Top `k` items of each (normalised) query: stage-1 top max(k, depth), re-scored by `reranker` if any."""
    vectors = np.ascontiguousarray(query.vectors.float().cpu().numpy(), dtype=np.float32)
    if reranker is None or depth <= 0:
        scores, ids = stage1(vectors, k)
        return Ranked(scores, ids, scores, 0)
    if fetch is None:
        raise ValueError("a second stage needs `fetch` (the candidates' stored vectors and side arrays)")
    width = max(k, depth)
    scores, ids = stage1(vectors, width)
    depth = min(depth, ids.shape[1])  # K' >= gallery size: every item is re-scored
    cand_vectors, extras = fetch(ids, tuple(reranker.gallery_extras()))
    candidates = Candidates(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(scores.astype(np.float32)),
                            torch.from_numpy(cand_vectors), {n: torch.from_numpy(np.asarray(v)) for n, v in extras.items()})
    parts: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        if isinstance(reranker, ExplainedReranker):
            new, parts = reranker.rerank_explained(query, candidates)
        else:
            new = reranker.rerank(query, candidates)
        new = new.float()
    if new.shape != candidates.ids.shape:
        raise ValueError(f"rerank returned shape {tuple(new.shape)} for {tuple(candidates.ids.shape)} candidates")
    # Only the first `depth` candidates are re-scored; the rest (when k > depth) follow in stage-1 order.
    rescored = torch.full_like(new, float("-inf"))
    rescored[:, :depth] = new[:, :depth]
    rescored = torch.where(candidates.valid, rescored, torch.tensor(float("-inf")))
    order = _stable_order(rescored, depth)
    top = order[:, :k]
    final = torch.gather(rescored, 1, top)
    tail = top >= depth
    final = torch.where(tail, torch.gather(candidates.scores, 1, top), final)  # unre-scored: keep stage 1
    out_ids = torch.gather(candidates.ids, 1, top)
    final = torch.where(out_ids >= 0, final, torch.tensor(float("-inf")))
    explained = {name: torch.where(tail | (out_ids < 0), torch.tensor(float("nan")),
                                   torch.gather(part.float(), 1, top)).numpy() for name, part in parts.items()}
    return Ranked(final.numpy(), out_ids.numpy(), torch.gather(candidates.scores, 1, top).numpy(), depth, explained)


def _stable_order(rescored: torch.Tensor, depth: int) -> torch.Tensor:
    """Column order: the first `depth` by descending new score (ties: stage-1 order), then the rest as is."""
    head = torch.sort(rescored[:, :depth], dim=1, descending=True, stable=True).indices
    rest = torch.arange(depth, rescored.shape[1]).expand(len(rescored), -1)
    return torch.cat([head, rest], dim=1)


def matrix_stage1(gallery: torch.Tensor, exclude: list[int] | None = None, query_chunk: int = 1024):
    """Stage 1 over an in-memory gallery matrix: bounded-memory top-k, `exclude[q]` removed from row q."""

    def stage1(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        extra = 1 if exclude is not None else 0
        scores, ids = topk_bounded(torch.from_numpy(vectors), gallery, k + extra, query_chunk)
        scores, ids = scores.numpy(), ids.numpy()
        if exclude is not None:
            drop = ids == np.asarray(exclude)[:, None]
            # Keep the first k of each row that are not the excluded item (stable: order preserved).
            keep = np.argsort(drop, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
        return scores[:, :k], ids[:, :k]

    return stage1


def matrix_fetch(gallery: Embedded, prepared: dict[str, torch.Tensor] | None = None):
    """The candidates' vectors and extras from an in-memory gallery Embedded; `prepared` arrays (a
    `PreparesGallery` reranker's, one row per gallery item) are gathered along with the named extras."""
    prepared = prepared or {}

    def fetch(ids: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        safe = torch.from_numpy(np.where(ids >= 0, ids, 0))
        vectors = gallery.vectors[safe].numpy()
        extras = {n: gallery.extras[n][safe].numpy() for n in names}
        extras.update({n: v[safe].numpy() for n, v in prepared.items()})
        return vectors, extras

    return fetch


def rerank_positions(reranked_ids: np.ndarray, ranks: np.ndarray, positives: np.ndarray,
                     chunk: int = 4096) -> np.ndarray:
    """Ranks of every positive after re-ranking each query's top K' (1-based, ascending, 0-padded).

    reranked_ids: (Q, K') the re-ranked shortlist; ranks: (Q, P) first-stage ranks of the positives
    (ascending, 0-padded); positives: (Q, P) their gallery indices (-1 padded), in any order. A positive
    inside the shortlist takes its re-ranked position; the others keep their stage-1 rank (> K', since
    re-ranking only permutes the top K').
    """
    depth = reranked_ids.shape[1]
    out = np.zeros_like(ranks)
    for start in range(0, len(ranks), chunk):
        rows = slice(start, start + chunk)
        inside = (reranked_ids[rows, :, None] == positives[rows, None, :]).any(axis=2)  # (c, K')
        inside &= reranked_ids[rows] >= 0
        positions = np.where(inside, np.arange(1, depth + 1), 0)
        outside = np.where(ranks[rows] > depth, ranks[rows], 0)
        merged = np.concatenate([positions, outside], axis=1)
        big = np.iinfo(np.int64).max
        merged = np.sort(np.where(merged > 0, merged, big), axis=1)[:, : ranks.shape[1]]
        out[rows] = np.where(merged == big, 0, merged)
    return out
