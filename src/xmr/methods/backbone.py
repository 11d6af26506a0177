"""The CLIP towers every method builds on, from the experiment's `model` section and the tokenizer."""

from __future__ import annotations

from xmr.config import ModelConfig
from xmr.errors import ConfigError
from xmr.methods.base import BuildContext
from xmr.models.clip import CLIP, get_clip_config


def build_clip(backbone: ModelConfig, ctx: BuildContext) -> CLIP:
    """CLIP towers: a preset resized to the recipe's input and vocabulary, optionally pretrained."""
    from xmr.models.checkpoints import load_clip_weights

    clip_cfg = get_clip_config(backbone.clip)
    clip_cfg.vision.image_size = tuple(backbone.image_size)
    clip_cfg.vision.stride = backbone.stride
    clip_cfg.text.vocab_size = ctx.vocab_size
    clip_cfg.text.eot_token_id = ctx.eot_id
    clip_cfg.text.context_length = ctx.context_length
    for dotted, value in backbone.clip_overrides.items():
        target = clip_cfg
        *parents, leaf = dotted.split(".")
        for name in parents:
            target = getattr(target, name, None)
        if target is None or not hasattr(target, leaf):
            raise ConfigError(f"model.clip_overrides: unknown CLIP field '{dotted}'")
        setattr(target, leaf, tuple(value) if isinstance(value, list) else value)
    clip = CLIP(clip_cfg)
    if backbone.pretrained:
        load_clip_weights(clip, backbone.pretrained)
    if backbone.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return clip
