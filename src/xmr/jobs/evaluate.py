"""The evaluation job behind `xmr evaluate`: load a checkpoint, read a split, score it under a task kind."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from xmr.data.formats import detect_format, load_dataset
from xmr.data.records import RetrievalSplit
from xmr.errors import DataError
from xmr.evaluation.evaluator import caption_split, embed_queries_and_gallery, protocol_record, write_report
from xmr.evaluation.metrics import topk_bounded
from xmr.evaluation.tasks import Task, build_task
from xmr.methods.loading import LoadedModel, load_checkpoint


@dataclass
class EvaluationResult:
    """Metrics by direction, the JSON report written, and the split's normalised features (for grids)."""

    results: dict[str, dict[str, float]]
    report_path: Path | None
    text_feats: torch.Tensor
    image_feats: torch.Tensor
    split: RetrievalSplit
    task: Task


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, *, data_format: str | None = None,
                        split: str = "test", i2t: bool = False, out: str | Path | None = None,
                        batch_size: int = 128, num_workers: int = 2, precision: str = "bf16",
                        device: str = "cpu", query_chunk: int = 1024, progress: bool = True,
                        model: LoadedModel | None = None, task: str = "person",
                        rerank_depth: int | None = None, refine_lambda: float | None = None,
                        refine_scope: str = "shortlist", refine_grid: str | None = None,
                        images_root: str | Path | None = None, captions_root: str | Path | None = None,
                        ) -> EvaluationResult:
    """Score a checkpoint on a data set split under a task kind; write the JSON report with its protocol.

    Reranking methods are scored through the same two stages as search, `rerank_depth` (K') recorded, with
    a stage-1 row (`<dir>_initial`) beside it; `refine_scope="full"` adds the exact second-stage ranking of
    the whole gallery (`<dir>_full`). Data whose labels are classes (CUB, Flowers) add Reed's class-level
    protocol (direction `class`). `refine_grid` ("k=10,50,100;lam=0.1,0.3,0.5") picks the refinement
    settings on the val split first (never on test) and records the grid in the report.
    """
    from xmr.evaluation.tuning import parse_grid, score_variants, tune_refinement
    from xmr.methods.base import Refinable

    model = model or load_checkpoint(checkpoint, device=device)
    data_format = data_format or detect_format(data_root)
    experiment = model.experiment()
    seed = experiment.train.seed if experiment else 0
    val_fraction = experiment.data.val_fraction if experiment else 0.1
    splits = load_dataset(data_format, data_root, seed=seed, val_fraction=val_fraction, images_root=images_root,
                          captions_root=captions_root)
    chosen = {"test": splits.test, "val": splits.val}.get(split)
    if chosen is None:
        raise DataError(f"{data_root}: split {split!r} is not available for format {data_format}")
    options = dict(splits.task_options) if task == splits.task else {}  # what the data asks for (CUB: Reed's)
    if task == "person":
        options["i2t"] = i2t
    task_kind = build_task(task, **options)
    method = model.method
    embed = partial(embed_queries_and_gallery, method, tokenize=model.tokenize, batch_size=batch_size,
                    num_workers=num_workers, device=torch.device(device), precision=precision, progress=progress)
    if refine_lambda is not None or rerank_depth is not None:
        if isinstance(method, Refinable):
            method.set_refinement(k=rerank_depth, lam=refine_lambda)
        elif refine_lambda is not None:
            raise DataError(f"--refine-lambda: method {method.name} has no refinement weight")
    grid = None
    if refine_grid:
        if splits.val is None:
            raise DataError(f"{data_root}: --refine-grid tunes on the val split, which format {data_format} "
                            "does not provide here")
        val_split = caption_split(splits.val, task)
        val_queries, val_gallery = embed(val_split)
        grid = tune_refinement(method, task_kind, val_split, val_queries, val_gallery, parse_grid(refine_grid),
                               query_chunk=query_chunk)
        rerank_depth = None  # the grid's choice is now the method's own
    eval_split = caption_split(chosen, task)
    queries, gallery = embed(eval_split)
    scored = score_variants(method, task_kind, eval_split, queries, gallery, depth=rerank_depth, scope=refine_scope,
                            query_chunk=query_chunk)
    if grid is not None:
        scored.protocol["refine_grid"] = grid.to_dict()
    if isinstance(method, Refinable):
        scored.protocol["refinement"] = method.refinement_settings()
    report = None
    if out is not None:
        protocol = protocol_record(dataset=data_format, root=str(data_root), split=split, checkpoint=str(checkpoint),
                                   config=model.config, seed=seed, directions=list(scored.results))
        protocol.update(precision=precision, method=model.method.name, **scored.protocol)
        report = write_report(out, scored.results, protocol)
    results = scored.results
    text_feats, image_feats = queries.vectors, gallery.vectors
    return EvaluationResult(results, report, text_feats, image_feats, chosen, task_kind)


def top_results_grid(evaluation: EvaluationResult, out_png: str | Path, *, num_queries: int = 4, k: int = 5,
                     seed: int = 0) -> Path:
    """PNG grid: a few test queries and their top-k gallery images, correct ones outlined in green."""
    from xmr.viz import result_grid

    split = evaluation.split
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(split.captions), generator=generator)[:num_queries].tolist()
    scores, indices = topk_bounded(evaluation.text_feats[picks], evaluation.image_feats, k)
    rows = [[split.image_paths[j] for j in row] for row in indices.tolist()]
    correct = [[split.image_pids[j] == split.caption_pids[q] for j in row] for q, row in zip(picks, indices.tolist())]
    return result_grid([split.captions[q] for q in picks], rows, correct, out_png, scores=scores.tolist())
