"""Parameter groups and learning-rate schedules; generic over methods."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from xmr.config import OptimConfig
from xmr.methods.base import ParamRule


def _rule_for(name: str, rules: Sequence[ParamRule]) -> ParamRule | None:
    return next((rule for rule in rules if name.startswith(rule.prefix)), None)


def build_param_groups(model: nn.Module, cfg: OptimConfig, rules: Sequence[ParamRule] = ()) -> list[dict]:
    """One group per distinct (lr, weight decay).

    A parameter matching a method's `ParamRule` (first matching prefix) gets the rule's lr factor
    (default `new_module_lr_factor`, for randomly initialised heads) and weight decay; then biases get
    `bias_lr_factor` and `bias_weight_decay` on top.
    """
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr, weight_decay = cfg.lr, cfg.weight_decay
        rule = _rule_for(name, rules)
        if rule is not None:
            lr *= cfg.new_module_lr_factor if rule.lr_factor is None else rule.lr_factor
            if rule.weight_decay is not None:
                weight_decay = rule.weight_decay
        if name.endswith("bias"):
            lr *= cfg.bias_lr_factor
            weight_decay = cfg.bias_weight_decay
        group = groups.setdefault((lr, weight_decay), {"params": [], "names": [], "lr": lr,
                                                        "weight_decay": weight_decay, "base_lr": lr})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig, rules: Sequence[ParamRule] = ()) -> torch.optim.Optimizer:
    groups = build_param_groups(model, cfg, rules)
    for group in groups:
        group.pop("names")
    kwargs: dict = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    params = [p for group in groups for p in group["params"]]
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        kwargs["fused"] = True  # one kernel for all parameters: measured part of the 2x step speed-up
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, **kwargs)
    return torch.optim.Adam(groups, **kwargs)


def lr_factor(progress_epochs: float, cfg: OptimConfig) -> float:
    """Multiplier of each group's base lr at a (possibly fractional) epoch.

    Warm-up: linear from `warmup_factor` to 1 over `warmup_epochs`. Then cosine decay from 1 to
    `min_lr / lr` at `epochs` (the reference recipe); `constant` keeps 1.
    """
    if progress_epochs < cfg.warmup_epochs:
        alpha = progress_epochs / cfg.warmup_epochs
        return cfg.warmup_factor * (1 - alpha) + alpha
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-8)
    t = min(max((progress_epochs - cfg.warmup_epochs) / span, 0.0), 1.0)
    floor = cfg.min_lr / cfg.lr if cfg.lr else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
