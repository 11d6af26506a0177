"""Second-stage variants of one evaluation, and the validation grid over a reranker's settings.

`score_variants` scores an embedded split the ways a user compares: stage 1 alone (`<dir>_initial`), the
two stages at K' (`<dir>`, what search returns) and, for a `FullScopeReranker`, the exact second-stage
score of every pair (`<dir>_full`, a single-stage search over transformed vectors) to measure what the
top-K' shortlist loses. `tune_refinement` searches a grid of (k, lambda) on a validation split only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from xmr.data.records import EvalSplit
from xmr.errors import ConfigError
from xmr.evaluation.scoring import Scored, score_split
from xmr.evaluation.shortlist import rerank_depth
from xmr.evaluation.tasks import Task
from xmr.methods.base import FullScopeReranker, Method, Refinable, Reranker
from xmr.outputs import Embedded

SCOPES = ("shortlist", "full")
GRID_KEYS = {"k": int, "lam": float}


def score_variants(method: Method, task: Task, split: EvalSplit, queries: Embedded, gallery: Embedded, *,
                   depth: int | None = None, scope: str = "shortlist", query_chunk: int = 1024) -> Scored:
    """Two-stage metrics plus, for reranking methods, the stage-1 row and (scope="full") the exact one."""
    if scope not in SCOPES:
        raise ConfigError(f"refine scope {scope!r}: use one of {', '.join(SCOPES)}")
    scored = score_split(method, task, split, queries, gallery, query_chunk=query_chunk, depth=depth)
    k = rerank_depth(method, depth)
    if not isinstance(method, Reranker) or k == 0:
        if scope == "full":
            raise ConfigError(f"--refine-scope full needs a reranking method with K' > 0 ({method.name}: K' = {k})")
        return scored
    main = task.directions[0]
    results = dict(scored.results)
    initial = score_split(method, task, split, queries, gallery, query_chunk=query_chunk, depth=0).results
    results[f"{main}_initial"] = initial[main]
    if scope == "full":
        if not isinstance(method, FullScopeReranker):
            raise ConfigError(f"{method.name}'s second stage cannot score the whole gallery exactly "
                              "(it is not a FullScopeReranker): use --refine-scope shortlist")
        with torch.inference_mode():
            q = Embedded(method.full_scope_vectors(queries.vectors))
            g = Embedded(method.full_scope_vectors(gallery.vectors))
        # inner products of the transformed vectors are the final scores: no re-normalisation
        full = task.evaluate(split, q.vectors, g.vectors, query_chunk=query_chunk, directions=[main],
                             normalize=False)
        results[f"{main}_full"] = full[main]
    protocol = {**scored.protocol, "refine_scope": scope, "rows": {
        main: f"two stages: top {k} of stage 1 re-scored", f"{main}_initial": "stage 1 only",
        **({f"{main}_full": "second-stage score of every gallery item (exact)"} if scope == "full" else {})}}
    return Scored(results, protocol)


def parse_grid(text: str) -> dict[str, list[Any]]:
    """'k=10,50,100;lam=0.1,0.3,0.5' -> {'k': [10, 50, 100], 'lam': [0.1, 0.3, 0.5]}."""
    grid: dict[str, list[Any]] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip()
        if not sep or key not in GRID_KEYS:
            raise ConfigError(f"refine grid {text!r}: each part is KEY=V1,V2,... with KEY one of "
                              f"{', '.join(GRID_KEYS)}; got {part!r}")
        try:
            grid[key] = [GRID_KEYS[key](v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"refine grid {text!r}: {key} values must be {GRID_KEYS[key].__name__}s") from None
        if not grid[key]:
            raise ConfigError(f"refine grid {text!r}: no values for {key}")
    if not grid:
        raise ConfigError(f"refine grid {text!r} is empty")
    return grid


@dataclass
class GridResult:
    """The validation grid: every (settings, metrics) row, the chosen settings and the metric used."""

    metric: str
    chosen: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"selected_on": "val", "metric": self.metric, "chosen": self.chosen, "rows": self.rows}


def tune_refinement(method: Method, task: Task, val_split: EvalSplit, queries: Embedded, gallery: Embedded,
                    grid: dict[str, list[Any]], *, metric: str | None = None, query_chunk: int = 1024) -> GridResult:
    """Score every grid point on the validation split; the best by `metric` (default: the task's primary;
    ties: the earlier grid point) is set on the method and returned. Never give it a test split."""
    if not isinstance(method, Refinable):
        raise ConfigError(f"{method.name} has no tunable second stage (--refine-grid needs e.g. MMRef)")
    main = task.directions[0]
    metric = metric or task.primary
    keys = list(grid)
    rows, best = [], None
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = dict(zip(keys, values))
        method.set_refinement(**settings)
        metrics = score_split(method, task, val_split, queries, gallery, query_chunk=query_chunk).results[main]
        rows.append({**settings, **metrics})
        if best is None or metrics[metric] > best[1]:
            best = (settings, metrics[metric])
    assert best is not None
    method.set_refinement(**best[0])
    return GridResult(metric, dict(best[0]), rows)
