"""Typed results shared across layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EncoderOutput:
    """What every encoder returns.

    tokens: (B, L, D) projected token sequence (after the final LayerNorm and projection).
    pooled: (B, D) global feature (class token for images, end-of-text token for text), not normalised.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor


@dataclass
class LossOutput:
    """A method's training objective: the weighted total to backpropagate plus named parts to log.

    parts holds each loss term already multiplied by its weight (sum(parts) == total);
    metrics holds extra detached scalars worth logging (e.g. MLM accuracy).
    """

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
