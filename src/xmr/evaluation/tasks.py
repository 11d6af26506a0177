"""Task kinds (person, image-text, composed): protocols and metrics, all from "the rank of each positive".

Every task reduces to the 1-based rank of each correct gallery item ("positive") of each query, counted
by :func:`xmr.evaluation.metrics.positive_ranks` in bounded memory: never a queries x gallery matrix,
never a sort of a whole row. Tie rule (as ``metrics.py``): equal scores are ordered by gallery index,
lower first, i.e. a stable descending sort. Metrics are in %. Queries without any positive (e.g. hidden
test answers) are skipped and counted in ``num_queries_without_positive``; averages are over the rest.

For one query, ``r_1 < ... < r_m`` are the ranks of its ``m`` positives.

* ``person`` (text-based person search): R<k> = 1[r_1 <= k], AP = mean_j j / r_j, INP = m / r_m
  (:func:`~xmr.evaluation.metrics.rank_metrics`); t2i = captions query images, same identity label =
  correct; i2t = images query captions (labels swapped).
* ``image_text`` (Flickr30K / MSCOCO, 5 captions per image): t2i = a caption queries the images (its
  image is correct); i2t = an image queries the captions (its captions are correct), only r_1 (the best
  caption) counts. R<k> = % of queries with r_1 <= k (k = 1, 5, 10); medr = floor(median(r_1 - 1)) + 1
  and meanr = mean(r_1), the reference code's 0-based ranks plus one; rsum = the six recalls summed.
  ``folds=F`` (COCO 1K: F = 5 on the 5K test) cuts the images into F consecutive equal folds (images
  0..n/F-1, ...); a fold's captions (those of its images) query only its images and vice versa; every
  metric is averaged over the folds.
* ``composed`` (reference image + modifier text -> images): R@K = % of queries with r_1 <= K; Rs@K
  (CIRR Recall_subset) = the same with the ranking restricted to the query's candidate group (minus the
  reference), from the same scores and tie rule; mAP@K (CIRCO) = mean of AP@K = (1 / min(m, K)) *
  sum_{j : r_j <= K} j / r_j. Per-category results (FashionIQ) are averaged over the categories without
  weighting by their sizes.

Reference removal (CIRR): :func:`positive_ranks_excluding` removes gallery item ``exclude[q]`` from query
``q``'s ranking; each positive it preceded moves up one rank. Cost: the ranking plus the scores of each
query against its excluded item and its positives (``O(Q * P)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xmr.data.records import EvalSplit
from xmr.errors import ConfigError
from xmr.evaluation.metrics import Positives, positive_ranks, rank_metrics
from xmr.evaluation.ranks import (
    first_rank_metrics,
    invert_lists,
    map_from_ranks,
    person_from_ranks,
    positive_ranks_excluding,
    recall_from_ranks,
    subset_ranks,
    take_rows,
)

__all__ = [
    "TIE_RULE",
    "ComposedTask",
    "ImageTextTask",
    "PersonTask",
    "Task",
    "build_task",
    "map_from_ranks",
    "person_from_ranks",
    "positive_ranks_excluding",
    "recall_from_ranks",
    "subset_ranks",
]

TIE_RULE = ("equal scores are ordered by gallery index, lower first (a stable descending sort); "
            "ranks are 1-based")

Results = dict[str, dict[str, float]]


class Task:
    """A task kind: how queries and gallery pair up, which metrics, which one selects models.

    ``evaluate`` returns ``{direction: {metric: value}}``; ``metrics_from_ranks`` computes one
    direction's metrics from given ranks (e.g. re-ranked by a second stage).
    """

    name: str = ""
    primary: str = ""
    columns: tuple[str, ...] = ()
    directions: tuple[str, ...] = ()
    all_directions: tuple[str, ...] = ()

    def columns_of(self, direction: str) -> tuple[str, ...]:
        """The table columns of one direction's results (most tasks: `columns` for all)."""
        return self.columns

    def describe(self) -> dict[str, Any]:
        """The protocol for JSON reports: metric definitions, tie rule and task settings."""
        return {"task": self.name, "primary": self.primary, "directions": list(self.directions),
                "tie_rule": TIE_RULE, "metrics": self._definitions(), **self._settings()}

    def metrics_from_ranks(self, ranks: torch.Tensor, counts: torch.Tensor, split: EvalSplit,
                           direction: str, **extra: Any) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, split: EvalSplit, query_feats: Any, gallery_feats: Any, *, query_chunk: int = 1024,
                 directions: Sequence[str] | None = None, **rank_options: Any) -> Results:
        raise NotImplementedError

    def excluded(self, split: EvalSplit) -> list[int] | None:
        """Per query, the gallery index removed from its ranking (-1 none), or None: no removal."""
        return None

    def needs_subset_ranks(self) -> bool:
        """Whether `metrics_from_ranks` needs `subset_ranks` (ranks within each query's candidate group)."""
        return False

    def add_summary(self, results: Results) -> Results:
        """Metrics that combine directions (image_text: rsum); the identity by default."""
        return results

    def primary_value(self, results: Results) -> float:
        """The primary metric, from the first direction that reports it."""
        for metrics in results.values():
            if self.primary in metrics:
                return float(metrics[self.primary])
        raise KeyError(f"task {self.name!r}: no direction reports its primary metric {self.primary!r}")

    def _directions(self, directions: Sequence[str] | None) -> tuple[str, ...]:
        chosen = tuple(directions) if directions is not None else self.directions
        unknown = [d for d in chosen if d not in self.all_directions]
        if unknown or not chosen:
            raise ValueError(f"task {self.name!r}: directions {list(chosen)} not among "
                             f"{list(self.all_directions)}")
        return chosen

    def _definitions(self) -> dict[str, str]:
        return {}

    def _settings(self) -> dict[str, Any]:
        return {}


