"""Ranks for the task kinds: reference removal, candidate subsets, and metrics computed from ranks.

Everything here works from "the 1-based rank of each positive" (see `tasks.py` for the definitions) and in
bounded memory: only the scores of each query against its excluded item, its positives and its group are
computed beyond `metrics.positive_ranks`. Tie rule as `metrics.py`: equal scores are ordered by gallery
index, lower first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from xmr.evaluation.metrics import Positives, order_keys, positive_ranks
from xmr.evaluation.streaming import FeatureSource

_PAIR_PASS = 2048  # queries whose needed gallery rows are read together (bounds those rows in memory)
_PAIR_PIECE = 4096  # gallery rows per matmul in _pair_scores (bounds a block to c x 4096 scores)
_MIN_KEY = -(2**63)


# ----------------------------------------------------------------------------------------------
# Ranks: exclusion and candidate subsets
# ----------------------------------------------------------------------------------------------
def _sources(query_feats: Any, gallery_feats: Any, *, normalize: bool = True,
             device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
             **_: Any) -> tuple[FeatureSource, FeatureSource]:
    """Feature sources read exactly as metrics.py reads them (same device, dtype, normalisation)."""
    if device is not None:
        dev = torch.device(device)
    else:
        dev = query_feats.device if isinstance(query_feats, torch.Tensor) else torch.device("cpu")
    dtype = compute_dtype or torch.float32
    return (FeatureSource(query_feats, device=dev, dtype=dtype, normalize=normalize),
            FeatureSource(gallery_feats, device=dev, dtype=dtype, normalize=normalize))


@torch.no_grad()
def _pair_scores(queries: FeatureSource, gallery: FeatureSource, rows: np.ndarray, index: np.ndarray,
                 query_chunk: int) -> torch.Tensor:
    """Scores (n, W) float32 of query ``rows[i]`` (ascending) against gallery items ``index[i]``.

    -1 in ``index`` is padding (NaN out). Computed as metrics.py scores positives: normalised rows and
    ``q @ rows.T`` in the compute dtype, reading only the gallery rows that are needed.
    """
    out = torch.full(index.shape, float("nan"))
    for first in range(0, len(rows), _PAIR_PASS):
        last = min(first + _PAIR_PASS, len(rows))
        part = index[first:last]
        union = np.unique(part[part >= 0])
        if not len(union):
            continue
        feats = gallery.take(union)
        for start in range(first, last, query_chunk):
            stop = min(start + query_chunk, last)
            r, c = np.nonzero(index[start:stop] >= 0)
            if not len(r):
                continue
            q = queries.take(rows[start:stop])
            mine, inverse = np.unique(np.searchsorted(union, index[start:stop][r, c]), return_inverse=True)
            picked = torch.empty(len(r))
            for s in range(0, len(mine), _PAIR_PIECE):
                cols = torch.as_tensor(mine[s : s + _PAIR_PIECE], device=feats.device)
                block = (q @ feats[cols].T).float().cpu()
                sel = np.flatnonzero((inverse >= s) & (inverse < s + _PAIR_PIECE))
                picked[sel] = block[r[sel], inverse[sel] - s]
            out[torch.as_tensor(start + r), torch.as_tensor(c)] = picked
    return out


def _without(positives: Positives, exclude: np.ndarray) -> Positives:
    """``positives`` minus item ``exclude[q]`` of each query (query order for chunking kept)."""
    padded = positives.padded(np.arange(positives.num_queries))
    padded[padded == exclude[:, None]] = -1
    keep = padded >= 0
    counts = keep.sum(axis=1).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return Positives(starts, counts, padded[keep].astype(np.int64), positives.order, positives.num_gallery)


def positive_ranks_excluding(query_feats: Any, gallery_feats: Any, positives: Positives,
                             exclude: Sequence[int] | np.ndarray | None,
                             **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranks as :func:`positive_ranks` with gallery item ``exclude[q]`` removed from query q's ranking.

    Returns ``(ranks (Q, P) int64 ascending 0-padded, counts (Q,))``. ``exclude[q] = -1``: nothing removed.
    An excluded item that is a positive of q is dropped from q's positives (``counts`` shrinks). Each
    positive ranked after the excluded item (same scores, tie rule: lower index first) moves up one rank.
    ``kw``: query_chunk, gallery_chunk, normalize, device, compute_dtype (as ``positive_ranks``). The
    excluded item's score comes from the same normalisation and matmul kind as the positives'; for
    features whose products are not exact, a near-tie may compare differently in the last bit.
    """
    if exclude is None:
        return positive_ranks(query_feats, gallery_feats, positives, **kw)
    ex = np.asarray(exclude, dtype=np.int64).reshape(-1)
    if len(ex) != positives.num_queries:
        raise ValueError(f"exclude has {len(ex)} entries for {positives.num_queries} queries")
    if len(ex) and (ex.min() < -1 or ex.max() >= positives.num_gallery):
        raise ValueError(f"exclude holds an index outside [-1, {positives.num_gallery})")
    kept = _without(positives, ex)
    ranks, counts = positive_ranks(query_feats, gallery_feats, kept, **kw)
    rows = np.flatnonzero((ex >= 0) & (kept.counts > 0))
    if len(rows):
        queries, gallery = _sources(query_feats, gallery_feats, **kw)
        pos = kept.padded(rows)
        index = np.concatenate([ex[rows, None], pos], axis=1)
        scores = _pair_scores(queries, gallery, rows, index, max(1, int(kw.get("query_chunk", 1024))))
        keys = order_keys(scores, torch.as_tensor(index).clamp_min(0))
        ahead = ((keys[:, 1:] > keys[:, :1]) & torch.as_tensor(pos >= 0)).sum(dim=1)
        # A NaN item never precedes a positive in metrics.py: it removes nothing.
        rows_t = torch.as_tensor(rows)
        ahead = torch.where(scores[:, 0].isnan(), counts[rows_t], ahead)
        j = torch.arange(ranks.shape[1])
        ranks[rows_t] -= ((j >= ahead[:, None]) & (j < counts[rows_t, None])).long()
    return ranks, counts


