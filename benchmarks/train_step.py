"""IRRA training step (sdm + id + mlm; forward, backward, optimiser step): ours vs a plain reference.

Prints one JSON object (logs on stderr). Figures, all measured in this run:

* samples/s and peak memory of the reference (`_reference_irra.py`: nn.MultiheadAttention, fp32, no
  fusion, for-loop Adam) and of ours (bf16 autocast + SDPA + fused Adam; also fp32 and, with
  `--compile`, torch.compile of the step) for the demo config and ViT-B/16 at 384x128. Every case runs in
  its own subprocess so that its peak resident memory (VmHWM) is its own; "step memory" is that peak
  minus the resident memory before the model was built (torch and Python themselves).
* the loss curves of ours (bf16) and the reference (fp32) over 200 steps on the demo config from the
  same initial weights and the same batches: max |difference|, absolute and relative.
* gradient checkpointing (`model.grad_checkpointing=true`): samples/s and peak memory with and without
  at a large batch.

Usage: python benchmarks/train_step.py [--quick] [--compile]. Default run: about 8 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, row
from _reference_irra import ReferenceIRRA

from xmr.config import OptimConfig, load_config
from xmr.engine.optim import build_param_groups
from xmr.methods import BuildContext, build_method

# (image size, context length, batch, vocabulary incl. sot/eot/mask): the demo's BPE has ~820 tokens,
# CLIP's has 49,408 + the added mask token.
SHAPES = {"demo": ((192, 64), 48, 64, 822), "ViT-B/16": ((384, 128), 77, 16, 49409),
          "tiny": ((64, 32), 32, 8, 1000)}
NUM_CLASSES = 1000
# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); over a 200-step run the two trajectories
# also drift apart through the optimiser, so the curve tolerance is 2% of the reference loss at every step.
CURVE_RTOL = 0.02


def _context(cfg, vocab: int) -> BuildContext:
    return BuildContext(backbone=cfg.model, num_classes=NUM_CLASSES, vocab_size=vocab, eot_id=vocab - 2,
                        mask_id=vocab - 1, context_length=cfg.data.context_length)


def synthetic_batch(image_size, context: int, batch: int, vocab: int, num_classes: int = NUM_CLASSES,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and token ids laid out as the tokenizer does: sot, words, eot, padding; 15% masked."""
    sot, eot, mask = vocab - 3, vocab - 2, vocab - 1
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, sot, (batch, context), generator=g)
    lengths = torch.randint(min(12, context - 3), context - 1, (batch,), generator=g)
    for i, length in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, length], ids[i, length + 1:] = sot, eot, 0
    mlm_labels = torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, torch.zeros_like(ids))
    mlm_labels[:, 0] = 0
    mlm_ids = torch.where(mlm_labels > 0, torch.full_like(ids, mask), ids)
    # Identities in pairs so that the SDM label matrix has off-diagonal positives, as with a P x K sampler.
    pids = torch.randint(0, num_classes, (batch // 2 + 1,), generator=g).repeat_interleave(2)[:batch]
    return {"images": torch.randn(batch, 3, *image_size, generator=g), "ids": ids, "pids": pids,
            "image_ids": torch.arange(batch), "mlm_ids": mlm_ids, "mlm_labels": mlm_labels}


def build_ours(model_name: str, grad_checkpointing: bool = False, seed: int = 0):
    """Our IRRA model for a shape of SHAPES, built through the experiment config as `xmr train` does."""
    image_size, context, _, vocab = SHAPES[model_name]
    cfg = load_config(None, [f"model.clip={model_name}", f"model.image_size={list(image_size)}",
                             f"data.context_length={context}",
                             f"model.grad_checkpointing={str(grad_checkpointing).lower()}"])
    torch.manual_seed(seed)
    return build_method(cfg.method, _context(cfg, vocab))


def make_optimizer(model: torch.nn.Module, impl: str) -> torch.optim.Optimizer:
    """The recipe's Adam (OptimConfig defaults, per-group lr) as a for-loop ("loop") or fused kernel ("fused")."""
    groups = build_param_groups(model, OptimConfig(), model.param_rules())
    for group in groups:
        group.pop("names")
    cfg = OptimConfig()
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if impl == "fused":
        kwargs["fused"] = True
    elif impl == "foreach":
        kwargs["foreach"] = True
    else:
        kwargs["foreach"] = False
    return torch.optim.Adam(groups, **kwargs)


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor], bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(batch)
    return out["total"] if isinstance(out, dict) else out.total


def make_step(model, optimizer, bf16: bool, compile_step: bool):
    """One training step as a function of the batch; returns the (detached) loss."""
    forward = torch.compile(lambda b: loss_of(model, b, bf16)) if compile_step else (lambda b: loss_of(model, b, bf16))

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = forward(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_case(case: dict) -> dict:
    """Time one configuration in this process (called in a fresh subprocess by `measure`)."""
    torch.manual_seed(0)
    base_kib = _rss_kib("VmRSS")
    name = case["model"]
    image_size, context, default_batch, vocab = SHAPES[name]
    batch_size = case.get("batch") or default_batch
    model = build_ours(name, grad_checkpointing=case.get("ckpt", False))
    if case["impl"] == "reference":
        model = ReferenceIRRA.from_ours(model)
    model.train()
    optimizer = make_optimizer(model, case.get("optim", "loop"))
    batch = synthetic_batch(image_size, context, batch_size, vocab)
    if case.get("channels_last"):
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
    step = make_step(model, optimizer, case.get("bf16", False), case.get("compile", False))
    start = time.perf_counter()
    for _ in range(case["warmup"]):
        step(batch)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(case["steps"]):
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    peak_kib = _rss_kib("VmHWM")
    return {**case, "batch": batch_size, "median_step_s": round(median, 4),
            "samples_per_s": round(batch_size / median, 3), "warmup_s": round(warmup_s, 1),
            "peak_rss_mib": round(peak_kib / 1024, 1), "step_memory_mib": round((peak_kib - base_kib) / 1024, 1)}


def measure(case: dict) -> dict:
    """run_case in a fresh interpreter, so that peak memory figures do not mix."""
    print(f"[train_step] {case}", file=sys.stderr, flush=True)
    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], check=False,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {**case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    result = json.loads(proc.stdout)
    print(f"[train_step]   -> {result['samples_per_s']} samples/s, {result['step_memory_mib']} MiB",
          file=sys.stderr, flush=True)
    return result


def loss_curves(model_name: str, steps: int, distinct_batches: int = 8, batch_size: int | None = None) -> dict:
    """Ours (bf16 autocast, fused Adam) vs the reference (fp32) from the same weights on the same batches.

    The batches cycle through `distinct_batches` fixed ones so that the loss falls (memorisation) and the
    comparison covers a moving trajectory, not noise around a constant.
    """
    image_size, context, default_batch, vocab = SHAPES[model_name]
    batch_size = batch_size or default_batch
    ours = build_ours(model_name)
    ref = ReferenceIRRA.from_ours(ours)
    ours.train()
    ref.train()
    batches = [synthetic_batch(image_size, context, batch_size, vocab, seed=s) for s in range(distinct_batches)]
    ours_step = make_step(ours, make_optimizer(ours, "fused"), bf16=True, compile_step=False)
    ref_step = make_step(ref, make_optimizer(ref, "loop"), bf16=False, compile_step=False)
    ours_curve, ref_curve = [], []
    for i in range(steps):
        batch = batches[i % distinct_batches]
        ours_curve.append(float(ours_step(batch)))
        ref_curve.append(float(ref_step(batch)))
    diffs = [abs(a - b) for a, b in zip(ours_curve, ref_curve, strict=True)]
    rel = [d / abs(b) for d, b in zip(diffs, ref_curve, strict=True)]
    return {"model": model_name, "batch": batch_size, "steps": steps, "distinct_batches": distinct_batches,
            "max_abs_diff": max(diffs), "max_rel_diff": max(rel), "rtol": CURVE_RTOL,
            "within_tolerance": max(rel) <= CURVE_RTOL,
            "ours_first_last": [ours_curve[0], ours_curve[-1]], "reference_first_last": [ref_curve[0], ref_curve[-1]],
            "ours_curve": [round(x, 5) for x in ours_curve], "reference_curve": [round(x, 5) for x in ref_curve]}


def _speed_rows(name: str, ref: dict, ours: dict, label: str, targeted: bool = True) -> list[dict]:
    """Speed and memory rows; `targeted` False for variants shown for scale only (e.g. our fp32)."""
    if "error" in ref or "error" in ours:
        return [row(f"train step {name}: {label}", None, "samples/s", note=f"failed: {ours.get('error') or ref.get('error')}")]
    ratio = ours["samples_per_s"] / ref["samples_per_s"]
    mem_ok = ours["step_memory_mib"] <= ref["step_memory_mib"]
    return [
        row(f"train step {name} (batch {ours['batch']}): {label}", ours["samples_per_s"], "samples/s",
            reference=ref["samples_per_s"], reference_name="plain IRRA (nn.MultiheadAttention, fp32)",
            target=">= 2x reference, memory no higher" if targeted else None,
            met=(ratio >= 2 and mem_ok) if targeted else None,
            note=f"{ours['steps']} timed steps (median)"),
        row(f"train step {name} (batch {ours['batch']}): memory, {label}", ours["step_memory_mib"], "MiB",
            reference=ref["step_memory_mib"], reference_name="plain IRRA (fp32)", higher_is_better=False,
            target="no higher than reference" if targeted else None, met=mem_ok if targeted else None,
            note=f"peak RSS above the pre-model baseline; totals {ours['peak_rss_mib']} vs {ref['peak_rss_mib']} MiB"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run (under a minute): demo only, few steps")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the step (slow to build)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return

    quick = args.quick
    models = ["demo"] if quick else ["demo", "ViT-B/16"]
    ours_recipe = {"impl": "ours", "bf16": True, "optim": "fused"}
    cases: dict[str, dict[str, dict]] = {}
    rows: list[dict] = []
    for name in models:
        heavy = name == "ViT-B/16"
        # The fp32 reference of ViT-B/16 takes ~15 s a step on 2 cores: 1 warm-up + 3 timed steps.
        timing = {"warmup": 1, "steps": 2} if quick else ({"warmup": 1, "steps": 3} if heavy else
                                                           {"warmup": 2, "steps": 6})
        variants = {"reference": {"impl": "reference"}, "ours bf16": ours_recipe}
        if not heavy:  # our fp32 for scale (skipped for ViT-B/16: about as slow as the reference)
            variants["ours fp32"] = {"impl": "ours", "optim": "fused"}
        if args.compile:
            variants["ours bf16 compiled"] = {**ours_recipe, "compile": True}
        cases[name] = {label: measure({"model": name, **spec, **timing}) for label, spec in variants.items()}
        ref = cases[name]["reference"]
        for label in variants:
            if label != "reference":
                rows += _speed_rows(name, ref, cases[name][label], label, targeted="bf16" in label)

    # Gradient checkpointing: the recipe at a large batch, with and without.
    ckpt_batch = 64 if quick else 256
    ckpt_timing = {"warmup": 1, "steps": 2} if quick else {"warmup": 1, "steps": 3}
    plain = measure({"model": "demo", "batch": ckpt_batch, **ours_recipe, **ckpt_timing})
    ckpt = measure({"model": "demo", "batch": ckpt_batch, **ours_recipe, **ckpt_timing, "ckpt": True})
    if "error" not in plain and "error" not in ckpt:
        rows.append(row(f"grad checkpointing demo (batch {ckpt_batch}): step memory", ckpt["step_memory_mib"], "MiB",
                        reference=plain["step_memory_mib"], reference_name="same recipe without checkpointing",
                        higher_is_better=False, target="cuts activation memory",
                        met=ckpt["step_memory_mib"] < plain["step_memory_mib"],
                        note=f"ratio = memory without / with; speed {ckpt['samples_per_s']} vs "
                             f"{plain['samples_per_s']} samples/s"))
        rows.append(row(f"grad checkpointing demo (batch {ckpt_batch}): speed", ckpt["samples_per_s"], "samples/s",
                        reference=plain["samples_per_s"], reference_name="same recipe without checkpointing",
                        note="recomputes each block's forward in the backward pass"))

    print("[train_step] loss curves", file=sys.stderr, flush=True)
    start = time.perf_counter()
    # Batch 32 (not the demo's 64) keeps the 200 fp32 + 200 bf16 steps to about 4 minutes on 2 cores.
    curve = loss_curves("demo", steps=20 if quick else 200, batch_size=16 if quick else 32)
    curve["seconds"] = round(time.perf_counter() - start, 1)
    rows.append(row(f"loss curve demo, {curve['steps']} steps: max |bf16 ours - fp32 reference| / reference",
                    curve["max_rel_diff"], "relative", target=f"<= {CURVE_RTOL} (bf16 tolerance)",
                    met=curve["within_tolerance"], higher_is_better=False,
                    note=f"max abs diff {curve['max_abs_diff']:.4g}; loss {curve['reference_first_last'][0]:.3f} -> "
                         f"{curve['reference_first_last'][1]:.3f} (reference), "
                         f"{curve['ours_first_last'][1]:.3f} (ours)"))

    print(json.dumps({"benchmark": "train_step", "machine": machine(), "quick": quick, "rows": rows,
                      "cases": cases, "grad_checkpointing": {"without": plain, "with": ckpt},
                      "loss_curve": curve}, indent=2))


if __name__ == "__main__":
    main()
