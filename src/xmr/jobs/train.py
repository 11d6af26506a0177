"""Training job: wiring from an ExperimentConfig to data, tokenizer, method and trainer.

This is the application layer used by the CLI (and usable from Python): it composes the library
pieces and never contains model or loss code itself, and knows no paper: the method named by the
config's `method:` section builds itself (`Method.build`) and prepares its own batch fields
(`Method.item_fn`). Loading a checkpoint for inference lives in `xmr.methods.loading`.
"""

from __future__ import annotations

import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch

from xmr import __version__
from xmr.config import ExperimentConfig, save_config
from xmr.data.datasets import ImageTextDataset, build_loader
from xmr.data.formats import load_dataset
from xmr.data.records import DatasetSplits
from xmr.data.samplers import IdentitySampler
from xmr.data.transforms import build_transform
from xmr.engine.distributed import DistInfo, init_distributed, resolve_device, shutdown
from xmr.engine.trainer import Trainer, TrainResult
from xmr.errors import CheckpointError, ConfigError
from xmr.evaluation.evaluator import evaluate_split, flat_metrics
from xmr.evaluation.tasks import build_task
from xmr.methods import build_method
from xmr.methods.base import BuildContext, InitialisesFromData, Method
from xmr.methods.loading import TOKENIZER_FILE
from xmr.text.bpe_train import train_bpe
from xmr.text.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)


def prepare_tokenizer(source: str | None, captions: list[str], merges: int) -> ClipTokenizer:
    """A CLIP BPE file, a Hugging Face tokenizer directory, or (None) BPE learnt on `captions`."""
    if source is None:
        return ClipTokenizer.from_merges(train_bpe(captions, merges))
    path = Path(source)
    if path.is_dir():
        return ClipTokenizer.from_hf_dir(path)
    return ClipTokenizer.from_bpe_file(path)


def tokenizer_bytes(tokenizer: ClipTokenizer) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TOKENIZER_FILE
        tokenizer.save(path)
        return path.read_bytes()


def tokenize_fn(tokenizer: ClipTokenizer, context_length: int):
    return partial(_tokenize, tokenizer, context_length)


def _tokenize(tokenizer: ClipTokenizer, context_length: int, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, context_length=context_length)


def build_context(cfg: ExperimentConfig, splits: DatasetSplits, tokenizer: ClipTokenizer) -> BuildContext:
    return BuildContext(backbone=cfg.model, num_classes=splits.num_train_ids, vocab_size=tokenizer.vocab_size,
                        eot_id=tokenizer.eot_id, mask_id=tokenizer.mask_id,
                        special_ids=tuple(tokenizer.special_ids), context_length=cfg.data.context_length)


def build_train_loader(cfg: ExperimentConfig, splits: DatasetSplits, tokenizer: ClipTokenizer,
                       dist_info: DistInfo, method: Method):
    """Returns (epoch -> iterable of batches, optimizer steps per epoch)."""
    transform = build_transform(cfg.data.augment, tuple(cfg.model.image_size), flip_p=cfg.data.flip_p,
                                pad=cfg.data.pad, erase_p=cfg.data.erase_p)
    dataset = ImageTextDataset(splits.train, transform, tokenize_fn(tokenizer, cfg.data.context_length),
                               item_fn=method.item_fn(tokenizer))
    per_rank = cfg.data.batch_size // dist_info.world_size
    if per_rank < 1 or cfg.data.batch_size % dist_info.world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the "
                          f"{dist_info.world_size} processes")
    if cfg.data.sampler == "identity":
        sampler = IdentitySampler([r.pid for r in splits.train], per_rank, cfg.data.num_instances,
                                  seed=cfg.train.seed, rank=dist_info.rank, world_size=dist_info.world_size)
    elif dist_info.enabled:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist_info.world_size,
                                                      rank=dist_info.rank, shuffle=True, seed=cfg.train.seed,
                                                      drop_last=True)
    else:
        sampler = None

    def epoch_batches(epoch: int):
        if sampler is not None:  # both samplers derive their order from (seed, epoch)
            sampler.set_epoch(epoch)
        return build_loader(dataset, per_rank, shuffle=sampler is None, sampler=sampler,
                            num_workers=cfg.data.num_workers, drop_last=True,
                            seed=cfg.train.seed * 100_003 + epoch)

    steps = len(epoch_batches(0)) // cfg.train.grad_accum
    if steps == 0:
        raise ConfigError(f"{len(dataset)} training pairs give no full batch of {cfg.data.batch_size} "
                          f"x grad_accum {cfg.train.grad_accum}; lower data.batch_size")
    return epoch_batches, steps


