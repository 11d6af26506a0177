"""Score an embedded evaluation split under a task kind, through the two stages search uses.

Single-stage methods: the task counts the rank of every positive in bounded memory (`tasks.py`).
Reranking methods: stage 1 ranks every positive the same way; the top K' of each query are re-scored by
the method (`shortlist.two_stage`, the function search calls) and the positives inside the shortlist take
their re-ranked positions, the others keep their stage-1 ranks (re-ranking only permutes the top K').
The task's metrics are then computed from those ranks, and K' is recorded in the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from xmr.data.records import EvalSplit
from xmr.errors import XmrError
from xmr.evaluation.metrics import Positives
from xmr.evaluation.ranks import positive_ranks_excluding
from xmr.evaluation.shortlist import matrix_fetch, matrix_stage1, rerank_depth, rerank_positions, two_stage
from xmr.evaluation.tasks import Task, build_task
from xmr.methods.base import Method, PreparesGallery, Reranker
from xmr.outputs import Candidates, Embedded


@dataclass
class Scored:
    """Metrics by direction (in %) and what the report must record about how they were computed."""

    results: dict[str, dict[str, float]]
    protocol: dict[str, Any] = field(default_factory=dict)


def score_split(method: Method, task: str | Task, split: EvalSplit, queries: Embedded, gallery: Embedded, *,
                i2t: bool = False, query_chunk: int = 1024, depth: int | None = None) -> Scored:
    """Metrics of embedded queries against an embedded gallery; two stages when the method reranks.

    `task`: a Task or a registered name ("person" takes `i2t`). `depth`: K' (None = the method's own).
    """
    if isinstance(task, str):
        task = build_task(task, **({"i2t": i2t} if task == "person" else {}))
    depth = rerank_depth(method, depth)
    protocol: dict[str, Any] = {"task": task.describe(), "rerank_depth": depth}
    if depth == 0 or not isinstance(method, Reranker):
        results = task.evaluate(split, queries.vectors, gallery.vectors, query_chunk=query_chunk)
        return Scored(results, protocol)
    if getattr(task, "folds", None):
        raise XmrError(f"two-stage evaluation over {task.folds} folds is not supported; evaluate the whole set "
                       "(folds=None) or pass rerank_depth=0")
    main, *others = task.directions
    exclude = task.excluded(split)
    positives = Positives.from_lists(split.positives, len(gallery))
    ranks, counts = positive_ranks_excluding(queries.vectors, gallery.vectors, positives, exclude,
                                             query_chunk=query_chunk)
    reranked_ids = shortlists(method, queries, gallery, exclude, depth, query_chunk)
    new_ranks = rerank_positions(reranked_ids, ranks.numpy(), positives.padded(np.arange(len(split))))
    extra = {}
    if task.needs_subset_ranks():
        extra["subset_ranks"] = reranked_subset_ranks(method, queries, gallery, split, exclude)
    results = {main: task.metrics_from_ranks(torch.from_numpy(new_ranks), counts, split, main, **extra)}
    if others:  # the reverse direction is scored in one stage (the reranker scores queries against images)
        results.update(task.evaluate(split, queries.vectors, gallery.vectors, query_chunk=query_chunk,
                                     directions=others))
        protocol["single_stage_directions"] = list(others)
    return Scored(task.add_summary(results), protocol)


def shortlists(method: Reranker, queries: Embedded, gallery: Embedded, exclude: list[int] | None, depth: int,
               query_chunk: int = 1024) -> np.ndarray:
    """(Q, K') ids of each query's re-ranked top K' through `two_stage`, in query chunks: the candidates'
    vectors (chunk x K' x D) are the only large buffer, whatever the number of queries."""
    # per-item second-stage work done once for the gallery, not once per shortlist the item is in
    fetch = matrix_fetch(gallery, method.prepare_gallery(gallery.vectors) if isinstance(method, PreparesGallery)
                         else None)
    out = []
    for start in range(0, len(queries.vectors), query_chunk):
        rows = slice(start, start + query_chunk)
        chunk = Embedded(queries.vectors[rows], {n: v[rows] for n, v in queries.extras.items()})
        stage1 = matrix_stage1(gallery.vectors, None if exclude is None else exclude[rows], query_chunk)
        out.append(two_stage(chunk, depth, stage1, reranker=method, depth=depth, fetch=fetch).ids)
    return np.concatenate(out) if out else np.zeros((0, depth), dtype=np.int64)


def reranked_subset_ranks(method: Reranker, queries: Embedded, gallery: Embedded, split: EvalSplit,
                          exclude: list[int] | None) -> torch.Tensor:
    """(Q,) rank of each query's best positive within its candidate group under the method's final score
    (groups are small, e.g. CIRR's 6: every member is re-scored); ties by first-stage order; 0 = no positive."""
    groups = []
    for q, group in enumerate(split.groups or []):
        items = np.unique(np.asarray(list(group), dtype=np.int64))
        groups.append(items[items != exclude[q]] if exclude is not None and exclude[q] >= 0 else items)
    width = max((len(g) for g in groups), default=0)
    ids = np.full((len(groups), width), -1, dtype=np.int64)
    for q, items in enumerate(groups):
        ids[q, : len(items)] = items
    safe = torch.from_numpy(np.where(ids >= 0, ids, 0))
    vectors = gallery.vectors[safe]
    stage1 = torch.einsum("qd,qkd->qk", queries.vectors, vectors).masked_fill(torch.from_numpy(ids < 0), float("-inf"))
    candidates = Candidates(torch.from_numpy(ids), stage1, vectors, {n: v[safe] for n, v in gallery.extras.items()})
    with torch.inference_mode():
        final = method.rerank(queries, candidates).float().masked_fill(torch.from_numpy(ids < 0), float("-inf"))
    first = torch.argsort(torch.argsort(-stage1, dim=1, stable=True), dim=1)  # stage-1 position of each member
    order = np.lexsort((first.numpy(), -final.numpy()), axis=1)
    ranked_ids = np.take_along_axis(ids, order, 1)
    out = torch.zeros(len(groups), dtype=torch.int64)
    for q, row in enumerate(ranked_ids):
        hit = np.flatnonzero(np.isin(row, np.asarray(split.positives[q], dtype=np.int64)) & (row >= 0))
        out[q] = int(hit[0]) + 1 if len(hit) else 0
    return out
