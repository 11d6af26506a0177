"""Evaluation: retrieval metrics in bounded memory (library level: no engine, no I/O)."""

from xmr.evaluation.metrics import (
    Positives,
    order_keys,
    positive_ranks,
    rank_metrics,
    recall_at_k,
    retrieval_metrics,
    topk_bounded,
)

__all__ = [
    "Positives",
    "order_keys",
    "positive_ranks",
    "rank_metrics",
    "recall_at_k",
    "retrieval_metrics",
    "topk_bounded",
]