def load_splits(cfg: ExperimentConfig) -> DatasetSplits:
    return load_dataset(cfg.data.format, cfg.data.root, val_fraction=cfg.data.val_fraction, seed=cfg.train.seed,
                        on_error=cfg.data.on_error, check_images=cfg.data.check_images,
                        images_root=cfg.data.images_root, captions_root=cfg.data.captions_root)


def run_training(cfg: ExperimentConfig, resume: str | None = None) -> TrainResult:
    """Train a method as `cfg` says; `resume` is a `last/` checkpoint dir or 'auto' (the run's own)."""
    dist_info = init_distributed("cuda" if cfg.train.device.startswith("cuda") else "cpu")
    try:
        device = resolve_device(cfg.train.device, dist_info)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        splits = load_splits(cfg)
        for note in splits.notes:
            log.info("%s: %s", splits.name, note)
        if cfg.train.select_metric is None:  # model selection on the task's primary metric (person: R1)
            cfg.train.select_metric = build_task(splits.task, **splits.task_options).primary
        tokenizer = prepare_tokenizer(cfg.data.tokenizer, [r.caption for r in splits.train], cfg.data.tokenizer_merges)
        method = build_method(cfg.method, build_context(cfg, splits, tokenizer))
        epoch_batches, steps = build_train_loader(cfg, splits, tokenizer, dist_info, method)
        output = Path(cfg.train.output_dir)
        target = None
        if resume:
            target = output / "last" if resume == "auto" else Path(resume)
            if not target.exists():
                if resume != "auto":
                    raise CheckpointError(f"--resume {resume}: no such checkpoint directory")
                target = None
        if target is None and isinstance(method, InitialisesFromData):
            # one pass over the first epoch's batches, before the trainer moves the model or DDP
            # broadcasts rank 0's parameters
            method.initialise_from_data(epoch_batches(0))
        evaluate = None
        if splits.val is not None and len(splits.val.captions):
            evaluate = _validation_callback(cfg, splits, tokenizer, device)
        else:
            log.warning("no validation split: the best checkpoint cannot be selected; `last/` is the result")
        trainer = Trainer(method, epoch_batches, steps, cfg.optim, cfg.train, device=device, dist_info=dist_info,
                          evaluate=evaluate, checkpoint_config=checkpoint_config(cfg, method, splits),
                          checkpoint_files={TOKENIZER_FILE: tokenizer_bytes(tokenizer)},
                          samples_per_step=cfg.data.batch_size)
        if dist_info.is_main:
            output.mkdir(parents=True, exist_ok=True)
            save_config(cfg, output / "config.yaml")
        if target is not None:
            trainer.resume(target)
        return trainer.fit()
    finally:
        shutdown(dist_info)


def _validation_callback(cfg: ExperimentConfig, splits: DatasetSplits, tokenizer: ClipTokenizer,
                         device: torch.device):
    tokenize = tokenize_fn(tokenizer, cfg.data.context_length)

    def evaluate(method: Method) -> dict[str, float]:
        results = evaluate_split(method, splits.val, tokenize, task=build_task(splits.task, **splits.task_options),
                                 batch_size=cfg.eval.batch_size,
                                 num_workers=cfg.eval.num_workers, device=device, precision=cfg.eval.precision,
                                 query_chunk=cfg.eval.query_chunk)
        return flat_metrics(results)

    return evaluate


def checkpoint_config(cfg: ExperimentConfig, method: Method, splits: DatasetSplits) -> dict[str, Any]:
    return {
        "xmr_version": __version__,
        "model": method.export_config(),
        "tokenizer": TOKENIZER_FILE,
        "context_length": cfg.data.context_length,
        "image_size": list(cfg.model.image_size),
        "experiment": cfg.to_dict(),
        "train_data": {"format": splits.name, "root": splits.root, "num_train_ids": splits.num_train_ids,
                       "num_train_pairs": len(splits.train)},
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
