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
3. Each candidate needs ``t`` = how many of its row's positives rank above it; it then precedes
   the positives ``t+1 .. m`` (best first). All positives of the chunk are coded as one int64
   ``row * 2^32 + ordered(score)`` (the float32 bit pattern mapped to an order-preserving integer)
   and sorted once; a single 1-D ``searchsorted`` of the candidate's code gives ``t`` (candidates
   arrive row-major, so the searches are cache-friendly). A candidate whose score *equals* one of
   its positives' (rare in fp32, frequent in bf16) is settled exactly with the full tie-aware key
   ``ordered(score) * 2^32 + (2^32 - 1 - index)`` (``key_a > key_b`` iff ``a`` precedes ``b`` in
   the stable descending order). A per-row histogram of ``t`` and a cumulative sum give, for the
   ``j``-th best positive, the number of other items ahead of it; ``j - 1`` positives are ahead too.

Cost: the matmul, one comparison and one ``nonzero`` per block, and ``O(M log(c P))`` for the ``M``
candidates (items scoring above their query's worst positive: ``sum_q (r_m - m)``, small for a useful
model). Memory: ``O(c * g)`` for a block, ``O(c * P)`` for the positives, ``O(g * D)`` for gallery
rows, ``O(M_block)`` for one block's candidates, plus the ``O(Q * P)`` ranks when
:func:`positive_ranks` is asked for them, whatever the gallery size. Measured figures:
``benchmarks/eval_metrics.py``.

Numerics: each (query, item) pair gets exactly one score. A positive's score comes from a different
matmul call than the blocks, so for non-exact inputs it may differ from a full ``Q @ G^T`` in the
last bit (different summation order); with exactly representable products the results are bitwise
those of a full sort. ``compute_dtype=torch.bfloat16`` runs the matmul in bf16 (fast on CPUs with
AMX and on GPUs); comparisons are then made on the bf16 scores, which produces more ties, handled
exactly by the rule above.

The gallery (and the queries) may be a torch tensor, a numpy array or ``np.memmap``, or anything
with a 2-D ``shape`` and slice indexing (e.g. an h5py dataset): blocks are read one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "Positives",
    "order_keys",
    "positive_ranks",
    "rank_metrics",
    "recall_at_k",
    "retrieval_metrics",
    "topk_bounded",
]

_LOW32 = 0xFFFFFFFF
_TWO32 = 1 << 32
# Scores per similarity block when gallery_chunk is None (16 MiB in fp32): large enough for an
# efficient matmul, small enough to stay in cache-friendly territory.
_BLOCK_ELEMS = 1 << 22


