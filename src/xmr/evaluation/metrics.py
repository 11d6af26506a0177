"""Retrieval metrics in bounded memory: Rank-k (CMC), mAP, mINP, recall@K, and a streaming top-k.

Definitions (one query, gallery ranked by descending similarity, 1-based ranks; ``r_1 < ... < r_m`` are
the ranks of its ``m`` correct gallery items):

* Rank-k / CMC@k, recall@K: 1 if ``r_1 <= k`` else 0.
* AP: ``mean_j j / r_j`` (precision at each correct item's rank, averaged over all correct items).
* INP (inverse negative penalty): ``m / r_m``.

Each is averaged over the queries and reported in %. Queries with no correct item in the gallery
are skipped (the reference code would divide by zero) and counted in
``num_queries_without_positive``; averages are over the other queries.

Tie rule: items with equal similarity are ordered by gallery index, lower index first, i.e. exactly
the order of a *stable* descending sort (``np.argsort(-s, kind="stable")``). This makes every number
deterministic and independent of the chunk sizes. ``-0.0`` and ``+0.0`` tie, as in float comparison.

Algorithm (never a full argsort, never a Q x G matrix): only the rank of each correct item is needed,
and ``rank(p) = 1 + #{items that precede p}``. For a chunk of ``c`` queries with at most ``P``
positives each:

1. The positives' own scores ``s_p`` are computed once (a small matmul against the union of the
   chunk's positives; queries are processed grouped by label so the union stays small). When the
   whole gallery fits in one block they are read from that block instead.
2. Gallery blocks of ``g`` items are streamed: ``S = q @ g^T`` (c x g). The chunk's positives are
   masked out of the block (their order among themselves comes from step 1), and only the items with
   ``S >= min_p s_p`` can precede any positive: one comparison and one ``nonzero`` per block pick them.
3. For those candidates the comparison is exact and tie-aware through a single int64 key per
   (score, index): the float32 bit pattern mapped to an order-preserving int32 in the high half and
   ``2^32 - 1 - index`` in the low half, so ``key_a > key_b`` iff ``a`` precedes ``b`` in the stable
   descending order. Each candidate counts how many positives it precedes (a comparison with the
   row's ``P`` sorted positive keys); a per-row histogram and a cumulative sum turn that into, for
   the ``j``-th best positive, the number of non-positive items ahead of it; ``j - 1`` positives are
   ahead of it too.

Cost: the matmul plus ~two passes over each block and ``O(M * P)`` work for the ``M`` candidates
(``M`` = items scoring above a query's worst positive, small for a useful model). Memory:
``O(c * g)`` for a block, ``O(c * P)`` for the positives, ``O(g * D)`` for gallery rows, plus the
``O(Q * P)`` ranks when :func:`positive_ranks` is asked for them, whatever the gallery size.

Numerics: each (query, item) pair gets exactly one score. A positive's score comes from a different
matmul call than the blocks, so for non-exact inputs it may differ from a full ``Q @ G^T`` in the
last bit (different summation order); with exactly representable products the results are bitwise
those of a full sort. ``compute_dtype=torch.bfloat16`` runs the matmul in bf16 (fast on CPUs with
AMX and on GPUs); comparisons are then made on the bf16 scores, which produces more ties, handled
exactly by the rule above.

The gallery (and the queries) may be a torch tensor, a numpy array or ``np.memmap``, or anything
with ``shape``/``len`` and slice indexing (e.g. an h5py dataset): blocks are read one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Positives",
    "retrieval_metrics",
    "rank_metrics",
    "recall_at_k",
    "positive_ranks",
    "topk_bounded",
    "order_keys",
]

_LOW32 = 0xFFFFFFFF
_TWO32 = 1 << 32
_INT64_MIN = torch.iinfo(torch.int64).min
# Scores per similarity block when gallery_chunk is None (16 MiB in fp32): large enough for an
# efficient matmul, small enough to stay in cache-friendly territory.
_BLOCK_ELEMS = 1 << 22
# Candidate x positive comparisons materialised at once while counting.
_COMPARE_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------
# Order keys
# ----------------------------------------------------------------------------------------------
def order_keys(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is the stable descending order of ``scores``.

    ``key_a > key_b`` iff ``score_a > score_b``, or the scores are equal and ``index_a < index_b``.
    ``scores`` are compared as float32 (any float dtype is upcast exactly); ``indices`` (broadcast
    against ``scores``) must lie in ``[0, 2^32)``.
    """
    s = scores.float()
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 -> +0.0 so both tie
    bits = s.contiguous().view(torch.int32)
    # Negative floats order backwards as integers: flip their magnitude bits.
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered.to(torch.int64) * _TWO32 + (_LOW32 - indices.to(torch.int64))


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`order_keys`: (float32 scores, int64 indices)."""
    low = keys & _LOW32
    ordered = ((keys - low) // _TWO32).to(torch.int32)
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.view(torch.float32), _LOW32 - low


# ----------------------------------------------------------------------------------------------
# Feature access
# ----------------------------------------------------------------------------------------------
class _Rows:
    """Block-wise access to an (N, D) feature matrix, returned normalised, cast and on device."""

    def __init__(self, feats: Any, *, device: torch.device, dtype: torch.dtype, normalize: bool):
        shape = getattr(feats, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(f"features must be 2-D (N, D), got shape {shape}")
        self.feats, self.n, self.dim = feats, int(shape[0]), int(shape[1])
        self.device, self.dtype, self.normalize = device, dtype, normalize

    def _finish(self, block: Any) -> torch.Tensor:
        if not isinstance(block, torch.Tensor):
            block = torch.from_numpy(np.array(block, dtype=np.float32))  # copy: memmaps are read-only
        block = block.to(self.device).float()
        if self.normalize:
            block = F.normalize(block, dim=1)
        return block.to(self.dtype)

    def slice(self, start: int, stop: int) -> torch.Tensor:
        return self._finish(self.feats[start:stop])

    def take(self, index: np.ndarray) -> torch.Tensor:
        """Rows at ``index`` (sorted ascending for memmaps and h5py)."""
        if isinstance(self.feats, torch.Tensor):
            return self._finish(self.feats.index_select(0, torch.as_tensor(index, device=self.feats.device)))
        try:
            block = self.feats[index]
        except (TypeError, IndexError, ValueError):  # slice-only containers
            block = np.stack([np.asarray(self.feats[i : i + 1])[0] for i in index.tolist()])
        return self._finish(block)


def _resolve_device(feats: Any, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return feats.device if isinstance(feats, torch.Tensor) else torch.device("cpu")


def _auto_gallery_chunk(gallery_chunk: int | None, query_chunk: int) -> int:
    if gallery_chunk is None:
        return max(1024, _BLOCK_ELEMS // max(query_chunk, 1))
    if gallery_chunk < 1:
        raise ValueError(f"gallery_chunk must be >= 1, got {gallery_chunk}")
    return gallery_chunk


# ----------------------------------------------------------------------------------------------
# Positives
# ----------------------------------------------------------------------------------------------
def _as_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


class Positives:
    """Which gallery items are correct for each query, served chunk by chunk.

    Build with :meth:`from_labels` (same label = correct; memory O(Q + G)) or :meth:`from_lists`
    (explicit gallery indices per query, e.g. the 5 captions of an image; memory O(total)).
    """

    def __init__(self, starts: np.ndarray, counts: np.ndarray, flat: np.ndarray, order: np.ndarray,
                 num_gallery: int):
        # Positives of query i: flat[starts[i] : starts[i] + counts[i]], ascending gallery index.
        self.starts, self.counts, self.flat = starts, counts, flat
        self.order, self.num_gallery = order, num_gallery

    @property
    def num_queries(self) -> int:
        return len(self.counts)

    @classmethod
    def from_labels(cls, query_labels: Any, gallery_labels: Any) -> Positives:
        """Gallery item ``g`` is correct for query ``q`` when ``gallery_labels[g] == query_labels[q]``."""
        ql, gl = _as_numpy(query_labels).reshape(-1), _as_numpy(gallery_labels).reshape(-1)
        by_label = np.argsort(gl, kind="stable")  # gallery grouped by label, ascending index inside
        uniq, first, size = np.unique(gl[by_label], return_index=True, return_counts=True)
        slot = np.clip(np.searchsorted(uniq, ql), 0, max(len(uniq) - 1, 0))
        found = uniq[slot] == ql if len(uniq) else np.zeros(len(ql), dtype=bool)
        starts = np.where(found, first[slot] if len(uniq) else 0, 0).astype(np.int64)
        counts = np.where(found, size[slot] if len(uniq) else 0, 0).astype(np.int64)
        # Queries of one label share positives: process them together so each chunk's union is small.
        order = np.argsort(ql, kind="stable")
        return cls(starts, counts, by_label.astype(np.int64), order, len(gl))

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]], num_gallery: int) -> Positives:
        """Explicit lists of correct gallery indices per query (duplicates are ignored)."""
        cleaned = [np.unique(np.asarray(list(items), dtype=np.int64)) for items in lists]
        for i, items in enumerate(cleaned):
            if len(items) and (items[0] < 0 or items[-1] >= num_gallery):
                raise ValueError(f"positives[{i}] has an index outside [0, {num_gallery})")
        counts = np.array([len(items) for items in cleaned], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        flat = np.concatenate(cleaned) if cleaned else np.zeros(0, dtype=np.int64)
        return cls(starts, counts, flat, np.arange(len(cleaned)), num_gallery)

    def padded(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), P) gallery indices of the positives of ``rows``, ascending, padded with -1."""
        counts = self.counts[rows]
        width = int(counts.max()) if len(rows) else 0
        cols = np.arange(width)
        index = np.minimum(self.starts[rows, None] + cols, max(len(self.flat) - 1, 0))
        valid = cols < counts[:, None]
        return np.where(valid, self.flat[index] if len(self.flat) else -1, -1).astype(np.int64)
