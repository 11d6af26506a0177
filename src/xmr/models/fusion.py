"""Cross-modal interaction encoder (IRRA, Sec. 3.2): text tokens attend to image tokens, then self-attend."""

from __future__ import annotations

import torch
from torch import nn

from xmr.models.clip import Attention, Transformer


class CrossModalInteraction(nn.Module):
    """LN(T) queries LN(V) through one cross-attention, then `depth` self-attention layers and a LayerNorm.

    Attribute names follow the reference implementation so its checkpoints map one-to-one
    (the converter in `models/checkpoints.py` prefixes them with `fusion.`).
    """

    def __init__(self, width: int, depth: int = 4, heads: int | None = None, act: str = "quick_gelu") -> None:
        super().__init__()
        heads = heads or max(1, width // 64)
        self.width, self.depth = width, depth
        self.cross_attn = Attention(width, heads)
        self.cross_modal_transformer = Transformer(width, depth, heads, act=act)
        self.ln_pre_t = nn.LayerNorm(width)
        self.ln_pre_i = nn.LayerNorm(width)
        self.ln_post = nn.LayerNorm(width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Initialisation of the reference code: GPT-2 style scaling by depth.
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.depth) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.cross_modal_transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.cross_attn.in_proj_weight, std=attn_std)
        nn.init.normal_(self.cross_attn.out_proj.weight, std=proj_std)

    def forward(self, text_tokens: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) text tokens and (B, N, D) image tokens -> (B, L, D) fused text tokens."""
        image = self.ln_pre_i(image_tokens)
        x = self.cross_attn(self.ln_pre_t(text_tokens), image, image)
        x = self.cross_modal_transformer(x)
        return self.ln_post(x)