class PersonTask(Task):
    """Text-based person search: captions query images (t2i), optionally images query captions (i2t).

    Also fine-grained class retrieval (CUB, Flowers: labels are classes). ``class_level_at`` adds Reed et
    al.'s class-level protocol as the direction ``class`` (`xmr.evaluation.reed`): i2t top-1 accuracy
    against class text embeddings and t2i precision@``class_level_at`` (Reed's "AP@50"), computed from the
    same features; datasets whose labels are classes ask for it (``DatasetSplits.task_options``).
    """

    name, primary = "person", "R1"
    all_directions = ("t2i", "i2t", "class")

    def __init__(self, i2t: bool = False, ks: Sequence[int] = (1, 5, 10), class_level_at: int | None = None) -> None:
        if class_level_at is not None and (isinstance(class_level_at, bool) or int(class_level_at) < 1):
            raise ValueError(f"class_level_at must be a positive integer, got {class_level_at!r}")
        self.ks = tuple(int(k) for k in ks)
        self.class_level_at = None if class_level_at is None else int(class_level_at)
        self.directions = (("t2i", "i2t") if i2t else ("t2i",)) + (("class",) if self.class_level_at else ())
        self.columns = (*(f"R{k}" for k in self.ks), "mAP", "mINP")

    def columns_of(self, direction: str) -> tuple[str, ...]:
        if direction == "class":
            return ("i2t_top1", f"t2i_ap{self.class_level_at}")
        return self.columns

    def _positives(self, split: EvalSplit, direction: str) -> Positives:
        if split.query_labels is not None and split.gallery_labels is not None:
            if direction == "t2i":
                return Positives.from_labels(split.query_labels, split.gallery_labels)
            return Positives.from_labels(split.gallery_labels, split.query_labels)
        if direction == "t2i":  # no labels: the split's explicit positives
            return Positives.from_lists(split.positives, len(split.gallery_paths))
        return Positives.from_lists(invert_lists(split.positives, len(split.gallery_paths)), len(split))

    def metrics_from_ranks(self, ranks: torch.Tensor, counts: torch.Tensor, split: EvalSplit,
                           direction: str, **extra: Any) -> dict[str, float]:
        out = person_from_ranks(ranks, counts, self.ks)
        num_gallery = len(split.gallery_paths) if direction == "t2i" else len(split)
        out.update(num_queries=len(counts), num_gallery=num_gallery,
                   num_queries_without_positive=int((torch.as_tensor(counts) == 0).sum()))
        return out

    def evaluate(self, split: EvalSplit, query_feats: Any, gallery_feats: Any, *, query_chunk: int = 1024,
                 directions: Sequence[str] | None = None, **rank_options: Any) -> Results:
        """``query_feats``: text features of split.query_texts; ``gallery_feats``: image features."""
        results = {}
        for direction in self._directions(directions):
            if direction == "class":
                results[direction] = self._class_level(split, query_feats, gallery_feats)
                continue
            q, g = (query_feats, gallery_feats) if direction == "t2i" else (gallery_feats, query_feats)
            results[direction] = rank_metrics(q, g, self._positives(split, direction), ks=self.ks,
                                              query_chunk=query_chunk, **rank_options)
        return results

    def _class_level(self, split: EvalSplit, query_feats: Any, gallery_feats: Any) -> dict[str, float]:
        from xmr.evaluation.reed import reed_metrics

        if split.query_labels is None or split.gallery_labels is None:
            raise ValueError("the class-level protocol needs class labels on queries and gallery")
        return reed_metrics(query_feats, split.query_labels, gallery_feats, split.gallery_labels,
                            ap_at=self.class_level_at or 50)

    def _definitions(self) -> dict[str, str]:
        out = {f"R{k}": f"% of queries whose best positive ranks <= {k}" for k in self.ks}
        out.update(mAP="mean over queries of mean_j j / r_j", mINP="mean over queries of m / r_m")
        if self.class_level_at:
            at = self.class_level_at
            out.update({
                "class/i2t_top1": "Reed et al. (CVPR 2016): % of images whose highest-scoring class text embedding "
                                  "(mean of the class's L2-normalised caption features, normalised) is their class",
                f"class/t2i_ap{at}": f"Reed's 'AP@{at}': per class, the fraction of the top {at} images (ranked by "
                                     f"the class text embedding) of that class, i.e. precision@{at}, averaged over "
                                     "classes; the denominator is always the cut-off"})
        return out

    def _settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"positives": "same identity label (i2t: labels swapped)"}
        if self.class_level_at:
            out["class_level_at"] = self.class_level_at
        return out


