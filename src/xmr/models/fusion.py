"""Cross-attention blocks: IRRA's cross-modal interaction encoder (text tokens attend to image tokens, then
self-attend) and MMRef's local reconstruction (masked caption tokens attend to the object's reference)."""

from __future__ import annotations

import torch
from torch import nn

from xmr.models.clip import Attention, LayerNorm, Transformer, make_activation


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


class ReferenceReconstructionLayer(nn.Module):
    """One layer of MMRef's local reconstruction (our reading of H = FFN2(MCA(FFN1(MSA(Q)), K, V))).

    Pre-LN residual sub-layers: x += MSA(LN x); x += FFN1(LN x); x += MCA(LN x, LN mem); x += FFN2(LN x).
    `mem` (B, T, D) are the reference tokens the masked caption reads its missing details from.
    """

    def __init__(self, width: int, heads: int, act: str = "quick_gelu") -> None:
        super().__init__()
        def ffn() -> nn.Sequential:
            return nn.Sequential(nn.Linear(width, 4 * width), make_activation(act), nn.Linear(4 * width, width))

        self.ln_self, self.self_attn = LayerNorm(width), Attention(width, heads)
        self.ln_ffn1, self.ffn1 = LayerNorm(width), ffn()
        self.ln_cross, self.ln_mem, self.cross_attn = LayerNorm(width), LayerNorm(width), Attention(width, heads)
        self.ln_ffn2, self.ffn2 = LayerNorm(width), ffn()

    def forward(self, x: torch.Tensor, mem: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.ln_self(x), key_padding_mask=padding)
        x = x + self.ffn1(self.ln_ffn1(x))
        m = self.ln_mem(mem)
        x = x + self.cross_attn(self.ln_cross(x), m, m)
        return x + self.ffn2(self.ln_ffn2(x))


class ReferenceReconstruction(nn.Module):
    """`depth` ReferenceReconstructionLayers and a final LayerNorm: (B, L, D) tokens, (B, T, D) memory -> (B, L, D)."""

    def __init__(self, width: int, depth: int = 1, heads: int | None = None, act: str = "quick_gelu") -> None:
        super().__init__()
        heads = heads or max(1, width // 64)
        self.layers = nn.ModuleList(ReferenceReconstructionLayer(width, heads, act) for _ in range(depth))
        self.ln_post = LayerNorm(width)

    def forward(self, tokens: torch.Tensor, mem: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        x = tokens
        for layer in self.layers:
            x = layer(x, mem, padding)
        return self.ln_post(x)
