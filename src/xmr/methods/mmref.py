"""MMRef: Multi-modal Reference Learning for Fine-grained Text-to-Image Retrieval.

Ma et al., arXiv 2504.07718 (IEEE TMM 2025). Only the abstract and introduction were readable; the forms
marked [ours] follow `shared/spec/mmref.md`'s reconstruction and are config options.

Every training object (identity or class) y has a learnable reference r_y (R: m x d). With E = [f_i; f_t]
the batch's global features and sg the stop-gradient, the objective is

    L = L_align + w_fuse L_fuse + w_lr L_lr + w_rgrl L_rgrl

* L_align: IRRA's SDM (ITC or ID selectable) between the CLIP towers' global features.
* L_fuse (MMRC global fusion) = proxy_softmax(sg(E), R, y, tau_r): references absorb both modalities
  without pulling the encoders [ours: the softmax form of the paper's "Eq. 2"].
* L_lr (MMRC local reconstruction): masked caption tokens, through self-attention, an FFN, cross-attention
  to the object's reference and another FFN, predict the masked words (IRRA's MLM head); the gradient
  reaches R and the text tower [ours: layer order, one reference token].
* L_rgrl (reference-guided representation learning) = proxy_softmax(E, sg(R), y, tau_r), or Proxy-Anchor
  (`rgrl_form: proxy_anchor`) [ours: the mirror of L_fuse]. R learns only from L_fuse and L_lr.

At query time (`ReferenceRefiner`, models/references.py) the top `refine.k` of the first stage are
re-scored with S = (1 - lam) S_init + lam S_ref, S_ref the cosine of the items' centred profiles over the
training references, computed exactly through a d x d factorisation. It uses training references only
(no test-set statistics), and the encoders are IRRA's: an existing index of them can be refined.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from xmr import losses
from xmr.data.transforms import build_transform
from xmr.errors import CheckpointError, ConfigError
from xmr.methods.base import BuildContext, ItemFn, MethodConfig, ParamRule, Transform
from xmr.methods.irra import build_mlm_head, mask_caption, no_extra_fields
from xmr.models.clip import CLIP, CLIPConfig
from xmr.models.fusion import ReferenceReconstruction
from xmr.models.references import PROFILES, ReferenceRefiner
from xmr.outputs import Candidates, Embedded, LossOutput, QueryBatch

LOSS_NAMES = ("sdm", "itc", "id", "fuse", "lr", "rgrl")
ALIGN_LOSSES = ("sdm", "itc", "id")
RGRL_FORMS = ("softmax", "proxy_anchor")
REF_INITS = ("normal", "class_mean")


@dataclass
class RefineConfig:
    """Query-time refinement: re-score the first stage's top `k` with weight `lam` on S_ref (0 = off)."""

    k: int = 100
    lam: float = 0.3
    profile: str = "centered"  # "raw" skips centring the profiles


@dataclass
class MMRefConfig(MethodConfig):
    """MMRef's hyper-parameters (the YAML `method:` section); [ours] defaults as in the spec."""

    name: str = "mmref"
    losses: list[str] = field(default_factory=lambda: ["sdm", "fuse", "lr", "rgrl"])
    sdm_weight: float = 1.0
    itc_weight: float = 1.0
    id_weight: float = 1.0
    fuse_weight: float = 1.0
    lr_weight: float = 1.0
    rgrl_weight: float = 1.0
    temperature: float = 0.02  # tau of SDM / ITC
    ref_temperature: float | None = None  # tau_r of L_fuse / L_rgrl (None: = temperature)
    num_references: int = 0  # m; 0 = the number of training objects (checked against the data when set)
    ref_init: str = "normal"  # normal(0, d^-1/2), or class_mean: mean normalised features per object
    ref_lr_factor: float = 5.0  # references' lr = factor x optim.lr, no weight decay
    lr_depth: int = 1  # local-reconstruction layers
    lr_heads: int | None = None  # None: width / 64
    mlm_probability: float = 0.15
    rgrl_form: str = "softmax"
    proxy_anchor_alpha: float = 32.0
    proxy_anchor_delta: float = 0.1
    soft_label_weight: float | None = None  # SDM soft-label variant (off)
    refine: RefineConfig = field(default_factory=RefineConfig)

    def validate(self) -> None:
        unknown = set(self.losses) - set(LOSS_NAMES)
        if unknown or not self.losses:
            raise ConfigError(f"method.losses={self.losses}: use a non-empty subset of {', '.join(LOSS_NAMES)}")
        if not set(self.losses) & set(ALIGN_LOSSES):
            raise ConfigError(f"method.losses={self.losses} needs an alignment loss ({', '.join(ALIGN_LOSSES)})")
        if self.temperature <= 0 or (self.ref_temperature is not None and self.ref_temperature <= 0):
            raise ConfigError("method.temperature and method.ref_temperature must be positive")
        choices = {"rgrl_form": (self.rgrl_form, RGRL_FORMS), "ref_init": (self.ref_init, REF_INITS),
                   "refine.profile": (self.refine.profile, PROFILES)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"method.{key}={value!r} is not one of {', '.join(allowed)}")
        if self.lr_depth < 1:
            raise ConfigError(f"method.lr_depth={self.lr_depth} must be >= 1")
        if self.refine.k < 0 or not 0.0 <= self.refine.lam <= 1.0:
            raise ConfigError(f"method.refine: k={self.refine.k} must be >= 0 and lam={self.refine.lam} in [0, 1]")
        if self.ref_lr_factor <= 0:
            raise ConfigError(f"method.ref_lr_factor={self.ref_lr_factor} must be positive")

    @property
    def tau_r(self) -> float:
        return float(self.temperature if self.ref_temperature is None else self.ref_temperature)

    def weight(self, name: str) -> float:
        return float(getattr(self, f"{name}_weight"))


