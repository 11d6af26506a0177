"""CLIP image and text towers (Radford et al., 2021) with OpenAI's parameter names.

Networks only: tensors in, tensors out, no file I/O (checkpoint loading lives in `checkpoints.py`).
Differences from the OpenAI reference that matter for retrieval work:
- images may be non-square and the patch stride may be smaller than the patch (overlapping patches);
- both towers return the whole projected token sequence (`EncoderOutput.tokens`, after the final
  LayerNorm and projection) as well as the pooled global feature;
- attention runs through `torch.nn.functional.scaled_dot_product_attention`.
`CLIP.state_dict()` keys equal OpenAI's exactly, so OpenAI / open_clip weights load without renaming.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from xmr.errors import ConfigError
from xmr.outputs import EncoderOutput

ACTIVATIONS = ("quick_gelu", "gelu")


# -- configuration ---------------------------------------------------------------------------------
def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys with the dotted name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {[prefix + k for k in unknown]}; valid: {sorted(names)}"
        )
    return cls(**data)


def _check_width_heads(width: int, heads: int, where: str) -> None:
    if width <= 0 or heads <= 0 or width % heads:
        raise ConfigError(f"{where}: width {width} must be a positive multiple of heads {heads}")


@dataclass
class VisionConfig:
    """Vision tower: image_size is (H, W); stride None means stride = patch_size (no overlap)."""

    image_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    stride: int | None = None
    width: int = 768
    layers: int = 12
    heads: int = 12

    def __post_init__(self) -> None:
        size = self.image_size
        # YAML/JSON give lists and a bare int means a square image.
        self.image_size = (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(self.image_size) != 2:
            raise ConfigError(f"vision.image_size must be (H, W), got {size!r}")
        if self.stride is not None and self.stride <= 0:
            raise ConfigError(f"vision.stride must be positive, got {self.stride}")
        if min(self.image_size) < self.patch_size:
            raise ConfigError(
                f"vision.image_size {self.image_size} is smaller than patch_size {self.patch_size}"
            )
        _check_width_heads(self.width, self.heads, "vision")

    @property
    def effective_stride(self) -> int:
        return self.stride or self.patch_size

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along (H, W): (size - patch) // stride + 1."""
        s = self.effective_stride
        return tuple((n - self.patch_size) // s + 1 for n in self.image_size)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["image_size"] = list(self.image_size)  # YAML safe_dump cannot write tuples
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        return _from_dict(cls, data, "vision")


@dataclass
class TextConfig:
    """Text tower: causal transformer pooled at the end-of-text token (argmax id if eot_token_id is None)."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    eot_token_id: int | None = 49407

    def __post_init__(self) -> None:
        _check_width_heads(self.width, self.heads, "text")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TextConfig:
        return _from_dict(cls, data, "text")


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    act: str = "quick_gelu"
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig.from_dict(self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig.from_dict(self.text)
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "embed_dim": self.embed_dim,
            "vision": self.vision.to_dict(),
            "text": self.text.to_dict(),
            "act": self.act,
            "logit_scale_init": self.logit_scale_init,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPConfig:
        return _from_dict(cls, data, "")


def _openai(patch: int, width: int, layers: int, text_width: int, text_layers: int, embed: int) -> CLIPConfig:
    # OpenAI's ViTs use 64-dimensional heads in both towers.
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(patch_size=patch, width=width, layers=layers, heads=width // 64),
        text=TextConfig(width=text_width, layers=text_layers, heads=text_width // 64),
    )


CLIP_CONFIGS: dict[str, CLIPConfig] = {
    "ViT-B/16": _openai(16, 768, 12, 512, 12, 512),
    "ViT-B/32": _openai(32, 768, 12, 512, 12, 512),
    "ViT-L/14": _openai(14, 1024, 24, 768, 12, 768),
    # Unit tests: a few thousand parameters, runs in milliseconds.
    "tiny": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=(64, 32), patch_size=16, width=64, layers=2, heads=2),
        text=TextConfig(context_length=32, vocab_size=1000, width=64, layers=2, heads=2, eot_token_id=None),
    ),
    # CPU-trainable demo; vocab_size / eot_token_id are placeholders set from the tokenizer at build time.
    "demo": CLIPConfig(
        embed_dim=256,
        vision=VisionConfig(image_size=(192, 64), patch_size=16, width=256, layers=4, heads=4),
        text=TextConfig(context_length=64, vocab_size=4096, width=256, layers=4, heads=4, eot_token_id=None),
    ),
}


def _apply_override(cfg: CLIPConfig, key: str, value: Any) -> None:
    target: Any = cfg
    *path, name = key.split(".")
    for part in path:
        target = getattr(target, part, None)
        if not is_dataclass(target):
            raise ConfigError(f"unknown CLIP config override {key!r}")
    valid = {f.name for f in fields(target)}
    if name not in valid:
        raise ConfigError(f"unknown CLIP config override {key!r}; valid at this level: {sorted(valid)}")
    current = getattr(target, name)
    if is_dataclass(current) and isinstance(value, dict):  # e.g. vision={"layers": 4}: merge
        for sub_key, sub_value in value.items():
            _apply_override(cfg, f"{key}.{sub_key}", sub_value)
        return
    setattr(target, name, value)


def get_clip_config(name_or_dict: str | dict[str, Any] | CLIPConfig, **overrides: Any) -> CLIPConfig:
    """A fresh CLIPConfig from a preset name, a `to_dict()` dict or a config, with overrides applied.

    Overrides use dotted keys for nested fields (`**{"vision.layers": 4}`) or mappings
    (`vision={"layers": 4}`); every field is validated again afterwards.
    """
    if isinstance(name_or_dict, CLIPConfig):
        cfg = copy.deepcopy(name_or_dict)
    elif isinstance(name_or_dict, dict):
        cfg = CLIPConfig.from_dict(copy.deepcopy(name_or_dict))
    elif name_or_dict in CLIP_CONFIGS:
        cfg = copy.deepcopy(CLIP_CONFIGS[name_or_dict])
    else:
        raise ConfigError(f"unknown CLIP preset {name_or_dict!r}; choose from {sorted(CLIP_CONFIGS)}")
    for key, value in overrides.items():
        _apply_override(cfg, key, value)
    # Re-run validation (and list -> tuple coercion) on the edited copy.
    return CLIPConfig.from_dict(cfg.to_dict())


# -- building blocks -------------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (as in OpenAI CLIP, safe in fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(act: str) -> nn.Module:
    if act == "quick_gelu":
        return QuickGELU()
    if act == "gelu":
        return nn.GELU()
    raise ConfigError(f"unknown activation {act!r}; choose from {ACTIVATIONS}")


# Under torch.compile on CPU, inference attention runs as two batched matmuls around an fp32 softmax that
# inductor fuses with the scaling, masking and casts: the bf16 matmuls then use the CPU's matrix units,
# which SDPA's CPU flash kernel does not. Measured on ViT-B/16 at 384x128, batch 64, bf16 (2 cores):
# attention took 20% of the compiled forward with SDPA, about 10% this way (benchmarks/encode.py). Eager
# runs keep SDPA, which wins there (it never writes the fp32 score matrix).
EXPLICIT_COMPILED_ATTENTION = True


def _compiling_cpu_inference(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and not x.requires_grad and torch.compiler.is_compiling()


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v on (B, heads, L|S, d) tensors; the softmax is computed in fp32."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    scores = scores.float() if mask is None else scores.float() + mask
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Batch-first multi-head attention with nn.MultiheadAttention's parameter names.

    Self-attention when `key`/`value` are None, cross-attention otherwise. `attn_mask` follows
    nn.MultiheadAttention: a bool mask is True where attention is NOT allowed, a float mask is added
    to the scores; shape (L, S), (B, L, S) (shared by all heads, unlike nn.MultiheadAttention's
    (B*heads, L, S)) or (B, heads, L, S). `key_padding_mask` (B, S) is True at padded keys.
    `is_causal` masks future positions (query i sees keys 0..i); it combines with the masks.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        _check_width_heads(width, heads, "Attention")
        self.width, self.heads = width, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's defaults
        nn.init.zeros_(self.out_proj.bias)

    def _project(self, query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None):
        if key is None and value is None:  # one matmul for q, k and v
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        key = query if key is None else key
        value = key if value is None else value
        w, b = self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)
        return F.linear(query, w[0], b[0]), F.linear(key, w[1], b[1]), F.linear(value, w[2], b[2])

    def _sdpa_mask(self, attn_mask, key_padding_mask, is_causal, L, S, dtype, device) -> torch.Tensor | None:
        """Merge the masks into one additive float mask broadcastable to (B, heads, L, S)."""
        mask = None
        if attn_mask is not None:
            mask = attn_mask if attn_mask.dim() != 3 else attn_mask.unsqueeze(1)
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(mask, float("-inf"))
            mask = mask.to(dtype)
        if key_padding_mask is not None:
            pad = torch.zeros(key_padding_mask.shape, dtype=dtype, device=device)
            pad = pad.masked_fill(key_padding_mask.bool(), float("-inf"))[:, None, None, :]
            mask = pad if mask is None else mask + pad
        if is_causal:
            future = torch.ones(L, S, dtype=torch.bool, device=device).triu(1)
            causal = torch.zeros(L, S, dtype=dtype, device=device).masked_fill(future, float("-inf"))
            mask = causal if mask is None else mask + causal
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, D) queries and optional (B, S, D) keys/values -> (B, L, D)."""
        q, k, v = self._project(query, key, value)
        B, L, _ = q.shape
        S = k.shape[1]
        q, k, v = (t.reshape(B, -1, self.heads, self.width // self.heads).transpose(1, 2) for t in (q, k, v))
        # CPU training: the math backend's backward beats the flash kernel's on these short sequences (the
        # demo IRRA step took 1.36 vs 1.76 CPU-s, torch 2.13, same for ViT-B/16); inference keeps flash.
        backend = sdpa_kernel(SDPBackend.MATH) if q.requires_grad and q.device.type == "cpu" else nullcontext()
        with backend:
            return self.out_proj(self._attend(q, k, v, attn_mask, key_padding_mask, is_causal, B, L, S))

    def _attend(self, q, k, v, attn_mask, key_padding_mask, is_causal: bool, B: int, L: int, S: int) -> torch.Tensor:
        """SDPA on (B, heads, L|S, head_dim) tensors -> (B, L, width)."""
        if EXPLICIT_COMPILED_ATTENTION and _compiling_cpu_inference(q):
            mask = self._sdpa_mask(attn_mask, key_padding_mask, is_causal and L > 1, L, S, torch.float32, q.device)
            return explicit_attention(q, k, v, mask).transpose(1, 2).reshape(B, L, self.width)
        if attn_mask is None and key_padding_mask is None:
            # Fast path: SDPA's own causal kernel (top-left aligned, i.e. query i sees keys <= i).
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal and L > 1)
        else:
            mask = self._sdpa_mask(attn_mask, key_padding_mask, is_causal, L, S, q.dtype, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, L, self.width)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) with a 4x wide MLP."""

    def __init__(self, width: int, heads: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, width * 4)),
                    ("gelu", make_activation(act)),
                    ("c_proj", nn.Linear(width * 4, width)),
                ]
            )
        )

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of ResidualAttentionBlocks on (B, L, D) sequences (`resblocks.N.*` like OpenAI)."""

    def __init__(self, width: int, layers: int, heads: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self.width, self.layers, self.heads = width, layers, heads
        self.grad_checkpointing = False
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, act) for _ in range(layers)])

    def init_weights(self) -> None:
        """OpenAI CLIP's init: GPT-2 style scaling of the residual projections by depth."""
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(
        self, x: torch.Tensor, is_causal: bool = False, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # Recompute activations in the backward pass only when it saves memory: training with grads.
        use_ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.resblocks:
            if use_ckpt:
                x = checkpoint(block, x, attn_mask, is_causal, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
        return x


# -- towers ----------------------------------------------------------------------------------------
class VisionTransformer(nn.Module):
    """ViT image tower: (B, 3, H, W) -> EncoderOutput(tokens (B, 1+N, embed), pooled = class token)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.effective_stride, bias=False)
        gh, gw = cfg.grid_size
        scale = width**-0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + gh * gw, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, act)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        self.transformer.init_weights()

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.cfg.grid_size

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.cfg.image_size:
            raise ValueError(
                f"expected images (B, 3, {self.cfg.image_size[0]}, {self.cfg.image_size[1]}), "
                f"got {tuple(images.shape)}; resize them or build the model for this size"
            )
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, width), row-major over the grid
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        # ln_post and proj apply to every token, not only the class token (IRRA uses the whole sequence).
        tokens = self.ln_post(x) @ self.proj
        return EncoderOutput(tokens=tokens, pooled=tokens[:, 0])


class _TextTower(nn.Module):
    """Text tower parameters and forward, shared by TextTransformer and CLIP (which keeps them top-level)."""

    def _build_text(self, cfg: TextConfig, embed_dim: int, act: str) -> None:
        self.text_cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, act)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        self.transformer.init_weights()

    def _eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """First end-of-text position per row; rows without one fall back to the argmax id (CLIP's rule)."""
        fallback = ids.argmax(dim=-1)
        eot = self.text_cfg.eot_token_id
        if eot is None:
            return fallback
        is_eot = ids == eot
        first = is_eot.int().argmax(dim=-1)  # argmax returns the first maximal index
        return torch.where(is_eot.any(dim=-1), first, fallback)

    def _forward_text(self, ids: torch.Tensor) -> EncoderOutput:
        if ids.dim() != 2 or ids.shape[1] > self.text_cfg.context_length:
            raise ValueError(
                f"expected token ids (B, L) with L <= {self.text_cfg.context_length}, got {tuple(ids.shape)}"
            )
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.ln_final(self.transformer(x, is_causal=True))
        tokens = x @ self.text_projection
        pooled = tokens[torch.arange(tokens.shape[0], device=ids.device), self._eot_positions(ids)]
        return EncoderOutput(tokens=tokens, pooled=pooled)

    def _resize_token_embedding(self, new_vocab: int) -> None:
        old = self.token_embedding
        if new_vocab < old.num_embeddings:
            raise ValueError(
                f"resize_token_embedding only grows the vocabulary ({old.num_embeddings} -> {new_vocab})"
            )
        new = nn.Embedding(new_vocab, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            nn.init.normal_(new.weight, std=0.02)
            new.weight[: old.num_embeddings] = old.weight
        new.weight.requires_grad_(old.weight.requires_grad)
        self.token_embedding = new
        self.text_cfg.vocab_size = new_vocab


class TextTransformer(_TextTower):
    """Causal text tower: (B, L) ids -> EncoderOutput(tokens (B, L, embed), pooled = end-of-text token)."""

    def __init__(self, cfg: TextConfig, embed_dim: int, act: str = "quick_gelu") -> None:
        super().__init__()
        self._build_text(cfg, embed_dim, act)

    def forward(self, ids: torch.Tensor) -> EncoderOutput:
        return self._forward_text(ids)

    def resize_token_embedding(self, new_vocab: int) -> None:
        self._resize_token_embedding(new_vocab)


class CLIP(_TextTower):
    """Dual encoder. `visual` is the image tower; the text tower's parameters sit at the top level
    (token_embedding, positional_embedding, transformer, ln_final, text_projection) as in OpenAI's model.
    """

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.config = copy.deepcopy(cfg)
        self.visual = VisionTransformer(self.config.vision, cfg.embed_dim, cfg.act)
        self._build_text(self.config.text, cfg.embed_dim, cfg.act)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))

    def encode_image(self, images: torch.Tensor) -> EncoderOutput:
        return self.visual(images)

    def encode_text(self, ids: torch.Tensor) -> EncoderOutput:
        return self._forward_text(ids)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[EncoderOutput, EncoderOutput]:
        return self.encode_image(images), self.encode_text(ids)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory: recompute block activations in the backward pass."""
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def resize_token_embedding(self, new_vocab: int) -> None:
        """Append token rows (normal std 0.02), e.g. a [MASK] token: 49408 -> 49409. Updates `config`."""
        self._resize_token_embedding(new_vocab)
