"""The end-to-end demo behind `xmr demo`: synthetic data, a cached training run, evaluation, an index."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from xmr.config import ExperimentConfig, load_config
from xmr.evaluation.evaluator import format_table
from xmr.jobs.evaluate import evaluate_checkpoint, top_results_grid
from xmr.jobs.train import run_training

log = logging.getLogger(__name__)

# The embedded demo data set: enough identities that chance Rank-1 is ~1%, small enough for 2 CPU cores.
DEMO_DATA = {"num_ids": 500, "images_per_id": 4, "captions_per_image": 2, "image_size": (192, 64), "seed": 0}


DEMO_ROWS = {"t2i": "demo (t2i, test)", "t2i_initial": "demo, stage 1 only (t2i, test)"}
METHOD_DEMOS = {"irra": ("configs/demo.yaml", ".cache/demo")}  # others: configs/<name>/demo.yaml


def method_demo(name: str) -> tuple[Path, Path]:
    """(recipe, work dir) of a method's own cached demo: `xmr demo --method NAME`."""
    from xmr.registry import METHODS

    METHODS.get(name)  # an unknown name raises with the known ones
    config, work_dir = METHOD_DEMOS.get(name, (f"configs/{name}/demo.yaml", f".cache/demo-{name}"))
    if not Path(config).is_file():
        from xmr.errors import ConfigError

        raise ConfigError(f"method {name!r} has no demo recipe ({config} not found; run from the repository root)")
    return Path(config), Path(work_dir)


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
            "table": format_table({DEMO_ROWS.get(key, key): metrics for key, metrics in evaluation.results.items()},
                                  title="")}


def build_gallery_index(checkpoint: str | Path, images: str | Path, work_dir: str | Path, *,
                        kind: str = "flat", progress: bool = True) -> Path:
    """Embed a folder of images with `checkpoint` and index them (both steps reuse what is already done)."""
    from xmr.index import read_manifest
    from xmr.search.embed import embed_images, model_fingerprint
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
