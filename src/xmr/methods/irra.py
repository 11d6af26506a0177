"""IRRA: Cross-Modal Implicit Relation Reasoning and Aligning for Text-to-Image Person Retrieval.

Jiang & Ye, CVPR 2023 (arXiv 2303.12501). The objective is
    L = w_sdm * SDM(f_i, f_t) + w_id * ID(f_i, f_t) + w_mlm * IRR(masked text, image tokens)      (Eq. 9)
with SDM the similarity distribution matching loss (Eq. 4-6), ID a shared identity classifier on both
modalities, and IRR the masked-language modelling of the caption through a cross-modal interaction
encoder (Eq. 1-3). The CLIP baselines of the paper are available as the `itc` (and `cmpm`) losses.
Inference uses only the global features of the two CLIP towers (one stage: no re-ranking).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from xmr import losses
from xmr.data.records import ImageText
from xmr.data.transforms import build_transform
from xmr.errors import CheckpointError, ConfigError
from xmr.methods.base import BuildContext, ItemFn, MethodConfig, ParamRule, Transform
from xmr.models.clip import CLIP, CLIPConfig, QuickGELU
from xmr.models.fusion import CrossModalInteraction
from xmr.outputs import Embedded, LossOutput, QueryBatch

LOSS_NAMES = ("sdm", "id", "mlm", "itc", "cmpm")


@dataclass
class IRRAConfig(MethodConfig):
    """IRRA's hyper-parameters (the YAML `method:` section); defaults are the paper's (Sec. 4.1)."""

    name: str = "irra"
    losses: list[str] = field(default_factory=lambda: ["sdm", "id", "mlm"])  # `[itc]`: the CLIP baseline
    sdm_weight: float = 1.0
    id_weight: float = 1.0
    mlm_weight: float = 1.0
    itc_weight: float = 1.0
    cmpm_weight: float = 1.0
    temperature: float = 0.02  # fixed tau of the SDM / ITC losses (logit scale 1/tau)
    cmt_depth: int = 4  # layers of the cross-modal interaction encoder
    mlm_probability: float = 0.15  # caption tokens masked for implicit relation reasoning
    soft_label_weight: float | None = None  # SDM soft-label variant (reference code: 0.3; ours: off)

    def validate(self) -> None:
        unknown = set(self.losses) - set(LOSS_NAMES)
        if unknown or not self.losses:
            raise ConfigError(f"method.losses={self.losses}: use a non-empty subset of {', '.join(LOSS_NAMES)}")
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature={self.temperature} must be positive")
        if self.cmt_depth < 1:
            raise ConfigError(f"method.cmt_depth={self.cmt_depth} must be >= 1")
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise ConfigError(f"method.mlm_probability={self.mlm_probability} must be in [0, 1]")

    def weight(self, name: str) -> float:
        return float(getattr(self, f"{name}_weight"))


def mask_caption(tokenizer: Any, probability: float, record: ImageText,
                 fields: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IRRA's masked caption: MLM ids and labels of the item's (L,) token ids (draws from torch's RNG)."""
    from xmr.text.tokenizer import mask_tokens

    ids = fields["ids"]
    masked, labels = mask_tokens(ids.unsqueeze(0), mask_id=tokenizer.mask_id, vocab_size=tokenizer.vocab_size,
                                 special_ids=tokenizer.special_ids, prob=probability)
    return {"mlm_ids": masked[0].reshape(ids.shape).long(), "mlm_labels": labels[0].reshape(ids.shape).long()}