class ImageTextTask(Task):
    """Bidirectional image-text retrieval (Flickr30K, MSCOCO): R@1/5/10 both ways, rsum, medr, meanr.

    ``folds``: None = the whole set (Flickr30K 1K, COCO 5K); F = F consecutive equal image folds, each
    with its images' captions, metrics averaged over folds (COCO 1K: ``folds=5`` on the 5K test).
    """

    name, primary = "image_text", "rsum"
    directions = all_directions = ("t2i", "i2t")

    def __init__(self, folds: int | None = None, ks: Sequence[int] = (1, 5, 10)) -> None:
        if folds is not None and int(folds) < 1:
            raise ConfigError(f"image_text: folds must be None or >= 1, got {folds}")
        self.folds = None if folds is None else int(folds)
        self.ks = tuple(int(k) for k in ks)
        self.columns = (*(f"R{k}" for k in self.ks), "medr", "meanr", "rsum")

    def _layout(self, split: EvalSplit) -> tuple[np.ndarray, int]:
        """(fold of each caption, -1 = it has no image; images per fold)."""
        n, folds = len(split.gallery_paths), self.folds or 1
        if n % folds:
            raise ValueError(f"image_text: {n} images do not split into {folds} equal folds")
        size = n // folds
        first = np.array([min(p) if len(p) else -1 for p in split.positives], dtype=np.int64)
        return np.where(first >= 0, first // max(size, 1), -1), size

    def ranks(self, split: EvalSplit, query_feats: Any, gallery_feats: Any, direction: str, *,
              query_chunk: int = 1024, **rank_options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks of ``direction`` ("t2i": per caption, "i2t": per image), within each query's fold."""
        n_img = len(split.gallery_paths)
        opts = dict(query_chunk=query_chunk, **rank_options)
        if self.folds is None:  # the whole set: no copies of the features
            if direction == "t2i":
                return positive_ranks(query_feats, gallery_feats, Positives.from_lists(split.positives, n_img),
                                      **opts)
            lists = invert_lists(split.positives, n_img)
            return positive_ranks(gallery_feats, query_feats, Positives.from_lists(lists, len(split)), **opts)
        cap_fold, size = self._layout(split)
        parts = []
        for f in range(self.folds):
            caps, lo = np.flatnonzero(cap_fold == f), f * size
            t2i = [[i - lo for i in split.positives[c] if lo <= i < lo + size] for c in caps]
            imgs, caps_feats = take_rows(gallery_feats, np.arange(lo, lo + size)), take_rows(query_feats, caps)
            if direction == "t2i":
                r, n = positive_ranks(caps_feats, imgs, Positives.from_lists(t2i, size), **opts)
                parts.append((caps, r, n))
            else:
                lists = Positives.from_lists(invert_lists(t2i, size), len(caps))
                r, n = positive_ranks(imgs, caps_feats, lists, **opts)
                parts.append((np.arange(lo, lo + size), r, n))
        rows_total = len(split) if direction == "t2i" else n_img
        ranks = torch.zeros(rows_total, max([r.shape[1] for _, r, _ in parts], default=0), dtype=torch.int64)
        counts = torch.zeros(rows_total, dtype=torch.int64)
        for rows, r, n in parts:
            ranks[torch.as_tensor(rows), : r.shape[1]] = r
            counts[torch.as_tensor(rows)] = n
        return ranks, counts

    def metrics_from_ranks(self, ranks: torch.Tensor, counts: torch.Tensor, split: EvalSplit,
                           direction: str, **extra: Any) -> dict[str, float]:
        """One direction's metrics; with folds, ``ranks`` are within each query's fold (as :meth:`ranks`).

        ``rsum`` needs both directions: see :meth:`add_summary`.
        """
        cap_fold, size = self._layout(split)
        fold_of = cap_fold if direction == "t2i" else np.arange(len(split.gallery_paths)) // max(size, 1)
        has = torch.as_tensor(fold_of >= 0) & (torch.as_tensor(counts) > 0)
        per_fold = []
        for f in range(self.folds or 1):
            sel = has & torch.as_tensor(fold_of == f)
            if not bool(sel.any()):
                raise ValueError(f"image_text {direction}: fold {f} has no query with a positive")
            per_fold.append(first_rank_metrics(torch.as_tensor(ranks)[sel, 0], self.ks))
        out = {key: float(np.mean([m[key] for m in per_fold])) for key in per_fold[0]}
        out.update(num_queries=len(fold_of), num_queries_without_positive=int((~has).sum()))
        return out

    def add_summary(self, results: Results) -> Results:
        """Add ``rsum`` (the six recalls summed) to the t2i metrics when both directions are present."""
        if "t2i" in results and "i2t" in results:
            results["t2i"]["rsum"] = sum(results[d][f"R{k}"] for d in ("t2i", "i2t") for k in self.ks)
        return results

    def evaluate(self, split: EvalSplit, query_feats: Any, gallery_feats: Any, *, query_chunk: int = 1024,
                 directions: Sequence[str] | None = None, **rank_options: Any) -> Results:
        """``query_feats``: caption features (split.query_texts); ``gallery_feats``: image features."""
        results = {}
        for direction in self._directions(directions):
            ranks, counts = self.ranks(split, query_feats, gallery_feats, direction, query_chunk=query_chunk,
                                       **rank_options)
            results[direction] = self.metrics_from_ranks(ranks, counts, split, direction)
        return self.add_summary(results)

    def _definitions(self) -> dict[str, str]:
        out = {f"R{k}": f"% of queries whose best positive ranks <= {k}" for k in self.ks}
        out.update(medr="floor(median(r_1 - 1)) + 1", meanr="mean(r_1)",
                   rsum="sum of the R@k of both directions (reported with t2i)")
        return out

    def _settings(self) -> dict[str, Any]:
        return {"folds": self.folds or 1,
                "fold_rule": "consecutive equal image folds, each with its images' captions; averaged"
                if self.folds else "whole set",
                "positives": "t2i: the caption's image; i2t: the image's captions (best one counts)"}


@dataclass(frozen=True)
class _Protocol:
    recall: tuple[int, ...]
    mean_ap: tuple[int, ...]
    subset: tuple[int, ...]
    primary: str
    remove_reference: bool | None  # None: remove split.exclude when the split gives one


_PROTOCOLS = {
    "generic": _Protocol((1, 5, 10, 50), (10,), (), "R@10", None),
    "fashioniq": _Protocol((10, 50), (), (), "avg", False),
    "cirr": _Protocol((1, 5, 10, 50), (), (1, 2, 3), "avg", True),
    "circo": _Protocol((), (5, 10, 25, 50), (), "mAP@10", False),
}


class ComposedTask(Task):
    """Composed image retrieval (reference image + modifier text -> images) under a benchmark protocol.

    * ``fashioniq``: R@10, R@50 = unweighted means over the categories (per category ``<cat>/R@K``);
      ``avg`` = (R@10 + R@50) / 2; reference kept in the gallery.
    * ``cirr``: R@1/5/10/50 with the reference removed (``split.exclude``), Rs@1/2/3 in
      ``split.groups`` minus the reference; ``avg`` = (R@5 + Rs@1) / 2.
    * ``circo``: mAP@5/10/25/50, reference kept.
    * ``generic``: R@1/5/10/50 and mAP@10; ``split.exclude`` removed when given.

    With ``split.categories`` every metric is also given per category (``<cat>/<metric>``) and, except for
    fashioniq whose headline numbers are these means, as ``category_mean/<metric>``.
    ``remove_reference`` overrides the protocol's choice (True needs ``split.exclude``).
    """

    name = "composed"
    directions = all_directions = ("composed",)

    def __init__(self, protocol: str = "generic", remove_reference: bool | None = None) -> None:
        if protocol not in _PROTOCOLS:
            raise ConfigError(f"composed: unknown protocol {protocol!r}; known: {', '.join(_PROTOCOLS)}")
        self.protocol, self.spec = protocol, _PROTOCOLS[protocol]
        self.remove_reference = self.spec.remove_reference if remove_reference is None else remove_reference
        self.primary = self.spec.primary
        keys = self._keys()
        self.columns = (*keys, "avg") if self.primary == "avg" else keys

    def _keys(self) -> tuple[str, ...]:
        return (*(f"R@{k}" for k in self.spec.recall), *(f"Rs@{k}" for k in self.spec.subset),
                *(f"mAP@{k}" for k in self.spec.mean_ap))

    def excluded(self, split: EvalSplit) -> list[int] | None:
        if self.remove_reference and split.exclude is None:
            raise ValueError(f"composed/{self.protocol}: the reference must be removed but split.exclude "
                             "is missing")
        return split.exclude if self.remove_reference is not False else None

    def _block(self, ranks: torch.Tensor, counts: torch.Tensor, subset: torch.Tensor | None,
               sel: torch.Tensor) -> dict[str, float]:
        ranks, counts = torch.as_tensor(ranks)[sel], torch.as_tensor(counts)[sel]
        out = {f"R@{k}": v for k, v in recall_from_ranks(ranks, counts, self.spec.recall).items()}
        if self.spec.subset:
            sub = torch.as_tensor(subset)[sel]
            out.update({f"Rs@{k}": 100.0 * float(((sub >= 1) & (sub <= k)).double().mean())
                        for k in self.spec.subset})
        out.update({f"mAP@{k}": v for k, v in map_from_ranks(ranks, counts, self.spec.mean_ap).items()})
        if self.primary == "avg":
            out["avg"] = (out["R@10"] + out["R@50"]) / 2 if self.protocol == "fashioniq" else \
                (out["R@5"] + out["Rs@1"]) / 2
        return out

    def needs_subset_ranks(self) -> bool:
        return bool(self.spec.subset)

    def metrics_from_ranks(self, ranks: torch.Tensor, counts: torch.Tensor, split: EvalSplit,
                           direction: str = "composed", *, subset_ranks: torch.Tensor | None = None,
                           **extra: Any) -> dict[str, float]:
        """Metrics of given ranks (reference already removed where the protocol removes it).

        ``subset_ranks`` (Q,): each query's best positive rank in its group (:func:`subset_ranks`),
        needed by the cirr protocol.
        """
        if self.spec.subset and subset_ranks is None:
            raise ValueError(f"composed/{self.protocol}: Rs@K needs subset_ranks (see subset_ranks())")
        has = torch.as_tensor(counts) > 0
        if not bool(has.any()):
            raise ValueError(f"composed/{self.protocol}: no query has a positive (hidden test answers?)")
        pooled = self._block(ranks, counts, subset_ranks, has)
        out: dict[str, float] = {}
        if split.categories is None:
            out.update(pooled)
        else:
            labels = np.asarray(split.categories, dtype=object)
            blocks = {}
            for cat in sorted(set(split.categories)):  # categories without evaluated queries are left out
                sel = has & torch.as_tensor(labels == cat)
                if bool(sel.any()):
                    blocks[cat] = self._block(ranks, counts, subset_ranks, sel)
                    out.update({f"{cat}/{k}": v for k, v in blocks[cat].items()})
                    out[f"{cat}/num_queries"] = int(sel.sum())
            mean = {k: float(np.mean([b[k] for b in blocks.values()])) for k in pooled}  # unweighted
            out.update(mean if self.protocol == "fashioniq" else pooled)
            if self.protocol != "fashioniq":
                out.update({f"category_mean/{k}": v for k, v in mean.items()})
        out.update(num_queries=len(has), num_gallery=len(split.gallery_paths),
                   num_queries_without_positive=int((~has).sum()))
        return out

    def evaluate(self, split: EvalSplit, query_feats: Any, gallery_feats: Any, *, query_chunk: int = 1024,
                 directions: Sequence[str] | None = None, **rank_options: Any) -> Results:
        """``query_feats``: composed-query features (one per split query); ``gallery_feats``: images."""
        direction = self._directions(directions)[0]
        exclude = self.excluded(split)
        positives = Positives.from_lists(split.positives, len(split.gallery_paths))
        ranks, counts = positive_ranks_excluding(query_feats, gallery_feats, positives, exclude,
                                                 query_chunk=query_chunk, **rank_options)
        subset = None
        if self.spec.subset:
            if split.groups is None:
                raise ValueError(f"composed/{self.protocol}: Rs@K needs split.groups (candidate subsets)")
            subset = subset_ranks(query_feats, gallery_feats, split.groups, split.positives, split.exclude,
                                  query_chunk=query_chunk, **rank_options)
        return {direction: self.metrics_from_ranks(ranks, counts, split, direction, subset_ranks=subset)}

    def _definitions(self) -> dict[str, str]:
        out = {f"R@{k}": f"% of queries with a positive in the top {k}" for k in self.spec.recall}
        out.update({f"Rs@{k}": f"R@{k} ranking only the query's group minus its reference"
                    for k in self.spec.subset})
        out.update({f"mAP@{k}": f"mean of (1/min(m, {k})) * sum over positives j with r_j <= {k} of j / r_j"
                    for k in self.spec.mean_ap})
        if self.protocol == "fashioniq":
            out["avg"] = "(R@10 + R@50) / 2, R@K averaged over categories without weighting"
        elif self.protocol == "cirr":
            out["avg"] = "(R@5 + Rs@1) / 2"
        return out

    def _settings(self) -> dict[str, Any]:
        removal = {True: "removed (split.exclude)", False: "kept", None: "removed where split.exclude gives one"}
        return {"protocol": self.protocol, "reference": removal[self.remove_reference],
                "subset": "split.groups minus the reference" if self.spec.subset else None,
                "categories": "per category and unweighted mean over categories",
                "queries_without_positive": "skipped and counted"}


def build_task(name: str | Task, **options: Any) -> Task:
    """A task from the registry (``person``, ``image_text``, ``composed``) with its options.

    Unknown names or options raise ConfigError; a Task instance is returned as is.
    """
    if isinstance(name, Task):
        if options:
            raise ConfigError(f"task options {sorted(options)} given with a ready task {name.name!r}")
        return name
    from xmr.registry import TASKS

    cls = TASKS.get(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise ConfigError(f"task {name!r}: {err}") from None
    return cls(**options)
