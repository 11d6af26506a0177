"""The fast IRRA training step against its plain peer (benchmarks/_reference_irra.py), on the tiny config.

* fp32: the reference (nn.MultiheadAttention, batch-second, explicit softmax) and ours (SDPA, fused qkv)
  give the same loss and gradients from the same weights, so the benchmark compares like with like;
* gradient checkpointing, switched on from the experiment config, changes neither loss nor gradients;
* a short bf16-autocast run follows the fp32 reference's loss curve within bf16 tolerance.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step as ts
from _reference_irra import ReferenceIRRA

from xmr.config import load_config

NAME = "tiny"


def _batch(seed: int = 0, batch: int | None = None) -> dict[str, torch.Tensor]:
    image_size, context, default_batch, vocab = ts.SHAPES[NAME]
    return ts.synthetic_batch(image_size, context, batch or default_batch, vocab, seed=seed)


def _loss_and_grads(model: torch.nn.Module, batch, bf16: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    loss = ts.loss_of(model, batch, bf16)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float) -> None:
    assert got.keys() == want.keys()
    for name, g in want.items():
        err = (got[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative gradient difference {err:.3g} > {rtol}"


def test_reference_is_a_true_peer_in_fp32():
    ours = ts.build_ours(NAME)
    ref = ReferenceIRRA.from_ours(ours)
    for seed in (0,):
        batch = _batch(seed)
        loss_ours, grads_ours = _loss_and_grads(ours, batch)
        loss_ref, grads_ref = _loss_and_grads(ref, batch)
        assert loss_ours == pytest.approx(loss_ref, rel=1e-5)
        # Every trainable parameter gets a gradient in both, and they agree (parameter-wise relative norm).
        assert len(grads_ref) == sum(p.requires_grad for p in ref.parameters())
        _assert_same_grads(grads_ours, grads_ref, rtol=1e-4)


def test_reference_detects_a_different_model():
    # The comparison can fail: perturb one weight of the reference and the losses part.
    ours = ts.build_ours(NAME)
    ref = ReferenceIRRA.from_ours(ours)
    with torch.no_grad():
        ref.clip.visual.transformer.resblocks[0].attn.in_proj_weight.mul_(1.5)
    batch = _batch()
    assert abs(_loss_and_grads(ours, batch)[0] - _loss_and_grads(ref, batch)[0]) > 1e-4


def test_grad_checkpointing_from_config_same_loss_and_grads():
    cfg = load_config(None, ["model.grad_checkpointing=true"])
    assert cfg.model.grad_checkpointing is True
    plain = ts.build_ours(NAME, grad_checkpointing=False)
    ckpt = ts.build_ours(NAME, grad_checkpointing=True)
    assert ckpt.clip.visual.transformer.grad_checkpointing and ckpt.clip.transformer.grad_checkpointing
    assert ckpt.fusion.cross_modal_transformer.grad_checkpointing
    assert not plain.clip.visual.transformer.grad_checkpointing
    ckpt.load_state_dict(plain.state_dict())
    batch = _batch()
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(ckpt, batch)
    assert loss_ckpt == pytest.approx(loss_plain, rel=1e-6)
    _assert_same_grads(grads_ckpt, grads_plain, rtol=1e-6)


def test_bf16_loss_curve_follows_fp32_reference():
    ours = ts.build_ours(NAME)
    ref = ReferenceIRRA.from_ours(ours)
    ours_step = ts.make_step(ours, ts.make_optimizer(ours, "fused"), bf16=True, compile_step=False)
    ref_step = ts.make_step(ref, ts.make_optimizer(ref, "loop"), bf16=False, compile_step=False)
    batches = [_batch(seed) for seed in range(4)]
    ours_curve, ref_curve = [], []
    for i in range(20):
        ours_curve.append(float(ours_step(batches[i % 4])))
        ref_curve.append(float(ref_step(batches[i % 4])))
    rel = [abs(a - b) / abs(b) for a, b in zip(ours_curve, ref_curve, strict=True)]
    assert max(rel) <= ts.CURVE_RTOL, f"bf16 curve left the fp32 one by {max(rel):.3g} (relative)"
    assert ref_curve[-1] < ref_curve[0]  # the run trains: the comparison is over a moving curve