def subset_ranks(query_feats: Any, gallery_feats: Any, groups: Sequence[Sequence[int]],
                 positives: Sequence[Sequence[int]], exclude: Sequence[int] | None = None, *,
                 query_chunk: int = 1024, **kw: Any) -> torch.Tensor:
    """1-based rank (Q,) int64 of each query's best positive within ``groups[q]`` minus ``exclude[q]``.

    Same scores and tie rule as the full ranking (NaN scores rank last); 0 when no positive is in the
    group. Groups are small (CIRR: 6 members), so they are scored directly.
    """
    n = len(groups)
    members = []
    for q, group in enumerate(groups):
        items = np.unique(np.asarray(list(group), dtype=np.int64))
        if exclude is not None and exclude[q] >= 0:
            items = items[items != exclude[q]]
        members.append(items)
    index = np.full((n, max([len(m) for m in members], default=0)), -1, dtype=np.int64)
    is_pos = np.zeros(index.shape, dtype=bool)
    for q, items in enumerate(members):
        index[q, : len(items)] = items
        is_pos[q, : len(items)] = np.isin(items, np.asarray(list(positives[q]), dtype=np.int64))
    out = torch.zeros(n, dtype=torch.int64)
    rows = np.flatnonzero(is_pos.any(axis=1))
    if not len(rows):
        return out
    queries, gallery = _sources(query_feats, gallery_feats, **kw)
    if index.max() >= gallery.n:
        raise ValueError(f"groups hold an index outside [0, {gallery.n})")
    scores = _pair_scores(queries, gallery, rows, index[rows], max(1, int(query_chunk)))
    valid = torch.as_tensor(index[rows] >= 0)
    keys = order_keys(scores.nan_to_num(nan=float("-inf")), torch.as_tensor(index[rows]).clamp_min(0))
    keys = keys.masked_fill(~valid, _MIN_KEY)
    best = keys.masked_fill(~torch.as_tensor(is_pos[rows]), _MIN_KEY).amax(dim=1)
    out[torch.as_tensor(rows)] = 1 + ((keys > best[:, None]) & valid).sum(dim=1)
    return out


