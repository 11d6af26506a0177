"""IRRA method: losses wired as in the paper, gradients reach every parameter, param groups, round trip."""

from __future__ import annotations

import math

import pytest
import torch

from xmr.config import OptimConfig, load_config
from xmr.engine.optim import build_param_groups, lr_factor
from xmr.methods.irra import IRRA, IRRAConfig
from xmr.models.clip import CLIP, get_clip_config

VOCAB = 1000


def tiny_irra(losses=("sdm", "id", "mlm"), num_classes=5) -> IRRA:
    torch.manual_seed(0)
    cfg = get_clip_config("tiny")
    cfg.text.vocab_size, cfg.text.eot_token_id = VOCAB, VOCAB - 2
    return IRRA(CLIP(cfg), IRRAConfig(losses=list(losses), cmt_depth=1), num_classes=num_classes, vocab_size=VOCAB)


def batch(model: IRRA, size=6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    h, w = model.clip.config.vision.image_size
    L = model.clip.config.text.context_length
    ids = torch.randint(1, VOCAB - 3, (size, L), generator=g)
    ids[:, 0], ids[:, 10], ids[:, 11:] = VOCAB - 3, VOCAB - 2, 0
    labels = torch.zeros_like(ids)
    masked = ids.clone()
    masked[:, 3], labels[:, 3] = VOCAB - 1, ids[:, 3]
    return {"images": torch.randn(size, 3, h, w, generator=g), "ids": ids, "pids": torch.tensor([0, 0, 1, 2, 3, 4]),
            "image_ids": torch.arange(size), "mlm_ids": masked, "mlm_labels": labels}


@pytest.mark.parametrize("losses", [("sdm", "id", "mlm"), ("itc",), ("sdm",), ("cmpm", "id")])
def test_forward_total_is_sum_of_parts_and_all_params_get_gradients(losses):
    model = tiny_irra(losses)
    out = model(batch(model))
    assert set(out.parts) == set(losses)
    assert torch.isfinite(out.total)
    assert out.total.item() == pytest.approx(sum(p.item() for p in out.parts.values()), rel=1e-6)
    out.total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert no_grad == [], no_grad
    assert not model.clip.logit_scale.requires_grad  # IRRA keeps the temperature fixed


def test_optional_modules_exist_only_with_their_losses():
    assert not hasattr(tiny_irra(("itc",)), "fusion")
    model = tiny_irra()
    assert model.mlm_head.fc.out_features == VOCAB and model.classifier.out_features == 5
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.3)
    assert model.logit_scale.item() == pytest.approx(50.0)


def test_loss_weights_scale_parts():
    model = tiny_irra(("sdm", "id"))
    b = batch(model)
    base = model(b).parts
    model.cfg.id_weight = 0.5
    half = model(b).parts
    assert half["id"].item() == pytest.approx(0.5 * base["id"].item(), rel=1e-5)
    assert half["sdm"].item() == pytest.approx(base["sdm"].item(), rel=1e-5)


def test_param_groups_follow_the_paper_factors():
    model = tiny_irra()
    cfg = OptimConfig()
    groups = build_param_groups(model, cfg, model.param_rules())
    lr_of = {name: (g["lr"], g["weight_decay"]) for g in groups for name in g["names"]}
    assert lr_of["clip.visual.conv1.weight"] == (1e-5, 4e-5)
    assert lr_of["clip.visual.ln_pre.bias"] == (2e-5, 0.0)
    assert lr_of["fusion.cross_attn.in_proj_weight"] == (5e-5, 4e-5)
    assert lr_of["classifier.bias"] == pytest.approx((1e-4, 0.0))
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_warmup_cosine_schedule():
    cfg = OptimConfig(epochs=60, warmup_epochs=5, warmup_factor=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(2.5, cfg) == pytest.approx(0.55)
    assert lr_factor(5, cfg) == pytest.approx(1.0)
    assert lr_factor(32.5, cfg) == pytest.approx(0.5)
    assert lr_factor(60, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(20, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 55)))


def test_build_method_from_recipe_and_export_round_trip(tmp_path):
    from xmr.methods import BuildContext, build_method, method_from_exported

    cfg = load_config(None, ["model.clip=tiny", "model.image_size=[64,32]", "data.context_length=16",
                             "model.stride=12", "model.clip_overrides={vision.layers: 1}"])
    ctx = BuildContext(backbone=cfg.model, num_classes=7, vocab_size=300, eot_id=298, mask_id=299,
                       context_length=cfg.data.context_length)
    model = build_method(cfg.method, ctx)
    assert model.clip.config.vision.layers == 1 and model.clip.config.vision.stride == 12
    assert model.clip.config.text.vocab_size == 300 and model.classifier.out_features == 7
    clone = method_from_exported(model.export_config())
    clone.load_state_dict(model.state_dict())
    images = torch.randn(2, 3, 64, 32)
    assert torch.equal(clone.encode_image(images), model.encode_image(images))
