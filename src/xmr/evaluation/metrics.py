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
and ``rank(p) = 1 + #{items that precede p}``. Queries are taken in chunks of ``c`` (grouped by label
so that a chunk's positives overlap) and up to ``_PASS_QUERIES`` of them per *pass*:

1. The positives' own scores ``s_p`` are computed first (small matmuls against the rows of the
   pass's positives, read once), giving each query's worst positive score, its *floor*.
2. The gallery is streamed once per pass in blocks of ``g`` rows (read, normalised and cast once),
   and each block is scored against every query chunk, one chunk per core (single-threaded
   workers: the work after the matmul is many small operations). The chunk's positives are masked
   out of the block (their order among themselves comes from step 1); only items scoring at least
   the floor, the *candidates*, can precede a positive. They are found with an integer comparison
   of the scores' bit patterns (the same test as the float one) and ``flatnonzero``.
3. Candidates are binned per row, uniformly between the row's worst and best positive (the same
   float formula for candidates and positives, monotone in the score), and counted per (row, bin).
   A bin without any of the row's positives lies between two consecutive positives, so its count
   is all that is needed. Candidates in a bin holding a positive (about 1-2 %, every tie among
   them) are settled one by one with the exact tie-aware keys ``ordered(score) * 2^32 + (2^32 - 1 -
   index)`` (``key_a > key_b`` iff ``a`` precedes ``b``), giving how many positives are ahead of each.
   Suffix sums of the bin counts plus those exact counts give, for the ``j``-th best positive, the
   number of other items ahead of it; ``j - 1`` positives are ahead too.

