"""Whole jobs behind the CLI: evaluate a checkpoint, and the end-to-end demo."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xmr.config import ExperimentConfig, load_config
from xmr.data.formats import detect_format, load_dataset
from xmr.data.records import RetrievalSplit
from xmr.data.transforms import build_transform
from xmr.errors import DataError
from xmr.evaluation.evaluator import (
    embed_split,
    format_table,
    protocol_record,
    write_report,
)
from xmr.evaluation.metrics import retrieval_metrics, topk_bounded
from xmr.jobs.train import LoadedModel, load_checkpoint, run_training

log = logging.getLogger(__name__)

# The embedded demo data set: enough identities that chance Rank-1 is ~1%, small enough for 2 CPU cores.
DEMO_DATA = {"num_ids": 500, "images_per_id": 4, "captions_per_image": 2, "image_size": (192, 64), "seed": 0}


@dataclass
class EvaluationResult:
    results: dict[str, dict[str, float]]
    report_path: Path | None
    text_feats: torch.Tensor
    image_feats: torch.Tensor
    split: RetrievalSplit


def evaluate_checkpoint(checkpoint: str | Path, data_root: str | Path, *, data_format: str | None = None,
                        split: str = "test", i2t: bool = False, out: str | Path | None = None,
                        batch_size: int = 128, num_workers: int = 2, precision: str = "bf16",
                        device: str = "cpu", query_chunk: int = 1024, progress: bool = True,
                        model: LoadedModel | None = None) -> EvaluationResult:
    """Score a checkpoint on a data set split; write the JSON report with its protocol."""
    model = model or load_checkpoint(checkpoint, device=device)
    data_format = data_format or detect_format(data_root)
    experiment = model.experiment()
    seed = experiment.train.seed if experiment else 0
    val_fraction = experiment.data.val_fraction if experiment else 0.1
    splits = load_dataset(data_format, data_root, seed=seed, val_fraction=val_fraction)
    chosen = {"test": splits.test, "val": splits.val}.get(split)
    if chosen is None:
        raise DataError(f"{data_root}: split {split!r} is not available for format {data_format}")
    transform = build_transform(False, model.image_size)
    text_feats, image_feats = embed_split(model.method, chosen, model.tokenize, transform, batch_size=batch_size,
                                          num_workers=num_workers, device=torch.device(device),
                                          precision=precision, progress=progress)
    qp, gp = torch.as_tensor(chosen.caption_pids), torch.as_tensor(chosen.image_pids)
    results = {"t2i": retrieval_metrics(text_feats, image_feats, qp, gp, query_chunk=query_chunk)}
    if i2t:
        results["i2t"] = retrieval_metrics(image_feats, text_feats, gp, qp, query_chunk=query_chunk)
    report = None
    if out is not None:
        protocol = protocol_record(dataset=data_format, root=str(data_root), split=split, checkpoint=str(checkpoint),
                                   config=model.config, seed=seed, directions=list(results))
        protocol["precision"] = precision
        report = write_report(out, results, protocol)
    return EvaluationResult(results, report, text_feats, image_feats, chosen)


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


def _cache_key(cfg: ExperimentConfig, data_manifest: Path) -> str:
    payload = cfg.to_dict()
    payload["train"] = {k: v for k, v in payload["train"].items() if k not in ("output_dir", "progress")}
    payload["data"] = {k: v for k, v in payload["data"].items() if k not in ("root", "num_workers")}
    blob = json.dumps(payload, sort_keys=True) + data_manifest.read_text()
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _finished(run_dir: Path, epochs: int) -> bool:
    config = run_dir / "last" / "config.yaml"
    if not config.is_file():
        return False
    import yaml

    return int((yaml.safe_load(config.read_text()) or {}).get("epochs_done", 0)) >= epochs


def run_demo(config_path: str | Path, work_dir: str | Path = ".cache/demo", overrides: tuple[str, ...] = (),
             retrain: bool = False, progress: bool = True) -> dict[str, Any]:
    """Generate the demo data, train (or reuse the cached model), evaluate on test, draw the top-5 grid."""
    from xmr.data.synthetic import generate_pedes_demo

    work_dir = Path(work_dir)
    data_root = generate_pedes_demo(work_dir / "data", **DEMO_DATA)
    cfg = load_config(config_path, list(overrides) + [f"data.root={data_root}", "data.format=cuhk_pedes"])
    run_dir = work_dir / f"run-{_cache_key(cfg, data_root / 'demo_manifest.json')}"
    cfg.train.output_dir = str(run_dir)
    cfg.train.progress = progress
    if retrain or not _finished(run_dir, cfg.optim.epochs):
        log.info("training the demo model into %s", run_dir)
        run_training(cfg, resume=None if retrain else "auto")
    else:
        log.info("reusing the cached demo model in %s (pass --retrain to train again)", run_dir)
    checkpoint = run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "last"
    evaluation = evaluate_checkpoint(checkpoint, data_root, data_format="cuhk_pedes", split="test",
                                     out=run_dir / "test_metrics.json", num_workers=cfg.eval.num_workers,
                                     precision=cfg.eval.precision, progress=progress)
    grid = top_results_grid(evaluation, run_dir / "top5_grid.png")
    split = evaluation.split
    chance_r1 = 100.0 * sum(split.image_pids.count(p) for p in split.caption_pids) / (
        len(split.caption_pids) * len(split.image_pids))
    index_dir = build_gallery_index(checkpoint, data_root / "imgs", run_dir, progress=progress)
    return {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "results": evaluation.results,
            "report": str(evaluation.report_path), "grid": str(grid), "chance_R1": chance_r1,
            "index": str(index_dir),
            "table": format_table({"demo (t2i, test)": evaluation.results["t2i"]}, title="")}


def build_gallery_index(checkpoint: str | Path, images: str | Path, work_dir: str | Path, *,
                        kind: str = "flat", progress: bool = True) -> Path:
    """Embed a folder of images with `checkpoint` and index them (both steps reuse what is already done)."""
    from xmr.search.embed import embed_images, model_fingerprint
    from xmr.index import read_manifest
    from xmr.search.indexing import add_to_index, build_index

    work_dir = Path(work_dir)
    model_id = model_fingerprint(checkpoint)
    embeddings, index_dir = work_dir / f"gallery-{model_id}.emb", work_dir / f"gallery-{model_id}.index"
    embed_images(images, checkpoint, embeddings, progress=progress, num_workers=1)
    if (index_dir / "CURRENT").is_file() and read_manifest(index_dir).model_id == model_id:
        add_to_index(index_dir, [embeddings])
    else:
        build_index([embeddings], index_dir, kind=kind)
    return index_dir
