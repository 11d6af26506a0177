"""The training loop. It knows nothing about a specific paper: it drives any `Method`.

Responsibilities: optimiser (the method's `param_rules`) and schedule, autocast, gradient accumulation,
DDP, per-epoch atomic checkpoints (`last/`) and the best one by a validation metric (`best/`), exact
resume, TensorBoard scalars, a JSONL log and progress bars. A method that implements `TrainHooks` gets
`on_epoch_start(epoch)` before each epoch and `after_step(step)` after each optimiser step (e.g. an EMA
teacher update), and its `hook_state_dict()` is saved in `last/`'s trainer state and restored on resume.

Reproducibility: every epoch starts from RNG states derived from (seed, epoch) and the data order is
derived from the same pair, so resuming from the checkpoint of epoch e replays epochs e+1.. exactly
as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xmr.config import OptimConfig, TrainConfig
from xmr.engine.distributed import DistInfo, all_reduce_mean, barrier
from xmr.engine.optim import build_optimizer, lr_factor, set_lr
from xmr.errors import CheckpointError
from xmr.methods.base import Method, TrainHooks
from xmr.models.checkpoints import load_model_dir, save_model_dir
from xmr.precision import precision_dtype

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


@dataclass
class TrainResult:
    epochs_done: int
    best_metric: float | None
    best_epoch: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    output_dir: str = ""


class Trainer:
    """Trains `model` (a Method) with data from `epoch_batches(epoch)` (dicts of tensors).

    checkpoint_config / checkpoint_files describe the run in every saved checkpoint (the method's
    exported config, the tokenizer file...), so `best/` and `last/` are self-contained.
    `evaluate(model)` returns validation metrics; it runs on the main process only.
    """

    def __init__(
        self,
        model: Method,
        epoch_batches: Callable[[int], Iterable[dict[str, torch.Tensor]]],
        steps_per_epoch: int,
        optim_cfg: OptimConfig,
        train_cfg: TrainConfig,
        *,
        device: torch.device,
        dist_info: DistInfo | None = None,
        evaluate: Callable[[Method], dict[str, float]] | None = None,
        checkpoint_config: dict[str, Any] | None = None,
        checkpoint_files: dict[str, bytes] | None = None,
        samples_per_step: int = 1,
    ) -> None:
        self.module = model.to(device)
        self.device, self.dist = device, dist_info or DistInfo()
        self.optim_cfg, self.cfg = optim_cfg, train_cfg
        self.epoch_batches, self.evaluate_fn = epoch_batches, evaluate
        self.steps_per_epoch = steps_per_epoch
        if train_cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(steps_per_epoch, train_cfg.max_steps_per_epoch)
        self.samples_per_step = samples_per_step
        self.checkpoint_config = checkpoint_config or {}
        self.checkpoint_files = checkpoint_files or {}
        self.output_dir = Path(train_cfg.output_dir)
        self.hooks = model if isinstance(model, TrainHooks) else None
        self.optimizer = build_optimizer(self.module, optim_cfg, model.param_rules())
        self.scaler = torch.amp.GradScaler(device.type, enabled=train_cfg.precision == "fp16")
        self.model = self._wrap_ddp(self.module)
        self.start_epoch, self.global_step = 0, 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self._writer = None

    def _wrap_ddp(self, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids,
                                       find_unused_parameters=self.cfg.find_unused_parameters)

    # -- checkpoints -----------------------------------------------------------------------------
    def _trainer_state(self, epochs_done: int) -> bytes:
        state = {
            "epochs_done": epochs_done,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": json.dumps(self.history),
        }
        if self.hooks is not None:
            state["hooks"] = self.hooks.hook_state_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        return buffer.getvalue()

    def save(self, tag: str, epochs_done: int, with_state: bool) -> Path:
        files = dict(self.checkpoint_files)
        if with_state:
            files[STATE_FILE] = self._trainer_state(epochs_done)
        config = {**self.checkpoint_config, "epochs_done": epochs_done, "global_step": self.global_step}
        path = self.output_dir / tag
        save_model_dir(path, config, self.module.state_dict(), extra_files=files)
        return path

    def resume(self, directory: str | Path) -> None:
        """Load weights, optimiser and loop state from a `last/` checkpoint written by `save`."""
        directory = Path(directory)
        state_path = directory / STATE_FILE
        if not state_path.is_file():
            raise CheckpointError(f"cannot resume from {directory}: no {STATE_FILE} (only `last/` checkpoints "
                                  "carry the optimiser state)")
        _, weights = load_model_dir(directory)
        missing, unexpected = self.module.load_state_dict(weights, strict=False)
        if missing or unexpected:
            first = (missing or unexpected)[0]
            raise CheckpointError(f"{directory}: checkpoint does not fit this model (first mismatching key: {first})")
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - report any corruption the same way
            raise CheckpointError(f"{state_path}: unreadable trainer state ({err})") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch = int(state["epochs_done"])
        self.global_step = int(state["global_step"])
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.history = json.loads(state["history"])
        if self.hooks is not None:
            if "hooks" not in state:
                raise CheckpointError(f"{state_path}: no training-hook state for {type(self.module).__name__}; "
                                      "it was written by another method")
            self.hooks.load_hook_state_dict(state["hooks"])
        log.info("resumed from %s at epoch %d (step %d)", directory, self.start_epoch, self.global_step)

    # -- logging ---------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        self.history.append(record)
        with open(self.output_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            prefix = "val" if record.get("kind") == "eval" else "train"
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                    self._writer.add_scalar(f"{prefix}/{key}", value, record.get("step", self.global_step))

    def _open_writer(self) -> None:
        if self.cfg.tensorboard and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is a dependency, but keep training without it
                log.warning("tensorboard is not installed; no TensorBoard logs")
                return
            self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._open_writer()
        try:
            for epoch in range(self.start_epoch, self.optim_cfg.epochs):
                self._train_epoch(epoch)
                self._end_epoch(epoch)
        finally:
            if self._writer is not None:
                self._writer.close()
        return TrainResult(self.optim_cfg.epochs, self.best_metric, self.best_epoch, self.history,
                           str(self.output_dir))

    def _end_epoch(self, epoch: int) -> None:
        epochs_done = epoch + 1
        evaluate_now = self.evaluate_fn is not None and (
            epochs_done % self.cfg.eval_every == 0 or epochs_done == self.optim_cfg.epochs)
        if self.dist.is_main:
            if evaluate_now:
                self.module.eval()
                metrics = self.evaluate_fn(self.module)
                self.module.train()
                self._log({"kind": "eval", "epoch": epochs_done, "step": self.global_step, **metrics})
                score = metrics.get(self.cfg.select_metric)
                if score is not None and (self.best_metric is None or score > self.best_metric):
                    self.best_metric, self.best_epoch = float(score), epochs_done
                    self.save("best", epochs_done, with_state=False)
                    log.info("epoch %d: new best %s = %.2f", epochs_done, self.cfg.select_metric, score)
            self.save("last", epochs_done, with_state=True)
        barrier(self.dist)

    def _train_epoch(self, epoch: int) -> None:
        seed_everything(epoch_seed(self.cfg.seed, epoch))
        self.model.train()
        if self.hooks is not None:
            self.hooks.on_epoch_start(epoch)
        accum = self.cfg.grad_accum
        micro_steps = self.steps_per_epoch * accum
        dtype = precision_dtype(self.cfg.precision)
        progress = self._progress(epoch, micro_steps)
        window_start, window_samples = time.perf_counter(), 0
        for micro, batch in enumerate(self.epoch_batches(epoch)):
            if micro >= micro_steps:
                break
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            step_now = (micro + 1) % accum == 0
            if not self.optim_cfg.step_schedule_per_iteration:
                set_lr(self.optimizer, lr_factor(epoch, self.optim_cfg))
            else:
                set_lr(self.optimizer, lr_factor(epoch + micro / micro_steps, self.optim_cfg))
            out = self._forward_backward(batch, dtype, sync=step_now)
            window_samples += len(next(iter(batch.values()))) * self.dist.world_size
            if step_now:
                self._optimizer_step()
            progress.update(1)
            if step_now and (self.global_step % self.cfg.log_every == 0 or micro + 1 == micro_steps):
                speed = window_samples / max(time.perf_counter() - window_start, 1e-9)
                record = self._train_record(epoch, out, speed)
                progress.set_postfix(loss=f"{record['loss']:.3f}", samples_s=f"{speed:.1f}")
                self._log(record)
                window_start, window_samples = time.perf_counter(), 0
        progress.close()

    def _forward_backward(self, batch: dict[str, torch.Tensor], dtype: torch.dtype | None, sync: bool):
        context = self.model.no_sync() if (self.dist.enabled and not sync) else contextlib.nullcontext()
        with context:
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = self.model(batch)
            if not torch.isfinite(out.total):
                raise FloatingPointError(f"loss is {out.total.item()} at step {self.global_step}; "
                                         "lower the learning rate or use precision=fp32")
            self.scaler.scale(out.total / self.cfg.grad_accum).backward()
        return out

    def _optimizer_step(self) -> None:
        if self.optim_cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.optim_cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        if self.hooks is not None:
            self.hooks.after_step(self.global_step)

    def _train_record(self, epoch: int, out, speed: float) -> dict[str, Any]:
        record: dict[str, Any] = {"kind": "train", "epoch": epoch + 1, "step": self.global_step,
                                  "loss": all_reduce_mean(out.total.detach().float(), self.dist).item()}
        for name, value in out.parts.items():
            record[name] = all_reduce_mean(value.detach().float(), self.dist).item()
        record.update(out.metrics)
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["samples_per_s"] = speed
        return record

    def _progress(self, epoch: int, total: int):
        from tqdm.auto import tqdm

        disable = not (self.cfg.progress and self.dist.is_main)
        return tqdm(total=total, desc=f"epoch {epoch + 1}/{self.optim_cfg.epochs}", disable=disable,
                    leave=False, dynamic_ncols=True)

