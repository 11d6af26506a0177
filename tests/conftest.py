"""Shared fixtures: a tiny synthetic CUHK-PEDES data set and a tiny experiment config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_pedes(tmp_path_factory) -> Path:
    from xmr.data.synthetic import generate_pedes_demo

    root = tmp_path_factory.mktemp("pedes")
    return generate_pedes_demo(root, num_ids=24, images_per_id=2, captions_per_image=2, image_size=(64, 32),
                               split_ids=(16, 4, 4), seed=0)


def tiny_overrides(data_root: Path, output_dir: Path, **extra: object) -> list[str]:
    """Overrides that turn any recipe into a seconds-long CPU run on the tiny data set."""
    values = {
        "model.clip": "tiny",
        "model.pretrained": None,
        "model.image_size": [64, 32],
        "method.cmt_depth": 1,
        "data.format": "cuhk_pedes",
        "data.root": str(data_root),
        "data.tokenizer": None,
        "data.tokenizer_merges": 150,
        "data.context_length": 32,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "optim.optimizer": "adamw",
        "optim.lr": 1e-3,
        "optim.eps": 1e-8,
        "optim.epochs": 2,
        "optim.warmup_epochs": 1,
        "train.output_dir": str(output_dir),
        "train.precision": "fp32",
        "train.max_steps_per_epoch": 3,
        "train.log_every": 1,
        "train.tensorboard": False,
        "train.progress": False,
        "eval.num_workers": 0,
        "eval.precision": "fp32",
    }
    values.update(extra)
    import yaml

    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in values.items()]


@pytest.fixture(scope="session")
def search_model(tiny_pedes, tmp_path_factory) -> Path:
    """A tiny model trained until it matches the tiny set's training captions to their images (~20 s).

    Search tests query it with training captions over the training images: that checks the whole
    embed -> index -> search path returns the right identity, not that the tiny model generalises.
    """
    from xmr.config import load_config
    from xmr.jobs.train import run_training

    run = tmp_path_factory.mktemp("search-model") / "run"
    cfg = load_config(REPO / "configs/demo.yaml", tiny_overrides(
        tiny_pedes, run, **{"optim.epochs": 25, "train.max_steps_per_epoch": None, "optim.lr": 1e-3,
                            "model.clip_overrides": {"vision.patch_size": 8}, "method.losses": ["itc"], "method.temperature": 0.05, "train.eval_every": 25,
                            "train.log_every": 50, "data.erase_p": 0.0}))
    run_training(cfg)
    return run / "last"


@pytest.fixture(scope="session")
def train_gallery(tiny_pedes, tmp_path_factory) -> tuple[Path, dict[str, int], list]:
    """The tiny set's training images in a folder, their identities, and the training captions."""
    import shutil

    from xmr.data.formats import load_dataset

    root = tmp_path_factory.mktemp("train-gallery")
    records = load_dataset("cuhk_pedes", tiny_pedes).train
    pid_of = {}
    for record in records:
        name = Path(record.image_path).name
        if name not in pid_of:
            shutil.copy(record.image_path, root / name)
            pid_of[name] = record.pid
    return root, pid_of, records


@pytest.fixture(scope="session")
def index_dir(search_model, train_gallery, tmp_path_factory) -> Path:
    from xmr.search.embed import embed_images
    from xmr.search.indexing import build_index

    root, _, _ = train_gallery
    work = tmp_path_factory.mktemp("index")
    embed_images(root, search_model, work / "emb", num_workers=0, progress=False)
    build_index([work / "emb"], work / "gallery.index")
    return work / "gallery.index"