def no_extra_fields(record: ImageText, fields: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {}


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
    """CLIP dual encoder + (optional) cross-modal MLM head + (optional) identity classifier.

    num_classes: training identities (the id loss's classifier); vocab_size: the MLM head's output size
    (the tokenizer's vocabulary including the added mask token).
    """

    name: ClassVar[str] = "irra"
    Config: ClassVar[type[IRRAConfig]] = IRRAConfig
    tasks: ClassVar[frozenset[str]] = frozenset({"person", "image_text"})
    query_kinds: ClassVar[frozenset[str]] = frozenset({"text", "image"})

    def __init__(self, clip: CLIP, cfg: IRRAConfig, *, num_classes: int = 0, vocab_size: int = 49409) -> None:
        super().__init__()
        cfg.validate()
        if "id" in cfg.losses and num_classes <= 0:
            raise ConfigError("the id loss needs training identities (num_classes > 0); this data has none: "
                              "drop 'id' from method.losses")
        self.cfg = cfg
        self.num_classes, self.vocab_size = int(num_classes), int(vocab_size)
        self.clip = clip
        width = clip.config.embed_dim
        if "mlm" in cfg.losses:
            self.fusion = CrossModalInteraction(width, depth=cfg.cmt_depth, act=clip.config.act)
            self.mlm_head = build_mlm_head(width, vocab_size, cfg.cmt_depth)
            # Follow the towers' setting (`model.grad_checkpointing` is applied to the CLIP before this).
            self.fusion.cross_modal_transformer.grad_checkpointing = clip.visual.transformer.grad_checkpointing
        if "id" in cfg.losses:
            self.classifier = nn.Linear(width, num_classes)
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

    @classmethod
    def build(cls, cfg: IRRAConfig, ctx: BuildContext) -> IRRA:
        from xmr.methods.backbone import build_clip

        return cls(build_clip(ctx.backbone, ctx), cfg, num_classes=ctx.num_classes, vocab_size=ctx.vocab_size)

    @property
    def embed_dim(self) -> int:
        return self.clip.config.embed_dim

    # -- inference -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images).pooled

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(ids).pooled

    def encode_query(self, query: QueryBatch) -> Embedded:
        """Text queries by the text tower, image queries (i2i, i2t) by the image tower."""
        if query.kind == "composed":
            raise ValueError("IRRA has no composed-query encoder (text-to-image model)")
        if query.kind == "text":
            return Embedded(self.encode_text(query.ids))
        return Embedded(self.encode_image(query.images))

    def encode_gallery(self, images: torch.Tensor) -> Embedded:
        return Embedded(self.encode_image(images))

    def _eval_transform(self) -> Transform:
        return build_transform(False, tuple(self.clip.config.vision.image_size))

    def query_transform(self) -> Transform:
        return self._eval_transform()

    def gallery_transform(self) -> Transform:
        return self._eval_transform()

    # -- training --------------------------------------------------------------------------------
    def weight(self, name: str) -> float:
        return self.cfg.weight(name)

    def item_fn(self, tokenizer: Any) -> ItemFn:
        """MLM masking of each caption when the mlm loss is on (IRRA's implicit relation reasoning)."""
        if "mlm" not in self.cfg.losses:
            return no_extra_fields
        return partial(mask_caption, tokenizer, self.cfg.mlm_probability)

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

    def param_rules(self) -> list[ParamRule]:
        """The randomly initialised modules train at `optim.new_module_lr_factor` x the lr (paper: 5x)."""
        return [ParamRule("fusion."), ParamRule("mlm_head."), ParamRule("classifier.")]

    def export_config(self) -> dict[str, Any]:
        return {"method": self.name, "clip": self.clip.config.to_dict(), "config": asdict(self.cfg),
                "num_classes": self.num_classes, "vocab_size": self.vocab_size}

    @classmethod
    def from_exported(cls, exported: dict[str, Any]) -> IRRA:
        try:
            cfg = cls.Config(**exported["config"])
            clip = CLIP(CLIPConfig.from_dict(exported["clip"]))
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"the checkpoint's IRRA config is not readable ({err})") from None
        return cls(clip, cfg, num_classes=int(exported.get("num_classes", 0)),
                   vocab_size=int(exported.get("vocab_size", 49409)))
