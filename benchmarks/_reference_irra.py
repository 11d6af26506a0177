"""A straightforward IRRA model, written the way a first research implementation is: the peer of our fast one.

Not a benchmark (files starting with "_" are helpers). It is what `train_step.py` and
`tests/test_train_speed.py` compare `xmr.methods.irra.IRRA` against:

* CLIP towers built from `nn.MultiheadAttention` on batch-second (L, B, D) sequences, as in OpenAI's CLIP
  and the IRRA code, with the causal text mask passed as an additive float (L, L) matrix;
* attention called with `need_weights=True` by default (nn.MultiheadAttention's default): the plain
  softmax(QK^T)V path with the attention matrix materialised, no fused kernel (`need_weights=False`
  lets PyTorch dispatch to its fused attention, as OpenAI's code does);
* plain `nn.LayerNorm`, fp32, no autocast, no fusion, a per-parameter (for-loop) optimiser.

The module tree and parameter names equal ours (`nn.MultiheadAttention` has `in_proj_weight`,
`in_proj_bias`, `out_proj.*`), so `ReferenceIRRA.from_ours(model)` loads our state dict unchanged and
both start from identical weights. The losses are the same formulas (`xmr.losses`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from xmr import losses
from xmr.methods.base import ParamRule


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """Pre-LN block on (L, B, D) with nn.MultiheadAttention."""

    def __init__(self, width: int, heads: int, need_weights: bool) -> None:
        super().__init__()
        self.need_weights = need_weights
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=self.need_weights, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, need_weights: bool) -> None:
        super().__init__()
        self.resblocks = nn.Sequential(*[Block(width, heads, need_weights) for _ in range(layers)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class Visual(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, patch: int, stride: int, tokens: int, embed: int,
                 need_weights: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=stride, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(tokens, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, need_weights)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).permute(0, 2, 1)  # (B, N, width)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)  # NLD -> LND
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x) @ self.proj  # every token (IRRA uses the whole sequence)


class CLIP(nn.Module):
    """Image tower `visual` and the text tower at the top level, as OpenAI's model."""

    def __init__(self, cfg, need_weights: bool) -> None:
        super().__init__()
        v, t = cfg.vision, cfg.text
        gh, gw = v.grid_size
        self.eot_token_id = t.eot_token_id
        self.visual = Visual(v.width, v.layers, v.heads, v.patch_size, v.effective_stride, 1 + gh * gw,
                             cfg.embed_dim, need_weights)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.zeros(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, need_weights)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.zeros(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros(()), requires_grad=False)

    def encode_text(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids -> (all projected tokens (B, L, embed), pooled end-of-text feature (B, embed))."""
        L = ids.shape[1]
        mask = torch.full((L, L), float("-inf")).triu(1)  # CLIP's build_attention_mask
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        x = self.transformer(x.permute(1, 0, 2), mask).permute(1, 0, 2)
        tokens = self.ln_final(x) @ self.text_projection
        if self.eot_token_id is None:
            eot = ids.argmax(dim=-1)
        else:  # first end-of-text token (argmax id where a row has none)
            is_eot = ids == self.eot_token_id
            eot = torch.where(is_eot.any(-1), is_eot.int().argmax(-1), ids.argmax(-1))
        return tokens, tokens[torch.arange(ids.shape[0]), eot]


class CrossModalInteraction(nn.Module):
    """IRRA's cross_former: LN(text) attends to LN(image), then a transformer and a LayerNorm."""

    def __init__(self, width: int, depth: int, need_weights: bool) -> None:
        super().__init__()
        heads = max(1, width // 64)
        self.need_weights = need_weights
        self.cross_attn = nn.MultiheadAttention(width, heads)
        self.cross_modal_transformer = Transformer(width, depth, heads, need_weights)
        self.ln_pre_t = nn.LayerNorm(width)
        self.ln_pre_i = nn.LayerNorm(width)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = self.ln_pre_t(text).permute(1, 0, 2)
        kv = self.ln_pre_i(image).permute(1, 0, 2)
        x = self.cross_attn(q, kv, kv, need_weights=self.need_weights)[0]
        x = self.cross_modal_transformer(x).permute(1, 0, 2)
        return self.ln_post(x)


class ReferenceIRRA(nn.Module):
    """sdm + id + mlm (the objective of `xmr.methods.irra.IRRA`) on the plain towers above."""

    def __init__(self, clip_cfg, irra_cfg, need_weights: bool = True, *, num_classes: int = 0,
                 vocab_size: int = 49409) -> None:
        super().__init__()
        self.cfg = irra_cfg
        width = clip_cfg.embed_dim
        self.clip = CLIP(clip_cfg, need_weights)
        if "mlm" in irra_cfg.losses:
            self.fusion = CrossModalInteraction(width, irra_cfg.cmt_depth, need_weights)
            self.mlm_head = nn.Sequential(OrderedDict([
                ("dense", nn.Linear(width, width)), ("gelu", QuickGELU()), ("ln", nn.LayerNorm(width)),
                ("fc", nn.Linear(width, vocab_size))]))
        if "id" in irra_cfg.losses:
            self.classifier = nn.Linear(width, num_classes)
        self.register_buffer("logit_scale", torch.tensor(1.0 / irra_cfg.temperature), persistent=False)

    @classmethod
    def from_ours(cls, model: nn.Module, need_weights: bool = True) -> ReferenceIRRA:
        """A reference model holding a copy of the weights of our `IRRA` model (same keys, strict load)."""
        ref = cls(model.clip.config, model.cfg, need_weights, num_classes=model.num_classes,
                  vocab_size=model.vocab_size)
        ref.load_state_dict(model.state_dict(), strict=True)
        return ref

    def param_rules(self) -> list[ParamRule]:
        return [ParamRule("fusion."), ParamRule("mlm_head."), ParamRule("classifier.")]

    def weight(self, name: str) -> float:
        return self.cfg.weight(name)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns {"total": loss, <part>: weighted part}."""
        image_tokens = self.clip.visual(batch["images"])
        f_i = image_tokens[:, 0]
        _, f_t = self.clip.encode_text(batch["ids"])
        pids = batch["pids"]
        parts: dict[str, torch.Tensor] = {}
        names = self.cfg.losses
        if "itc" in names:
            parts["itc"] = self.weight("itc") * losses.itc_loss(f_i, f_t, self.logit_scale)
        if "sdm" in names:
            parts["sdm"] = self.weight("sdm") * losses.sdm_loss(
                f_i, f_t, pids, self.logit_scale, image_ids=batch.get("image_ids"),
                soft_label_weight=self.cfg.soft_label_weight)
        if "cmpm" in names:
            parts["cmpm"] = self.weight("cmpm") * losses.cmpm_loss(f_i, f_t, pids)
        if "id" in names:
            parts["id"] = self.weight("id") * losses.id_loss(self.classifier(f_i), self.classifier(f_t), pids)
        if "mlm" in names:
            masked, _ = self.clip.encode_text(batch["mlm_ids"])
            logits = self.mlm_head(self.fusion(masked, image_tokens))
            parts["mlm"] = self.weight("mlm") * losses.mlm_loss(logits, batch["mlm_labels"])[0]
        return {"total": sum(parts.values()), **parts}
