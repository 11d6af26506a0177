"""CLIP towers: shapes, masks, pooling, precision, Attention vs nn.MultiheadAttention, gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn

from xmr.errors import ConfigError
from xmr.models.clip import (
    CLIP,
    CLIP_CONFIGS,
    Attention,
    CLIPConfig,
    TextTransformer,
    Transformer,
    VisionConfig,
    get_clip_config,
)


def small(**overrides) -> CLIPConfig:
    return get_clip_config("tiny", **overrides)


def build(cfg: CLIPConfig, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(cfg).eval()


def openai_keys(vision_layers: int, text_layers: int) -> set[str]:
    """OpenAI CLIP ViT state-dict keys, written out from the layout of the released checkpoints."""
    block = [
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_1.weight",
        "ln_1.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
    ]
    keys = {
        "positional_embedding",
        "text_projection",
        "logit_scale",
        "token_embedding.weight",
        "ln_final.weight",
        "ln_final.bias",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.proj",
        "visual.conv1.weight",
        "visual.ln_pre.weight",
        "visual.ln_pre.bias",
        "visual.ln_post.weight",
        "visual.ln_post.bias",
    }
    keys |= {f"visual.transformer.resblocks.{i}.{b}" for i in range(vision_layers) for b in block}
    keys |= {f"transformer.resblocks.{i}.{b}" for i in range(text_layers) for b in block}
    return keys


def test_vit_b16_keys_and_shapes_equal_openai():
    with torch.device("meta"):  # no memory, no init cost
        model = CLIP(get_clip_config("ViT-B/16"))
    sd = model.state_dict()
    assert set(sd) == openai_keys(12, 12)
    assert sd["visual.conv1.weight"].shape == (768, 3, 16, 16)
    assert sd["visual.positional_embedding"].shape == (197, 768)
    assert sd["visual.proj"].shape == (768, 512)
    assert sd["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (2304, 768)
    assert sd["token_embedding.weight"].shape == (49408, 512)
    assert sd["positional_embedding"].shape == (77, 512)
    assert sd["text_projection"].shape == (512, 512)
    assert sd["logit_scale"].shape == ()


def test_presets():
    l14 = CLIP_CONFIGS["ViT-L/14"]
    assert (l14.vision.width, l14.vision.layers, l14.vision.heads, l14.vision.patch_size) == (
        1024,
        24,
        16,
        14,
    )
    assert (l14.text.width, l14.text.layers, l14.text.heads, l14.embed_dim) == (768, 12, 12, 768)
    assert CLIP_CONFIGS["ViT-B/32"].vision.patch_size == 32
    demo = CLIP_CONFIGS["demo"]
    assert demo.vision.image_size == (192, 64) and demo.vision.grid_size == (12, 4)
    # get_clip_config returns a copy: editing it leaves the preset alone
    cfg = get_clip_config("ViT-B/16")
    cfg.vision.layers = 1
    assert CLIP_CONFIGS["ViT-B/16"].vision.layers == 12


@pytest.mark.parametrize("dump,load", [(yaml.safe_dump, yaml.safe_load), (json.dumps, json.loads)])
def test_config_round_trip(dump, load):
    cfg = get_clip_config("ViT-B/16", **{"vision.image_size": [384, 128], "vision.stride": 12}, act="gelu")
    back = CLIPConfig.from_dict(load(dump(cfg.to_dict())))
    assert back == cfg
    assert back.vision.image_size == (384, 128) and isinstance(back.vision.image_size, tuple)
    assert back.vision.grid_size == (31, 10)


def test_config_overrides_and_errors():
    cfg = get_clip_config("tiny", vision={"layers": 3}, **{"text.vocab_size": 50})
    assert cfg.vision.layers == 3 and cfg.text.vocab_size == 50 and cfg.vision.width == 64
    assert get_clip_config(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="vision.nope"):
        get_clip_config("tiny", **{"vision.nope": 1})
    with pytest.raises(ConfigError, match="unknown CLIP preset"):
        get_clip_config("ViT-X/99")
    with pytest.raises(ConfigError, match="multiple of heads"):
        get_clip_config("tiny", **{"vision.heads": 5})
    with pytest.raises(ConfigError, match="vision.bogus"):
        CLIPConfig.from_dict({"vision": {"bogus": 1}})


@pytest.mark.parametrize("stride,grid", [(None, (24, 8)), (12, (31, 10))])
def test_vision_shapes_non_square_and_overlapping(stride, grid):
    cfg = small(**{"vision.image_size": (384, 128), "vision.stride": stride, "vision.layers": 1})
    model = build(cfg)
    assert model.visual.grid_size == grid
    assert model.visual.positional_embedding.shape == (1 + grid[0] * grid[1], 64)
    out = model.encode_image(torch.randn(2, 3, 384, 128))
    assert out.tokens.shape == (2, 1 + grid[0] * grid[1], 32)
    assert torch.equal(out.pooled, out.tokens[:, 0])
    if stride is None:
        assert out.tokens.shape[1] == 193
    with pytest.raises(ValueError, match="384"):
        model.encode_image(torch.randn(1, 3, 224, 224))


def test_ln_post_and_proj_apply_to_every_token():
    model = build(small())
    images = torch.randn(2, 3, 64, 32)
    visual = model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], 1) + visual.positional_embedding
    expected = visual.ln_post(visual.transformer(visual.ln_pre(x))) @ visual.proj
    torch.testing.assert_close(model.encode_image(images).tokens, expected)


def test_text_is_causal():
    model = build(small())
    ids = torch.randint(1, 900, (2, 12))
    base = model.encode_text(ids).tokens
    changed_ids = ids.clone()
    changed_ids[:, 6:] = (changed_ids[:, 6:] + 7) % 900 + 1
    changed = model.encode_text(changed_ids).tokens
    torch.testing.assert_close(changed[:, :6], base[:, :6], rtol=0, atol=1e-6)
    assert (changed[:, 6:] - base[:, 6:]).abs().amax() > 1e-3


def test_text_pooling_at_first_eot_else_argmax():
    model = build(small(**{"text.eot_token_id": 999}))
    ids = torch.tensor(
        [
            [5, 9, 999, 0, 999, 0],  # first EOT at 2 (a later one is ignored)
            [5, 999, 3, 0, 0, 0],  # EOT at 1 although 5 is larger than 3
            [5, 700, 12, 0, 0, 0],
        ]
    )  # no EOT: argmax -> 1
    out = model.encode_text(ids)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(3), torch.tensor([2, 1, 1])])
    model.text_cfg.eot_token_id = None  # argmax everywhere (first max in row 0 -> 2)
    out = model.encode_text(ids)
    torch.testing.assert_close(out.pooled, out.tokens[torch.arange(3), torch.tensor([2, 1, 1])])
    with pytest.raises(ValueError, match="32"):
        model.encode_text(torch.ones(1, 33, dtype=torch.long))


def test_standalone_text_tower_matches_clip_text():
    cfg = small()
    clip = build(cfg)
    tower = TextTransformer(cfg.text, cfg.embed_dim, cfg.act).eval()
    own = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.") and k != "logit_scale"}
    tower.load_state_dict(own)
    ids = torch.randint(1, 999, (2, 10))
    torch.testing.assert_close(tower(ids).pooled, clip.encode_text(ids).pooled)


def test_bf16_autocast_close_to_fp32():
    model = build(small())
    images, ids = torch.randn(2, 3, 64, 32), torch.randint(1, 999, (2, 16))
    ref_i, ref_t = model.encode_image(images).pooled, model.encode_text(ids).pooled
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_i, out_t = model.encode_image(images), model.encode_text(ids)
    assert out_i.tokens.dtype == torch.bfloat16
    for out, ref in ((out_i.pooled, ref_i), (out_t.pooled, ref_t)):
        assert torch.isfinite(out).all()
        cos = torch.cosine_similarity(out.float(), ref, dim=-1)
        assert cos.min() > 0.995
        assert (out.float() - ref).abs().amax() < 0.05 * ref.abs().amax()


def _mha_twin(width: int, heads: int) -> tuple[Attention, nn.MultiheadAttention]:
    torch.manual_seed(1)
    ours = Attention(width, heads)
    with torch.no_grad():
        ours.in_proj_bias.normal_()
        ours.out_proj.bias.normal_()
    ref = nn.MultiheadAttention(width, heads, batch_first=True)
    missing = ref.load_state_dict(ours.state_dict())  # same parameter names: loads strictly
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours.eval(), ref.eval()


def test_attention_equals_multihead_attention():
    ours, ref = _mha_twin(32, 4)
    x, mem = torch.randn(3, 7, 32), torch.randn(3, 11, 32)
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        ours(x, mem, mem), ref(x, mem, mem, need_weights=False)[0], atol=1e-5, rtol=1e-5
    )
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    expected = ref(x, x, x, attn_mask=causal, need_weights=False)[0]
    torch.testing.assert_close(ours(x, is_causal=True), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours(x, attn_mask=causal), expected, atol=1e-5, rtol=1e-5)
    float_mask = torch.randn(3, 7, 11)
    float_mask_heads = float_mask.repeat_interleave(4, dim=0)  # MHA wants (B*heads, L, S)
    torch.testing.assert_close(
        ours(x, mem, mem, attn_mask=float_mask),
        ref(x, mem, mem, attn_mask=float_mask_heads, need_weights=False)[0],
        atol=1e-5,
        rtol=1e-5,
    )
    bool_mask = torch.rand(7, 11) > 0.7
    bool_mask[:, 0] = False  # keep one key per query so no row is fully masked
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[:, -3:] = True
    torch.testing.assert_close(
        ours(x, mem, mem, attn_mask=bool_mask, key_padding_mask=pad),
        ref(x, mem, mem, attn_mask=bool_mask, key_padding_mask=pad, need_weights=False)[0],
        atol=1e-5,
        rtol=1e-5,
    )


def test_every_parameter_gets_a_gradient():
    model = build(small()).train()
    out_i = model.encode_image(torch.randn(2, 3, 64, 32))
    out_t = model.encode_text(torch.randint(1, 999, (2, 16)))
    logits = model.logit_scale.exp() * out_i.pooled @ out_t.pooled.t()
    (logits.logsumexp(-1).sum() + out_t.tokens.square().mean() + out_i.tokens.square().mean()).backward()
    # The token embedding only receives rows of used ids; everything else must be fully non-zero somewhere.
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_gradients():
    grads = []
    for enable in (False, True):
        model = build(small()).train()
        model.set_grad_checkpointing(enable)
        images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
        ids = torch.randint(1, 999, (2, 16), generator=torch.Generator().manual_seed(0))
        (model.encode_image(images).pooled.sum() + model.encode_text(ids).pooled.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 50
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_openai_init_scales():
    cfg = small(**{"text.width": 256, "text.heads": 4, "text.layers": 2})
    model = build(cfg)
    block = model.transformer.resblocks[0]
    expected = {
        block.attn.in_proj_weight: 256**-0.5,
        block.attn.out_proj.weight: 256**-0.5 * 4**-0.5,
        block.mlp.c_fc.weight: 512**-0.5,
        block.mlp.c_proj.weight: 256**-0.5 * 4**-0.5,
        model.token_embedding.weight: 0.02,
        model.positional_embedding: 0.01,
        model.text_projection: 256**-0.5,
    }
    for param, std in expected.items():
        assert abs(param.std().item() / std - 1) < 0.1
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))


def test_resize_token_embedding_appends_rows():
    model = build(small())
    old = model.token_embedding.weight.detach().clone()
    model.resize_token_embedding(1001)
    new = model.token_embedding.weight
    assert new.shape == (1001, 64) and model.config.text.vocab_size == 1001
    assert torch.equal(new[:1000], old)
    assert 0 < new[1000].abs().max() < 0.2
    assert model.encode_text(torch.tensor([[3, 1000, 7]])).tokens.shape == (1, 3, 32)
    with pytest.raises(ValueError):
        model.resize_token_embedding(10)


def test_transformer_public_api():
    block_stack = Transformer(32, 2, 4)
    x = torch.randn(2, 5, 32)
    assert block_stack(x).shape == (2, 5, 32)
    assert len(block_stack.resblocks) == 2
    assert VisionConfig(image_size=224).image_size == (224, 224)