Cost: the matmul, one integer comparison and one ``flatnonzero`` per block, and ``O(1)`` per
candidate (items scoring above their query's worst positive: ``sum_q (r_m - m)``). Memory per pass:
the blocks in flight (``cores x c x g`` scores), ``c x 1024`` bin counts per chunk, the pass's
positives' rows, plus the ``O(Q * P)`` ranks when :func:`positive_ranks` is asked for them, whatever
the gallery size. Measured figures: ``benchmarks/eval_metrics.py``.

Numerics: each (query, item) pair gets exactly one score. A positive's score comes from a different
matmul call than the blocks, so for non-exact inputs it may differ from a full ``Q @ G^T`` in the
last bit (different summation order); with exactly representable products the results are bitwise
those of a full sort. ``compute_dtype=torch.bfloat16`` runs the matmul in bf16 (fast on CPUs with
AMX and on GPUs); comparisons are then made on the bf16 scores, which produces more ties, handled
exactly by the rule above.

The gallery (and the queries) may be a torch tensor, a numpy array, an ``np.memmap``, a path to a
``.npy`` file (read with file reads), a :class:`~xmr.evaluation.streaming.ChunkedFeatures` or list
of row chunks, or anything with a 2-D ``shape`` and slice indexing (e.g. an h5py dataset): blocks
are read one at a time and the whole gallery matrix is never held (see ``streaming.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from xmr.evaluation.streaming import FeatureSource, chunk_workers

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
# Bins per row of the candidates' score histogram (counts: 8 bytes x rows x bins per query chunk).
_BIN_CAP = 1024
# Queries scored per pass over the gallery, and the correct items whose rows a pass holds.
_PASS_QUERIES = 1 << 14
_PASS_POSITIVES = 1 << 17
# Integer views of the score dtypes that _ChunkCounter compares as bit patterns on the CPU.
_INT_OF = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
           torch.float64: torch.int64}


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
    """int64 in (-2^31, 2^31) with the order of the float32 scores (``-0.0`` == ``+0.0``)."""
    bits = scores.float().contiguous().view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    # Floats are sign-magnitude: negating the magnitude of negatives gives an order-preserving integer.
    return torch.where(bits < 0, -magnitude, magnitude).to(torch.int64)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`order_keys`: (float32 scores, int64 indices)."""
    low = keys & _LOW32
    ordered = (keys - low) // _TWO32
    bits = torch.where(ordered < 0, (-ordered) | -(2**31), ordered).to(torch.int32)
    return bits.view(torch.float32), _LOW32 - low


# ----------------------------------------------------------------------------------------------
# Feature access
# ----------------------------------------------------------------------------------------------
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
def _positive_scores(q: torch.Tensor, union: np.ndarray, feats: torch.Tensor, pos: torch.Tensor,
                     valid: torch.Tensor, piece: int) -> torch.Tensor:
    """Scores of each query against its own positives (c x P, NaN at padding).

    ``feats`` holds the gallery rows ``union`` (ascending); ``c x piece`` scores at a time.
    """
    rows = valid.nonzero(as_tuple=True)[0]
    flat = pos[valid]
    mine, inverse = torch.unique(flat, return_inverse=True)
    where = torch.as_tensor(np.searchsorted(union, mine.cpu().numpy()), device=q.device)
    picked = torch.empty(len(flat), dtype=q.dtype, device=q.device)
    for start in range(0, len(mine), piece):
        block = q @ feats[where[start : start + piece]].T
        sel = ((inverse >= start) & (inverse < start + piece)).nonzero(as_tuple=True)[0]
        picked[sel] = block[rows[sel], inverse[sel] - start]
    scores = torch.full(pos.shape, float("nan"), dtype=q.dtype, device=q.device)
    scores[valid] = picked
    return scores


def _mask_positives(block: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, offset: int) -> None:
    """Set the chunk's positives inside ``block`` to -inf: they are ranked among themselves apart."""
    inside = valid & (pos >= offset) & (pos < offset + block.shape[1])
    rows, cols = inside.nonzero(as_tuple=True)
    if len(rows):
        block[rows, pos[rows, cols] - offset] = float("-inf")


class _PositiveIndex:
    """Answers "how many of row r's positives rank above this candidate?" for many candidates at once.

    A per-row binary search would be ragged. Instead each positive becomes one int64
    ``row * 2^32 + ordered(score)``; sorted, these form one row-major sequence ``W``, and a single
    1-D ``searchsorted`` per candidate counts the positives of its row scoring at least as high.
    Candidates whose score equals one of those positives' are settled exactly with the full
    (score, index) keys against the chunk's sorted keys ``A``, coded row-major the same way.
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


class _ChunkCounter:
    """Counts, block after block, the gallery items ahead of each positive of one chunk of queries.

    Steps 2-3 of the module docstring: candidates found by :meth:`_candidates`, binned by
    :meth:`_bin` (``_BIN_CAP`` bins per row, the last collecting everything above the best
    positive), counted per (row, bin); those in a bin holding a positive go through the exact
    :class:`_PositiveIndex`.
    """

    def __init__(self, q: torch.Tensor, pos: torch.Tensor, s_pos: torch.Tensor):
        self.q, self.pos = q, pos
        self.valid = valid = pos >= 0
        self.num_pos = num_pos = valid.sum(dim=1)
        if not bool(torch.isfinite(s_pos[valid]).all()):
            raise ValueError("similarities contain NaN or inf: check the query and gallery features")
        c, width = pos.shape
        # Only items scoring at least a query's worst positive can be ahead of any of its positives.
        self.floor = (s_pos.masked_fill(~valid, float("inf")).amin(dim=1)
                      .masked_fill(num_pos == 0, float("nan")))
        self.index = _PositiveIndex(s_pos, pos, valid, num_pos)
        # Uniform bins from the worst to the best positive; the same float32 formula bins candidates
        # and positives, so equal scores always share a bin (any monotone formula would do).
        self.bins = _BIN_CAP
        low = self.floor.float().nan_to_num(0.0)
        high = s_pos.float().masked_fill(~valid, float("-inf")).amax(dim=1).nan_to_num(0.0)
        span = torch.maximum(high - low, torch.maximum(low.abs() * 2**-8, torch.full_like(low, 1e-30)))
        self.low, self.scale = low, (self.bins - 2.5) / span  # the best positive lands in bin <= bins - 3
        # Positives best first (the tie rule's order) and their bins.
        keys = order_keys(s_pos, pos.clamp_min(0)).masked_fill(~valid, -(2**63))
        best_first = keys.argsort(dim=1, descending=True)
        self.j = torch.arange(width, device=q.device)
        self.pos_bins = self._bin(s_pos.gather(1, best_first), low[:, None], self.scale[:, None]).masked_fill(
            self.j >= num_pos[:, None], 0)
        self.row_bins = torch.arange(c, device=q.device) * self.bins
        self.flag = torch.zeros(c * self.bins, dtype=torch.bool, device=q.device)
        self.flag[(self.row_bins[:, None] + self.pos_bins)[self.j < num_pos[:, None]]] = True
        self.counts = torch.zeros(c * self.bins, dtype=torch.int64, device=q.device)  # [row, bin]
        self.hist = torch.zeros(c * (width + 1), dtype=torch.int64, device=q.device)  # [row, #pos ahead]
        self.prefilter = True
        self.q_nan = bool(q.isnan().any())
        self.bounds = None
        if q.device.type == "cpu" and q.dtype in _INT_OF:
            # Integer thresholds for _candidates_numpy; rows with a floor <= 0 (compared as floats)
            # and rows without positives get one that no score reaches.
            itype = _INT_OF[q.dtype]
            bits = self.floor.contiguous().view(itype)
            never = (num_pos == 0) | (self.floor <= 0)
            self.bounds = bits.masked_fill(never, torch.iinfo(itype).max).numpy().copy()

    def _bin(self, scores: torch.Tensor, low: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Bin of scores >= low (monotone non-decreasing in the score; clamped to the last bin)."""
        return ((scores.float() - low) * scale).clamp_max_(self.bins - 1).to(torch.int64)

    def _candidates(self, block: torch.Tensor, may_nan: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of the block entries ``>= floor[row]`` (NaN never is)."""
        floor, bounds, active = self.floor, self.bounds, None
        if self.prefilter:
            # A row maximum is ~5x cheaper than compare + nonzero: with a good model most rows of most
            # blocks have nothing above their worst positive and are skipped. With a weak one nearly
            # every row has candidates: stop paying for the maximum.
            top = block.amax(dim=1)
            active = ((top >= floor) | top.isnan()).nonzero(as_tuple=True)[0]  # NaN hides the max
            if len(active) * 2 > len(block):
                self.prefilter, active = False, None
            elif not len(active):
                return active, active
            else:
                block, floor = block[active], floor[active]
                bounds = None if bounds is None else bounds[active.numpy()]
        if bounds is None:
            rows, cols = (block >= floor[:, None]).nonzero(as_tuple=True)
        else:
            rows, cols = self._candidates_numpy(block, bounds, may_nan)
            low = (floor <= 0).nonzero(as_tuple=True)[0]  # rows the integer test leaves out: compare
            if len(low):
                low_rows, low_cols = (block[low] >= floor[low, None]).nonzero(as_tuple=True)
                rows, cols = torch.cat([rows, low[low_rows]]), torch.cat([cols, low_cols])
        return (rows, cols) if active is None else (active[rows], cols)

    @staticmethod
    def _candidates_numpy(block: torch.Tensor, bounds: np.ndarray,
                          may_nan: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The float test ``score >= floor`` for floors > 0, done on the bit patterns (CPU only).

        Floats are sign-magnitude, so for ``floor > 0`` it is ``bits >= bits(floor)`` as signed
        integers (negative scores are negative integers). NumPy's integer compare and
        ``flatnonzero`` are several times faster than torch's float compare and ``nonzero``. A NaN
        passes the integer test, so blocks that may hold one are filtered afterwards.
        """
        bits = block.contiguous().view(_INT_OF[block.dtype]).numpy()
        flat = np.flatnonzero(bits >= bounds[:, None])
        width = bits.shape[1]
        rows = flat >> (width.bit_length() - 1) if width & (width - 1) == 0 else flat // width
        rows_t, cols_t = torch.from_numpy(rows), torch.from_numpy(flat - rows * width)
        if may_nan:
            keep = ~block[rows_t, cols_t].isnan()
            rows_t, cols_t = rows_t[keep], cols_t[keep]
        return rows_t, cols_t

    def add(self, block: torch.Tensor, offset: int, may_nan: bool = True) -> None:
        """Count the candidates of ``block = q @ gallery[offset : offset + g]^T``."""
        _mask_positives(block, self.pos, self.valid, offset)
        rows, cols = self._candidates(block, may_nan or self.q_nan)
        if not len(rows):
            return
        scores = block[rows, cols]
        key = self._bin(scores, self.low[rows], self.scale[rows]).add_(self.row_bins[rows])
        self.counts.index_add_(0, key, torch.ones(1, dtype=torch.int64, device=key.device).expand(len(key)))
        exact = self.flag[key].nonzero(as_tuple=True)[0]
        if len(exact):
            r = rows[exact]
            ahead = self.index.ahead(r, scores[exact], cols[exact] + offset)
            self.hist += torch.bincount(r * (self.pos.shape[1] + 1) + ahead, minlength=len(self.hist))

    def add_product(self, gallery_rows: torch.Tensor, offset: int, may_nan: bool) -> None:
        """Score the chunk's queries against ``gallery_rows`` (starting at ``offset``) and count."""
        self.add(self.q @ gallery_rows.T, offset, may_nan)

    def ranks(self) -> torch.Tensor:
        """1-based ranks of each query's positives, ascending (c x P, 0 at padding)."""
        c, width = self.pos.shape
        coarse = self.counts.masked_fill(self.flag, 0).view(c, self.bins)  # flagged bins: counted exactly
        above = coarse.flip(1).cumsum(dim=1).flip(1)  # above[r, b] = items in bins >= b
        ahead = above.gather(1, self.pos_bins + 1) + self.hist.view(c, width + 1)[:, :width].cumsum(dim=1)
        ranks = 1 + self.j + ahead  # 1 + positives ahead + others ahead
        return ranks.masked_fill(self.j >= self.num_pos[:, None], 0)


def _passes(positives: Positives, query_chunk: int) -> Iterator[list[np.ndarray]]:
    """Query chunks grouped into passes over the gallery (bounded queries and positives per pass)."""
    order, group, held = positives.order, [], 0
    for start in range(0, len(order), query_chunk):
        rows = order[start : start + query_chunk]
        size = int(positives.counts[rows].sum())
        if group and (held + size > _PASS_POSITIVES or len(group) * query_chunk >= _PASS_QUERIES):
            yield group
            group, held = [], 0
        group.append(rows)
        held += size
    if group:
        yield group


def _query_rows(queries: FeatureSource, rows: np.ndarray) -> torch.Tensor:
    if rows[-1] - rows[0] == len(rows) - 1 and bool(np.all(np.diff(rows) == 1)):
        return queries.slice(int(rows[0]), int(rows[-1]) + 1)
    return queries.take(np.sort(rows))[torch.as_tensor(np.argsort(np.argsort(rows)))]


def _single_block(q: torch.Tensor, pos: torch.Tensor, gallery: torch.Tensor, may_nan: bool) -> _ChunkCounter:
    """A chunk's counter when the whole gallery is one block: positives' scores read from it."""
    block = q @ gallery.T
    counter = _ChunkCounter(q, pos, block.gather(1, pos.clamp_min(0)).masked_fill(pos < 0, float("nan")))
    counter.add(block, 0, may_nan)
    return counter


def _iter_ranks(queries: FeatureSource, gallery: FeatureSource, positives: Positives, query_chunk: int,
                gallery_chunk: int) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """(query indices, ranks c x P, positive counts c) per chunk of queries.

    The gallery is the outer loop: each block is read, normalised and cast once per pass and scored
    against every query chunk of the pass (one pass for up to ``_PASS_QUERIES`` queries).
    """
    if positives.num_queries != queries.n or positives.num_gallery != gallery.n:
        raise ValueError(
            f"positives describe {positives.num_queries} queries x {positives.num_gallery} gallery items "
            f"but the features have {queries.n} x {gallery.n}")
    if queries.dim != gallery.dim:
        raise ValueError(f"query dim {queries.dim} != gallery dim {gallery.dim}")
    if gallery.n >= _TWO32:
        raise ValueError("galleries of 2^32 items or more are not supported")
    for group in _passes(positives, query_chunk):
        pending = []
        for rows in group:
            pos = torch.as_tensor(positives.padded(rows), device=queries.device)
            if pos.shape[1] == 0 or gallery.n == 0:
                yield rows, pos.clamp_min(0), (pos >= 0).sum(dim=1)
            else:
                pending.append((rows, pos, _query_rows(queries, rows)))
        if not pending:
            continue
        counters = []
        if gallery.n <= gallery_chunk:  # one block: read the positives' scores from it
            feats = gallery.slice(0, gallery.n)
            may_nan = bool(feats.isnan().any())
            with chunk_workers(queries.device) as run:
                counters = run([partial(_single_block, q, pos, feats, may_nan) for _, pos, q in pending])
        else:
            union = np.unique(np.concatenate([p[p >= 0].cpu().numpy() for _, p, _ in pending]))
            feats = gallery.take(union)
            for _, pos, q in pending:
                counters.append(_ChunkCounter(q, pos, _positive_scores(q, union, feats, pos, pos >= 0,
                                                                       gallery_chunk)))
            del feats
            with chunk_workers(queries.device) as run:
                for offset, block_rows in gallery.blocks(gallery_chunk):
                    may_nan = bool(block_rows.isnan().any())
                    run([partial(counter.add_product, block_rows, offset, may_nan) for counter in counters])
        for (rows, _, _), counter in zip(pending, counters):
            yield rows, counter.ranks(), counter.num_pos


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _sources(query_feats: Any, gallery_feats: Any, normalize: bool, device: torch.device | str | None,
             compute_dtype: torch.dtype | None) -> tuple[FeatureSource, FeatureSource]:
    dev = _resolve_device(query_feats, device)
    dtype = compute_dtype or torch.float32
    return (FeatureSource(query_feats, device=dev, dtype=dtype, normalize=normalize),
            FeatureSource(gallery_feats, device=dev, dtype=dtype, normalize=normalize))


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
        num_gallery = FeatureSource(gallery_feats, device=torch.device("cpu"), dtype=torch.float32,
                                    normalize=False).n
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
    for first in range(0, queries.n, _PASS_QUERIES):  # the gallery is read once per pass
        starts = range(first, min(first + _PASS_QUERIES, queries.n), query_chunk)
        chunks = [queries.slice(start, min(start + query_chunk, queries.n)) for start in starts]
        best = [torch.empty(len(q), 0, dtype=torch.int64, device=q.device) for q in chunks]
        for offset, rows in gallery.blocks(chunk):
            index = torch.arange(offset, offset + len(rows), device=rows.device)
            for i, q in enumerate(chunks):
                keys = order_keys(q @ rows.T, index)  # unique keys: no ambiguous ties when merging
                keys = torch.cat([best[i], keys.topk(min(k, keys.shape[1]), dim=1).values], dim=1)
                best[i] = keys.topk(min(k, keys.shape[1]), dim=1).values
        all_keys.extend(best)
    if not all_keys:
        return torch.zeros(0, k), torch.zeros(0, k, dtype=torch.int64)
    return _decode_keys(torch.cat(all_keys))
