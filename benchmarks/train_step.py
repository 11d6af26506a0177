"""Training-step throughput of the IRRA objective (sdm + id + mlm): samples/s, fp32 vs bf16 autocast.

Prints JSON. Each case runs in this process on the same synthetic batch; the fp32 run of each model
is the reference the bf16 figure is compared against (ratio), because absolute numbers on shared
machines are noisy. Usage: python benchmarks/train_step.py [--models demo ViT-B/16] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from xmr.config import OptimConfig, load_config
from xmr.engine.optim import build_optimizer
from xmr.engine.trainer import autocast_dtype
from xmr.methods import build_method

# (image size, context length, batch, vocabulary incl. sot/eot/mask): the demo's BPE has ~820 tokens,
# CLIP's has 49,408 + the added mask token.
SHAPES = {"demo": ((192, 64), 48, 64, 822), "ViT-B/16": ((384, 128), 77, 16, 49409), "tiny": ((64, 32), 32, 16, 1000)}


class _Tokenizer:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.eot_id = vocab_size, vocab_size - 2


def synthetic_batch(image_size, context, batch, vocab, num_classes, seed=0) -> dict[str, torch.Tensor]:
    """Random images and token ids laid out as the tokenizer does: sot, words, eot, padding; 15% masked."""
    sot, eot, mask = vocab - 3, vocab - 2, vocab - 1
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, sot, (batch, context), generator=g)
    lengths = torch.randint(12, context - 1, (batch,), generator=g)
    for row, length in enumerate(lengths.tolist()):
        ids[row, 0], ids[row, length], ids[row, length + 1:] = sot, eot, 0
    mlm_labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, torch.zeros_like(ids))
    mlm_labels[:, 0] = 0
    mlm_ids = torch.where(mlm_labels > 0, torch.full_like(ids, mask), ids)
    return {"images": torch.randn(batch, 3, *image_size, generator=g), "ids": ids,
            "pids": torch.randint(0, num_classes, (batch,), generator=g), "image_ids": torch.arange(batch),
            "mlm_ids": mlm_ids, "mlm_labels": mlm_labels}


def measure(model_name: str, precision: str, steps: int, batch_size: int | None) -> dict:
    image_size, context, default_batch, vocab = SHAPES[model_name]
    batch_size = batch_size or default_batch
    cfg = load_config(None, [f"model.clip={model_name}", f"model.image_size={list(image_size)}",
                             f"data.context_length={context}"])
    torch.manual_seed(0)
    num_classes = 1000
    model = build_method(cfg, num_classes, _Tokenizer(vocab))
    optimizer = build_optimizer(model, OptimConfig(), model.new_module_prefixes())
    batch = synthetic_batch(image_size, context, batch_size, vocab, num_classes)
    dtype = autocast_dtype(precision)
    times, losses = [], []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(batch)
        out.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - start)
        losses.append(out.total.item())
    median = sorted(times)[len(times) // 2]
    return {"model": model_name, "precision": precision, "batch": batch_size, "image_size": list(image_size),
            "steps": steps, "median_step_s": round(median, 4), "samples_per_s": round(batch_size / median, 2),
            "first_loss": round(losses[0], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["demo", "ViT-B/16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None)
    args = parser.parse_args()
    results = []
    for name in args.models:
        fp32 = measure(name, "fp32", args.steps, args.batch)
        bf16 = measure(name, "bf16", args.steps, args.batch)
        bf16["speedup_vs_fp32"] = round(bf16["samples_per_s"] / fp32["samples_per_s"], 2)
        results += [fp32, bf16]
    print(json.dumps({"benchmark": "train_step", "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "cpus": os.cpu_count(), "machine": platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
