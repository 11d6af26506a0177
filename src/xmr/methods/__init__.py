"""Method registry: build a method from an experiment config, or rebuild it from a checkpoint's config."""

from __future__ import annotations

from typing import Any

from xmr.config import ExperimentConfig
from xmr.errors import ConfigError
from xmr.methods.irra import IRRA, IRRAConfig

METHODS: dict[str, type] = {"irra": IRRA}


def build_clip(cfg: ExperimentConfig, vocab_size: int, eot_token_id: int):
    """CLIP towers for an experiment: a preset, resized to the recipe's input, optionally pretrained."""
    from xmr.models.checkpoints import load_clip_weights
    from xmr.models.clip import CLIP, get_clip_config

    clip_cfg = get_clip_config(cfg.model.clip)
    clip_cfg.vision.image_size = tuple(cfg.model.image_size)
    clip_cfg.vision.stride = cfg.model.stride
    clip_cfg.text.vocab_size = vocab_size
    clip_cfg.text.eot_token_id = eot_token_id
    clip_cfg.text.context_length = cfg.data.context_length
    for dotted, value in cfg.model.clip_overrides.items():
        target = clip_cfg
        *parents, leaf = dotted.split(".")
        for name in parents:
            target = getattr(target, name, None)
        if target is None or not hasattr(target, leaf):
            raise ConfigError(f"model.clip_overrides: unknown CLIP field '{dotted}'")
        setattr(target, leaf, tuple(value) if isinstance(value, list) else value)
    clip = CLIP(clip_cfg)
    if cfg.model.pretrained:
        load_clip_weights(clip, cfg.model.pretrained)
    if cfg.model.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return clip


def build_method(cfg: ExperimentConfig, num_classes: int, tokenizer) -> Any:
    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is not one of {sorted(METHODS)}")
    clip = build_clip(cfg, tokenizer.vocab_size, tokenizer.eot_id)
    weights = {"sdm": cfg.loss.sdm_weight, "id": cfg.loss.id_weight, "mlm": cfg.loss.mlm_weight,
               "itc": cfg.loss.itc_weight, "cmpm": cfg.loss.cmpm_weight}
    irra_cfg = IRRAConfig(losses=list(cfg.loss.names), weights=weights, temperature=cfg.model.temperature,
                          num_classes=num_classes, vocab_size=tokenizer.vocab_size, cmt_depth=cfg.model.cmt_depth,
                          soft_label_weight=cfg.loss.soft_label_weight)
    return IRRA(clip, irra_cfg)


def method_from_exported(config: dict[str, Any]) -> Any:
    name = config.get("method")
    if name not in METHODS:
        raise ConfigError(f"checkpoint names method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name].from_exported(config)