# ----------------------------------------------------------------------------------------------
# Order keys
# ----------------------------------------------------------------------------------------------
def order_keys(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is the stable descending order of ``scores``.

    ``key_a > key_b`` iff ``score_a > score_b``, or the scores are equal and ``index_a < index_b``.
    ``scores`` are compared as float32 (any float dtype is upcast exactly); ``indices`` (broadcast
    against ``scores``) must lie in ``[0, 2^32)``.
    """
    return _ordered_int(scores) * _TWO32 + (_LOW32 - indices.to(torch.int64))


def _ordered_int(scores: torch.Tensor) -> torch.Tensor:
    """int64 in [-2^31, 2^31) with the order of the float32 scores (``-0.0`` == ``+0.0``)."""
    s = scores.float()
    s = torch.where(s == 0, torch.zeros_like(s), s)
    bits = s.contiguous().view(torch.int32)
    # Negative floats order backwards as integers: flip their magnitude bits.
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)


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


# ----------------------------------------------------------------------------------------------
# Ranking core
# ----------------------------------------------------------------------------------------------
def _positive_scores(q: torch.Tensor, gallery: _Rows, pos: torch.Tensor, valid: torch.Tensor,
                     piece: int) -> torch.Tensor:
    """Scores of each query against its own positives (c x P, NaN at padding)."""
    rows = valid.nonzero(as_tuple=True)[0]
    flat = pos[valid]
    union, inverse = torch.unique(flat, return_inverse=True)
    picked = torch.empty(len(flat), dtype=q.dtype, device=q.device)
    union_np = union.cpu().numpy()
    for start in range(0, len(union_np), piece):  # bounded: c x piece scores at a time
        block = q @ gallery.take(union_np[start : start + piece]).T
        sel = ((inverse >= start) & (inverse < start + piece)).nonzero(as_tuple=True)[0]
        picked[sel] = block[rows[sel], inverse[sel] - start]
    scores = torch.full(pos.shape, float("nan"), dtype=q.dtype, device=q.device)
    scores[valid] = picked
    return scores


def _gallery_blocks(q: torch.Tensor, gallery: _Rows, chunk: int,
                    first: torch.Tensor | None) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, q @ block^T) for consecutive gallery blocks; ``first`` is a block computed already."""
    if first is not None:
        yield 0, first
        return
    for start in range(0, gallery.n, chunk):
        yield start, q @ gallery.slice(start, min(start + chunk, gallery.n)).T


def _mask_positives(block: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, offset: int) -> None:
    """Set the chunk's positives inside ``block`` to -inf: they are ranked among themselves apart."""
    inside = valid & (pos >= offset) & (pos < offset + block.shape[1])
    rows, cols = inside.nonzero(as_tuple=True)
    if len(rows):
        block[rows, pos[rows, cols] - offset] = float("-inf")


def _candidates(block: torch.Tensor, floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of the block entries ``>= floor[row]``, row-major."""
    # A row maximum is ~5x cheaper than compare + nonzero: with a good model most rows of most
    # blocks have nothing above their worst positive and are skipped.
    top = block.amax(dim=1)
    active = ((top >= floor) | top.isnan()).nonzero(as_tuple=True)[0]  # NaN hides the row's max
    if len(active) * 2 > len(block):
        return (block >= floor[:, None]).nonzero(as_tuple=True)
    rows, cols = (block[active] >= floor[active, None]).nonzero(as_tuple=True)
    return active[rows], cols


class _PositiveIndex:
    """Answers "how many of row r's positives rank above this candidate?" for many candidates at once.

    A per-row binary search would be ragged. Instead each positive becomes one int64
    ``row * 2^32 + ordered(score)``; sorted, these form one row-major sequence ``W``, and a single
    1-D ``searchsorted`` per candidate counts the positives of its row scoring at least as high.
    Candidates whose score equals one of those positives' (rare in fp32, common in bf16) are
    settled exactly with the full (score, index) keys against the chunk's sorted keys ``A``,
    coded row-major the same way.
    """

    def __init__(self, s_pos: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, num_pos: torch.Tensor):
        rows = valid.nonzero(as_tuple=True)[0]
        self.by_score = (rows * _TWO32 + _ordered_int(s_pos[valid]) + 2**31).sort().values  # W
        self.row_end = num_pos.cumsum(0)  # entries of W up to and including each row
        keys = order_keys(s_pos[valid], pos[valid])
        self.keys = keys.sort().values  # A: comparable across rows
        self.stride = len(self.keys) + 1
        self.by_key = (rows * self.stride + torch.searchsorted(self.keys, keys)).sort().values

    def ahead(self, rows: torch.Tensor, scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        coded = rows * _TWO32 + _ordered_int(scores) + 2**31
        slot = torch.searchsorted(self.by_score, coded)
        ahead = self.row_end[rows] - slot  # positives scoring >= the candidate
        tied = (self.by_score[slot.clamp_max(len(self.by_score) - 1)] == coded).nonzero(as_tuple=True)[0]
        if len(tied):
            r = rows[tied]
            # Full keys are unique (distinct indices), so "key > candidate" == "slot >= candidate's".
            coded = r * self.stride + torch.searchsorted(self.keys, order_keys(scores[tied], index[tied]))
            ahead[tied] = self.row_end[r] - torch.searchsorted(self.by_key, coded)
        return ahead


def _rank_chunk(q: torch.Tensor, gallery: _Rows, pos: torch.Tensor, chunk: int) -> torch.Tensor:
    """1-based ranks of each query's positives, ascending (c x P, 0 at padding)."""
    valid = pos >= 0
    num_pos = valid.sum(dim=1)
    first = None
    if gallery.n <= chunk:  # one block: read the positives' scores from it
        first = q @ gallery.slice(0, gallery.n).T
        s_pos = first.gather(1, pos.clamp_min(0)).masked_fill(~valid, float("nan"))
    else:
        s_pos = _positive_scores(q, gallery, pos, valid, chunk)
    if not bool(torch.isfinite(s_pos[valid]).all()):
        raise ValueError("similarities contain NaN or inf: check the query and gallery features")
    # Only items scoring at least a query's worst positive can be ahead of any of its positives.
    floor = s_pos.masked_fill(~valid, float("inf")).amin(dim=1).masked_fill(num_pos == 0, float("nan"))
    width = pos.shape[1]
    index = _PositiveIndex(s_pos, pos, valid, num_pos)
    hist = torch.zeros(len(q) * (width + 1), dtype=torch.int64, device=q.device)  # [row, #pos ahead]
    for offset, block in _gallery_blocks(q, gallery, chunk, first):
        _mask_positives(block, pos, valid, offset)
        rows, cols = _candidates(block, floor)
        if len(rows):
            ahead = index.ahead(rows, block[rows, cols], cols + offset)
            hist += torch.bincount(rows * (width + 1) + ahead, minlength=len(hist))
    hist = hist.view(len(q), width + 1)
    j = torch.arange(width, device=q.device)
    ranks = 1 + j + hist[:, :width].cumsum(dim=1)  # 1 + positives ahead + others ahead
    return ranks.masked_fill(j >= num_pos[:, None], 0)


def _iter_ranks(queries: _Rows, gallery: _Rows, positives: Positives, query_chunk: int,
                gallery_chunk: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(query indices, ranks c x P, positive counts c) per chunk of queries."""
    if positives.num_queries != queries.n or positives.num_gallery != gallery.n:
        raise ValueError(
            f"positives describe {positives.num_queries} queries x {positives.num_gallery} gallery items "
            f"but the features have {queries.n} x {gallery.n}")
    if queries.dim != gallery.dim:
        raise ValueError(f"query dim {queries.dim} != gallery dim {gallery.dim}")
    if gallery.n >= _TWO32:
        raise ValueError("galleries of 2^32 items or more are not supported")
    for start in range(0, queries.n, query_chunk):
        rows = positives.order[start : start + query_chunk]
        pos = torch.as_tensor(positives.padded(rows), device=queries.device)
        num_pos = (pos >= 0).sum(dim=1)
        if pos.shape[1] == 0 or gallery.n == 0:
            yield rows, pos.clamp_min(0), num_pos
            continue
        contiguous = rows[-1] - rows[0] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1))
        q = queries.slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else queries.take(rows)
        yield rows, _rank_chunk(q, gallery, pos, gallery_chunk), num_pos


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _sources(query_feats: Any, gallery_feats: Any, normalize: bool, device: torch.device | str | None,
             compute_dtype: torch.dtype | None) -> tuple[_Rows, _Rows]:
    dev = _resolve_device(query_feats, device)
    dtype = compute_dtype or torch.float32
    return (_Rows(query_feats, device=dev, dtype=dtype, normalize=normalize),
            _Rows(gallery_feats, device=dev, dtype=dtype, normalize=normalize))


@torch.no_grad()
def rank_metrics(
    query_feats: Any,
    gallery_feats: Any,
    positives: Positives,
    *,
    ks: Sequence[int] = (1, 5, 10),
    query_chunk: int = 1024,
    gallery_chunk: int | None = None,
    normalize: bool = True,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Rank-k, mAP and mINP (in %) for any :class:`Positives`; see the module docstring.

    Returns ``{"R<k>" for k in ks, "mAP", "mINP", "num_queries", "num_gallery",
    "num_queries_without_positive"}``. ``num_queries`` counts every query given; the averages are
    over the ``num_queries - num_queries_without_positive`` queries that have a correct item.
    ``gallery_chunk=None`` picks about 4M scores per block.
    """
    queries, gallery = _sources(query_feats, gallery_feats, normalize, device, compute_dtype)
    query_chunk = max(1, int(query_chunk))
    chunk = _auto_gallery_chunk(gallery_chunk, query_chunk)
    hits = {k: 0 for k in ks}
    ap_sum = inp_sum = 0.0
    evaluated = 0
    for _, ranks, num_pos in _iter_ranks(queries, gallery, positives, query_chunk, chunk):
        has = num_pos > 0
        ranks, m = ranks[has].double(), num_pos[has]
        if len(m) == 0:
            continue
        evaluated += len(m)
        j = torch.arange(1, ranks.shape[1] + 1, device=ranks.device, dtype=torch.float64)
        precision = torch.where(j <= m[:, None], j / ranks.clamp_min(1), 0.0)
        ap_sum += float((precision.sum(dim=1) / m).sum())
        inp_sum += float((m / ranks.gather(1, (m - 1)[:, None]).squeeze(1)).sum())
        for k in ks:
            hits[k] += int((ranks[:, 0] <= k).sum())
    if evaluated == 0:
        raise ValueError("no query has a correct gallery item: check the query and gallery labels")
    out = {f"R{k}": 100.0 * hits[k] / evaluated for k in ks}
    out.update(mAP=100.0 * ap_sum / evaluated, mINP=100.0 * inp_sum / evaluated)
    out.update(num_queries=queries.n, num_gallery=gallery.n,
               num_queries_without_positive=queries.n - evaluated)
    return out


def retrieval_metrics(
    query_feats: Any,
    gallery_feats: Any,
    query_labels: Any,
    gallery_labels: Any,
    *,
    ks: Sequence[int] = (1, 5, 10),
    query_chunk: int = 1024,
    gallery_chunk: int | None = None,
    normalize: bool = True,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Rank-k (CMC), mAP and mINP in %, a gallery item being correct when its label equals the query's.

    ``query_feats`` (Q, D) and ``gallery_feats`` (G, D): tensors, numpy arrays/memmaps or any
    slice-indexable (N, D) container (streamed block by block). Cosine similarity when ``normalize``
    (else the raw inner product). Ties: lower gallery index first (a stable descending sort). Memory
    is bounded by ``query_chunk x gallery_chunk`` scores plus the chunk's positives, never Q x G.
    See :func:`rank_metrics` for the returned keys.
    """
    return rank_metrics(
        query_feats, gallery_feats, Positives.from_labels(query_labels, gallery_labels), ks=ks,
        query_chunk=query_chunk, gallery_chunk=gallery_chunk, normalize=normalize, device=device,
        compute_dtype=compute_dtype)


def recall_at_k(
    query_feats: Any,
    gallery_feats: Any,
    positives: Positives | Sequence[Sequence[int]],
    *,
    ks: Sequence[int] = (1, 5, 10),
    **kwargs: Any,
) -> dict[str, float]:
    """Recall@K in % (a query scores when any of its correct items is in the top K), e.g. image-text
    retrieval where an image has several captions. ``positives``: a :class:`Positives` or one list of
    gallery indices per query. Keyword arguments as :func:`rank_metrics`; returns ``{"R<k>": ...}``.
    """
    if not isinstance(positives, Positives):
        num_gallery = int(getattr(gallery_feats, "shape", [len(gallery_feats)])[0])
        positives = Positives.from_lists(positives, num_gallery)
    out = rank_metrics(query_feats, gallery_feats, positives, ks=ks, **kwargs)
    return {f"R{k}": out[f"R{k}"] for k in ks}


@torch.no_grad()
def positive_ranks(
    query_feats: Any,
    gallery_feats: Any,
    positives: Positives,
    *,
    query_chunk: int = 1024,
    gallery_chunk: int | None = None,
    normalize: bool = True,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based ranks of every query's correct items: ``(ranks (Q, Pmax) ascending, 0-padded; counts (Q,))``.

    Same algorithm and tie rule as :func:`rank_metrics`; useful for per-query analyses.
    """
    queries, gallery = _sources(query_feats, gallery_feats, normalize, device, compute_dtype)
    query_chunk = max(1, int(query_chunk))
    chunk = _auto_gallery_chunk(gallery_chunk, query_chunk)
    width = int(positives.counts.max()) if positives.num_queries else 0
    ranks = torch.zeros(queries.n, width, dtype=torch.int64)
    for rows, chunk_ranks, _ in _iter_ranks(queries, gallery, positives, query_chunk, chunk):
        ranks[torch.as_tensor(rows), : chunk_ranks.shape[1]] = chunk_ranks.cpu()
    return ranks, torch.as_tensor(positives.counts)


@torch.no_grad()
def topk_bounded(
    query_feats: Any,
    gallery_feats: Any,
    k: int,
    query_chunk: int = 1024,
    gallery_chunk: int | None = None,
    *,
    normalize: bool = True,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k gallery items per query, streaming over gallery blocks: ``(scores (Q, k'), indices (Q, k'))``.

    ``k' = min(k, G)``; rows are sorted best first. Ties are broken by gallery index (lower first),
    the same rule as the metrics, so the result equals the first ``k`` entries of a stable descending
    sort of the full score matrix (``torch.topk`` itself leaves the order of ties unspecified).
    Scores are float32 (the compute-dtype scores, upcast). Memory: O(query_chunk x gallery_chunk).
    """
    queries, gallery = _sources(query_feats, gallery_feats, normalize, device, compute_dtype)
    query_chunk = max(1, int(query_chunk))
    chunk = _auto_gallery_chunk(gallery_chunk, query_chunk)
    k = min(int(k), gallery.n)
    all_keys = []
    for start in range(0, queries.n, query_chunk):
        q = queries.slice(start, min(start + query_chunk, queries.n))
        best = torch.empty(len(q), 0, dtype=torch.int64, device=q.device)
        for offset in range(0, gallery.n, chunk):
            block = q @ gallery.slice(offset, min(offset + chunk, gallery.n)).T
            index = torch.arange(offset, offset + block.shape[1], device=q.device)
            keys = order_keys(block, index)  # unique keys: no ambiguous ties when merging
            keys = torch.cat([best, keys.topk(min(k, keys.shape[1]), dim=1).values], dim=1)
            best = keys.topk(min(k, keys.shape[1]), dim=1).values
        all_keys.append(best)
    if not all_keys:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return _decode_keys(torch.cat(all_keys))
