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
from xmr.evaluation.metrics import Positives
from xmr.evaluation.shortlist import matrix_fetch, matrix_stage1, rerank_depth, rerank_positions, two_stage
from xmr.evaluation.tasks import Task, build_task, positive_ranks_excluding
from xmr.methods.base import Method, Reranker
from xmr.outputs import Embedded


@dataclass
class Scored:
    """Metrics by direction (in %) and what the report must record about how they were computed."""

    results: dict[str, dict[str, float]]
    protocol: dict[str, Any] = field(default_factory=dict)


def score_split(method: Method, task: str | Task, split: EvalSplit, queries: Embedded, gallery: Embedded, *,
                i2t: bool = False, query_chunk: int = 1024, depth: int | None = None) -> Scored:
    """Metrics of embedded queries against an embedded gallery; two stages when the method reranks."""
    task = build_task(task) if isinstance(task, str) else task
    depth = rerank_depth(method, depth)
    directions = task.default_directions(i2t=i2t)
    protocol: dict[str, Any] = {"task": task.describe(), "rerank_depth": depth}
    if depth == 0 or not isinstance(method, Reranker):
        results = task.evaluate(split, queries.vectors, gallery.vectors, query_chunk=query_chunk,
                                directions=directions)
        return Scored(results, protocol)
    main, *others = directions
    positives = Positives.from_lists(split.positives, len(gallery))
    ranks, counts = positive_ranks_excluding(queries.vectors, gallery.vectors, positives, split.exclude,
                                             query_chunk=query_chunk)
    padded = positives.padded(np.arange(len(split)))
    ranked = two_stage(queries, depth, matrix_stage1(gallery.vectors, split.exclude, query_chunk), reranker=method,
                       depth=depth, fetch=matrix_fetch(gallery))
    new_ranks = rerank_positions(ranked.ids, ranks.numpy(), padded)
    results = {main: task.metrics_from_ranks(torch.from_numpy(new_ranks), counts, split, main)}
    if others:  # the reverse direction has no second stage (the reranker scores text queries)
        results.update(task.evaluate(split, queries.vectors, gallery.vectors, query_chunk=query_chunk,
                                     directions=others))
        protocol["single_stage_directions"] = others
    return Scored(results, protocol)
