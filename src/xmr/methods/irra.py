"""IRRA: Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image Person Retrieval.

Jiang & Ye, CVPR 2023 (arXiv 2303.12501). The objective is
    L = w_sdm * SDM(f_i, f_t) + w_id * ID(f_i, f_t) + w_mlm * IRR(masked text, image tokens)      (Eq. 9)
with SDM the similarity distribution matching loss (Eq. 4-6), ID a shared identity classifier on both
modalities, and IRR the masked-language modelling of the caption through a cross-modal interaction
encoder (Eq. 1-3). The CLIP baselines of the paper are available as the `itc` (and `cmpm`) losses.
Inference uses only the global features of the two CLIP towers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from xmr import losses
from xmr.models.clip import CLIP, QuickGELU
from xmr.models.fusion import CrossModalInteraction
from xmr.outputs import LossOutput

LOSS_NAMES = ("sdm", "id", "mlm", "itc", "cmpm")


@dataclass
class IRRAConfig:
    losses: list[str] = field(default_factory=lambda: ["sdm", "id", "mlm"])
    weights: dict[str, float] = field(default_factory=dict)  # missing names weigh 1.0
    temperature: float = 0.02
    num_classes: int = 0  # training identities (needed by the id loss)
    vocab_size: int = 49409  # MLM output size: CLIP vocabulary + the added mask token
    cmt_depth: int = 4
    soft_label_weight: float | None = None

    def __post_init__(self) -> None:
        unknown = set(self.losses) - set(LOSS_NAMES)
        if unknown:
            raise ValueError(f"unknown IRRA losses {sorted(unknown)}; choose from {LOSS_NAMES}")
        if "id" in self.losses and self.num_classes <= 0:
            raise ValueError("the id loss needs num_classes > 0 (number of training identities)")


def build_mlm_head(width: int, vocab_size: int, depth: int) -> nn.Sequential:
    head = nn.Sequential(OrderedDict([
        ("dense", nn.Linear(width, width)),
        ("gelu", QuickGELU()),
        ("ln", nn.LayerNorm(width)),
        ("fc", nn.Linear(width, vocab_size)),
    ]))
    nn.init.normal_(head.dense.weight, std=(2 * width) ** -0.5)
    nn.init.normal_(head.fc.weight, std=width**-0.5 * (2 * depth) ** -0.5)
    return head


class IRRA(nn.Module):
    """CLIP dual encoder + (optional) cross-modal MLM head + (optional) identity classifier."""

    name = "irra"

    def __init__(self, clip: CLIP, cfg: IRRAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        width = clip.config.embed_dim
        if "mlm" in cfg.losses:
            self.fusion = CrossModalInteraction(width, depth=cfg.cmt_depth, act=clip.config.act)
            self.mlm_head = build_mlm_head(width, cfg.vocab_size, cfg.cmt_depth)
            # Follow the towers' setting (`model.grad_checkpointing` is applied to the CLIP before this).
            self.fusion.cross_modal_transformer.grad_checkpointing = clip.visual.transformer.grad_checkpointing
        if "id" in cfg.losses:
            self.classifier = nn.Linear(width, cfg.num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
        self.register_buffer("logit_scale", torch.tensor(1.0 / cfg.temperature), persistent=False)
        # IRRA keeps the temperature fixed: CLIP's learnt scale stays as loaded (and DDP sees no unused grad).
        self.clip.logit_scale.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer block activations in the backward pass (both towers and the fusion encoder)."""
        self.clip.set_grad_checkpointing(enable)
        if hasattr(self, "fusion"):
            self.fusion.cross_modal_transformer.grad_checkpointing = enable

    # -- inference -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images).pooled

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(ids).pooled

    # -- training --------------------------------------------------------------------------------
    def weight(self, name: str) -> float:
        return float(self.cfg.weights.get(name, 1.0))

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        image_out = self.clip.encode_image(batch["images"])
        text_out = self.clip.encode_text(batch["ids"])
        f_i, f_t = image_out.pooled.float(), text_out.pooled.float()
        pids = batch["pids"]
        parts: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        if "itc" in self.cfg.losses:
            parts["itc"] = self.weight("itc") * losses.itc_loss(f_i, f_t, self.logit_scale)
        if "sdm" in self.cfg.losses:
            parts["sdm"] = self.weight("sdm") * losses.sdm_loss(
                f_i, f_t, pids, self.logit_scale,
                image_ids=batch.get("image_ids"), soft_label_weight=self.cfg.soft_label_weight)
        if "cmpm" in self.cfg.losses:
            parts["cmpm"] = self.weight("cmpm") * losses.cmpm_loss(f_i, f_t, pids)
        if "id" in self.cfg.losses:
            logits_i, logits_t = self.classifier(f_i), self.classifier(f_t)
            parts["id"] = self.weight("id") * losses.id_loss(logits_i, logits_t, pids)
            metrics["img_acc"] = (logits_i.argmax(-1) == pids).float().mean().item()
            metrics["txt_acc"] = (logits_t.argmax(-1) == pids).float().mean().item()
        if "mlm" in self.cfg.losses:
            masked = self.clip.encode_text(batch["mlm_ids"]).tokens
            fused = self.fusion(masked, image_out.tokens)
            logits = self.mlm_head(fused)
            mlm, acc = losses.mlm_loss(logits.float(), batch["mlm_labels"])
            parts["mlm"] = self.weight("mlm") * mlm
            metrics["mlm_acc"] = float(acc)
        total = torch.stack(list(parts.values())).sum()
        return LossOutput(total=total, parts=parts, metrics=metrics)

    def new_module_prefixes(self) -> tuple[str, ...]:
        return ("fusion.", "mlm_head.", "classifier.")

    def export_config(self) -> dict[str, Any]:
        return {"method": self.name, "clip": self.clip.config.to_dict(), "irra": asdict(self.cfg)}

    @classmethod
    def from_exported(cls, config: dict[str, Any]) -> IRRA:
        from xmr.models.clip import CLIPConfig

        return cls(CLIP(CLIPConfig.from_dict(config["clip"])), IRRAConfig(**config["irra"]))