class MMRef(nn.Module):
    """CLIP dual encoder + m learnable references + local-reconstruction block and MLM head (training only).

    Implements `Reranker` (refinement of the top `rerank_depth` by the references), `ExplainedReranker`
    (results carry `initial_score` and `reference_score`) and `FullScopeReranker` (exact refinement of the
    whole gallery as a 2d-dim inner-product search).
    """

    name: ClassVar[str] = "mmref"
    Config: ClassVar[type[MMRefConfig]] = MMRefConfig
    tasks: ClassVar[frozenset[str]] = frozenset({"person"})
    query_kinds: ClassVar[frozenset[str]] = frozenset({"text", "image"})
    # `xmr ablation`'s default rows: (name, overrides, refine at test time); the last two share one model
    ablation_rows: ClassVar[tuple[tuple[str, tuple[str, ...], bool], ...]] = (
        ("baseline (sdm)", ("method.losses=[sdm]",), False),
        ("+MMRC (fuse+lr)", ("method.losses=[sdm,fuse,lr]",), False),
        ("+RGRL", ("method.losses=[sdm,fuse,lr,rgrl]",), False),
        ("+RGRL +refinement", ("method.losses=[sdm,fuse,lr,rgrl]",), True),
    )

    def __init__(self, clip: CLIP, cfg: MMRefConfig, *, num_classes: int, vocab_size: int = 49409) -> None:
        super().__init__()
        cfg.validate()
        if num_classes <= 0:
            raise ConfigError("MMRef needs training identities or classes (one reference each); this data has none")
        if cfg.num_references and cfg.num_references != num_classes:
            raise ConfigError(f"method.num_references={cfg.num_references} but the training data has {num_classes} "
                              "identities/classes (0 = take it from the data)")
        self.cfg, self.clip = cfg, clip
        self.num_classes, self.vocab_size = int(num_classes), int(vocab_size)
        width = clip.config.embed_dim
        self.references = nn.Parameter(torch.randn(num_classes, width) * width**-0.5)
        if "lr" in cfg.losses:
            self.lr_block = ReferenceReconstruction(width, depth=cfg.lr_depth, heads=cfg.lr_heads,
                                                    act=clip.config.act)
            self.mlm_head = build_mlm_head(width, vocab_size, cfg.lr_depth)
        if "id" in cfg.losses:
            self.classifier = nn.Linear(width, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.zeros_(self.classifier.bias)
        self.register_buffer("logit_scale", torch.tensor(1.0 / cfg.temperature), persistent=False)
        self.clip.logit_scale.requires_grad_(False)
        self._refiner: tuple[tuple, ReferenceRefiner] | None = None

    @classmethod
    def build(cls, cfg: MMRefConfig, ctx: BuildContext) -> MMRef:
        from xmr.methods.backbone import build_clip

        return cls(build_clip(ctx.backbone, ctx), cfg, num_classes=ctx.num_classes, vocab_size=ctx.vocab_size)

    @property
    def embed_dim(self) -> int:
        return self.clip.config.embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.clip.set_grad_checkpointing(enable)

    # -- inference -------------------------------------------------------------------------------
    def encode_query(self, query: QueryBatch) -> Embedded:
        if query.kind == "composed":
            raise ValueError("MMRef has no composed-query encoder (text-to-image model)")
        if query.kind == "text":
            return Embedded(self.clip.encode_text(query.ids).pooled)
        return Embedded(self.clip.encode_image(query.images).pooled)

    def encode_gallery(self, images: torch.Tensor) -> Embedded:
        return Embedded(self.clip.encode_image(images).pooled)

    def _eval_transform(self) -> Transform:
        return build_transform(False, tuple(self.clip.config.vision.image_size))

    def query_transform(self) -> Transform:
        return self._eval_transform()

    def gallery_transform(self) -> Transform:
        return self._eval_transform()

    # -- refinement (second stage) ---------------------------------------------------------------
    @property
    def rerank_depth(self) -> int:
        return int(self.cfg.refine.k)

    @rerank_depth.setter
    def rerank_depth(self, k: int) -> None:
        self.set_refinement(k=k)

    def set_refinement(self, *, k: int | None = None, lam: float | None = None, profile: str | None = None) -> None:
        """Change the query-time refinement (CLI --refine-k/--refine-lambda, the val grid)."""
        refine = RefineConfig(self.cfg.refine.k if k is None else int(k),
                              self.cfg.refine.lam if lam is None else float(lam),
                              self.cfg.refine.profile if profile is None else profile)
        if refine.k < 0 or not 0.0 <= refine.lam <= 1.0 or refine.profile not in PROFILES:
            raise ConfigError(f"refinement k={refine.k} must be >= 0, lambda={refine.lam} in [0, 1], "
                              f"profile one of {', '.join(PROFILES)}")
        self.cfg.refine = refine

    def refinement_settings(self) -> dict[str, Any]:
        return {"k": self.rerank_depth, "lam": self.cfg.refine.lam, "profile": self.cfg.refine.profile,
                "num_references": self.num_classes, "ref_lr_factor": self.cfg.ref_lr_factor,
                "statistics": "training references only (no test-set statistics)"}

    def refiner(self) -> ReferenceRefiner:
        """The refiner of the current references (its d x d projection recomputed only when R changes)."""
        refs = self.references
        key = (refs.data_ptr(), refs._version, self.cfg.refine.profile)
        if self._refiner is None or self._refiner[0] != key:
            self._refiner = (key, ReferenceRefiner(refs.detach(), k=self.cfg.refine.k, lam=self.cfg.refine.lam,
                                                   profile=self.cfg.refine.profile))
        refiner = self._refiner[1]
        refiner.rerank_depth, refiner.lam = int(self.cfg.refine.k), float(self.cfg.refine.lam)
        return refiner

    def gallery_extras(self) -> tuple[str, ...]:
        return ()

    def prepare_gallery(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.refiner().prepare_gallery(vectors)

    def rerank(self, query: Embedded, candidates: Candidates) -> torch.Tensor:
        return self.refiner().rerank(query, candidates)

    def rerank_explained(self, query: Embedded, candidates: Candidates) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.refiner().rerank_explained(query, candidates)

    def full_scope_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        return self.refiner().full_scope_vectors(vectors)

    # -- training --------------------------------------------------------------------------------
    def item_fn(self, tokenizer: Any) -> ItemFn:
        """Masked captions for local reconstruction (IRRA's masking: 15%, 80/10/10, >= 1 per caption)."""
        if "lr" not in self.cfg.losses:
            return no_extra_fields
        return partial(mask_caption, tokenizer, self.cfg.mlm_probability)

    @torch.no_grad()
    def initialise_from_data(self, batches: Iterable[dict[str, torch.Tensor]]) -> None:
        """`ref_init: class_mean`: each reference = the mean of its object's normalised image and text
        features under the initial encoders (objects without a batch keep their random init)."""
        if self.cfg.ref_init != "class_mean":
            return
        sums = torch.zeros_like(self.references, dtype=torch.float32)
        counts = torch.zeros(self.num_classes)
        was_training = self.training
        self.eval()
        for batch in batches:
            f_i = F.normalize(self.clip.encode_image(batch["images"]).pooled.float(), dim=-1)
            f_t = F.normalize(self.clip.encode_text(batch["ids"]).pooled.float(), dim=-1)
            pids = batch["pids"].long()
            sums.index_add_(0, pids, f_i + f_t)
            counts.index_add_(0, pids, torch.full((len(pids),), 2.0))
        seen = counts > 0
        self.references.data[seen] = (sums[seen] / counts[seen, None]).to(self.references.dtype)
        self.train(was_training)

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        cfg = self.cfg
        image_out = self.clip.encode_image(batch["images"])
        f_i, f_t = image_out.pooled.float(), self.clip.encode_text(batch["ids"]).pooled.float()
        pids = batch["pids"].long()
        parts: dict[str, torch.Tensor] = {}
        metrics: dict[str, float] = {}
        if "sdm" in cfg.losses:
            parts["sdm"] = cfg.weight("sdm") * losses.sdm_loss(
                f_i, f_t, pids, self.logit_scale, image_ids=batch.get("image_ids"),
                soft_label_weight=cfg.soft_label_weight)
        if "itc" in cfg.losses:
            parts["itc"] = cfg.weight("itc") * losses.itc_loss(f_i, f_t, self.logit_scale)
        if "id" in cfg.losses:
            parts["id"] = cfg.weight("id") * losses.id_loss(self.classifier(f_i), self.classifier(f_t), pids)
        feats, labels = torch.cat([f_i, f_t]), torch.cat([pids, pids])
        refs = self.references.float()
        if "fuse" in cfg.losses:
            parts["fuse"] = cfg.weight("fuse") * losses.proxy_softmax_loss(feats.detach(), refs, labels, cfg.tau_r)
        if "rgrl" in cfg.losses:
            if cfg.rgrl_form == "proxy_anchor":
                rgrl = losses.proxy_anchor_loss(feats, refs.detach(), labels, cfg.proxy_anchor_alpha,
                                                cfg.proxy_anchor_delta)
            else:
                rgrl = losses.proxy_softmax_loss(feats, refs.detach(), labels, cfg.tau_r)
            parts["rgrl"] = cfg.weight("rgrl") * rgrl
        if "lr" in cfg.losses:
            masked_ids = batch["mlm_ids"]
            tokens = self.clip.encode_text(masked_ids).tokens
            memory = self.references[pids].unsqueeze(1).to(tokens.dtype)  # (B, 1, d): the object's reference
            out = self.lr_block(tokens, memory, padding=masked_ids == 0)
            lr, acc = losses.mlm_loss(self.mlm_head(out).float(), batch["mlm_labels"])
            parts["recon"] = cfg.weight("lr") * lr  # logged as "recon": "lr" is the learning rate's column
            metrics["lr_acc"] = float(acc)
        with torch.no_grad():  # how well the references classify the batch (both modalities)
            logits = F.normalize(feats.detach(), dim=-1) @ F.normalize(refs.detach(), dim=-1).t()
            metrics["ref_acc"] = (logits.argmax(-1) == labels).float().mean().item()
        total = torch.stack(list(parts.values())).sum()
        return LossOutput(total=total, parts=parts, metrics=metrics)

    def param_rules(self) -> list[ParamRule]:
        """References: own lr factor, no weight decay; new heads at `optim.new_module_lr_factor`."""
        return [ParamRule("references", lr_factor=self.cfg.ref_lr_factor, weight_decay=0.0),
                ParamRule("lr_block."), ParamRule("mlm_head."), ParamRule("classifier.")]

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        refs = state_dict.get("references") if isinstance(state_dict, Mapping) else None
        if refs is not None and tuple(refs.shape) != tuple(self.references.shape):
            raise CheckpointError(
                f"the checkpoint holds {refs.shape[0]} MMRef references of width {refs.shape[1]}, this model "
                f"{self.references.shape[0]} x {self.references.shape[1]}: the training identities/classes differ "
                "(same data set and split are needed to resume or fine-tune the references)")
        self._refiner = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def export_config(self) -> dict[str, Any]:
        return {"method": self.name, "clip": self.clip.config.to_dict(), "config": asdict(self.cfg),
                "num_classes": self.num_classes, "vocab_size": self.vocab_size}

    @classmethod
    def from_exported(cls, exported: dict[str, Any]) -> MMRef:
        try:
            raw = dict(exported["config"])
            raw["refine"] = RefineConfig(**raw.get("refine", {}))
            cfg = cls.Config(**raw)
            clip = CLIP(CLIPConfig.from_dict(exported["clip"]))
            num_classes = int(exported["num_classes"])
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"the checkpoint's MMRef config is not readable ({err})") from None
        return cls(clip, cfg, num_classes=num_classes, vocab_size=int(exported.get("vocab_size", 49409)))