# ----------------------------------------------------------------------------------------------
# Metrics from ranks (pure)
# ----------------------------------------------------------------------------------------------
def _evaluated(ranks: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    has = torch.as_tensor(counts) > 0
    if not bool(has.any()):
        raise ValueError("no query has a positive")
    return torch.as_tensor(ranks)[has].double(), torch.as_tensor(counts)[has]


def recall_from_ranks(ranks: torch.Tensor, counts: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """R@K in %: share of the queries with a positive (``counts > 0``) whose best positive ranks <= K.

    ``ranks``: (Q, P) 1-based, ascending per row (column 0 = the best positive), 0-padded.
    """
    r, _ = _evaluated(ranks, counts)
    return {k: 100.0 * float((r[:, 0] <= k).double().mean()) for k in ks}


def map_from_ranks(ranks: torch.Tensor, counts: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """mAP@K in % (CIRCO): mean over queries with a positive of
    AP@K = (1 / min(m, K)) * sum_{j <= m, r_j <= K} j / r_j (j = position among the query's positives).
    """
    r, m = _evaluated(ranks, counts)
    j = torch.arange(1, r.shape[1] + 1, dtype=torch.float64)
    out = {}
    for k in ks:
        hit = (j <= m[:, None]) & (r <= k) & (r > 0)
        ap = torch.where(hit, j / r.clamp_min(1), 0.0).sum(dim=1) / m.clamp_max(k)
        out[k] = 100.0 * float(ap.mean())
    return out


def person_from_ranks(ranks: torch.Tensor, counts: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R<k>, mAP, mINP in % as :func:`rank_metrics`: R<k> = 1[r_1 <= k], AP = mean_j j / r_j,
    INP = m / r_m, each averaged over the queries with a positive."""
    r, m = _evaluated(ranks, counts)
    j = torch.arange(1, r.shape[1] + 1, dtype=torch.float64)
    precision = torch.where(j <= m[:, None], j / r.clamp_min(1), 0.0)
    out = {f"R{k}": v for k, v in recall_from_ranks(ranks, counts, ks).items()}
    out["mAP"] = 100.0 * float((precision.sum(dim=1) / m).mean())
    out["mINP"] = 100.0 * float((m / r.gather(1, (m - 1)[:, None]).squeeze(1)).mean())
    return out


def first_rank_metrics(first: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Image-text metrics of best-positive ranks ``first`` (1-based): R<k>, medr, meanr."""
    r = first.double()
    out = {f"R{k}": 100.0 * float((r <= k).double().mean()) for k in ks}
    out["medr"] = float(np.floor(np.median(r.numpy() - 1))) + 1.0  # reference: floor(median 0-based) + 1
    out["meanr"] = float(r.mean())
    return out


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------
def take_rows(feats: Any, rows: np.ndarray) -> Any:
    """Rows (ascending) of a feature container, not normalised (the ranking normalises them)."""
    if isinstance(feats, torch.Tensor):
        return feats.index_select(0, torch.as_tensor(rows, device=feats.device))
    return FeatureSource(feats, device=torch.device("cpu"), dtype=torch.float32, normalize=False).take(rows)


def invert_lists(lists: Sequence[Sequence[int]], size: int) -> list[list[int]]:
    """Query -> items lists turned into item -> queries lists (``size`` items)."""
    out: list[list[int]] = [[] for _ in range(size)]
    for q, items in enumerate(lists):
        for item in items:
            out[item].append(q)
    return out
