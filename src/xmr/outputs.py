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


@dataclass
class QueryBatch:
    """A batch of queries: captions (`ids`), images, or both (a composed query: reference image + modifier).

    ids: (B, L) token ids; images: (B, 3, H, W) images after the method's query-side transform.
    """

    ids: torch.Tensor | None = None
    images: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids is None and self.images is None:
            raise ValueError("a QueryBatch needs ids, images or both")
        if self.ids is not None and self.images is not None and len(self.ids) != len(self.images):
            raise ValueError(f"composed queries pair each image with one text: {len(self.images)} images, "
                             f"{len(self.ids)} texts")

    @property
    def kind(self) -> str:
        """"text", "image" or "composed"."""
        if self.ids is not None and self.images is not None:
            return "composed"
        return "text" if self.ids is not None else "image"

    def __len__(self) -> int:
        return len(self.ids if self.ids is not None else self.images)

    def to(self, device: torch.device | str) -> QueryBatch:
        return QueryBatch(None if self.ids is None else self.ids.to(device),
                          None if self.images is None else self.images.to(device))


@dataclass
class Embedded:
    """What a method's encoders return for a batch of queries or gallery images.

    vectors: (B, D) global features for the index, not normalised (consumers L2-normalise them).
    extras: named side features for a second scoring stage, each (B, ...) (e.g. per-image region tokens);
        stored next to the vectors in embedding stores and indexes. Empty for single-stage methods.
    """

    vectors: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.extras.items():
            if len(value) != len(self.vectors):
                raise ValueError(f"extra {name!r} has {len(value)} rows for {len(self.vectors)} vectors")

    def __len__(self) -> int:
        return len(self.vectors)

    def normalized(self) -> Embedded:
        """The same features with float32, L2-normalised vectors (extras unchanged)."""
        return Embedded(torch.nn.functional.normalize(self.vectors.float(), dim=-1), dict(self.extras))


@dataclass
class Candidates:
    """Stage 1's shortlist for Q queries: the top K' gallery items of each, best first.

    ids: (Q, K') int64 gallery ids (or row indices), -1 where fewer than K' items exist.
    scores: (Q, K') float32 first-stage scores (cosine of normalised vectors), descending per row.
    vectors: (Q, K', D) the candidates' stored (normalised) vectors, or None when not fetched.
    extras: name -> (Q, K', ...) the candidates' stored side features.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    vectors: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def valid(self) -> torch.Tensor:
        """(Q, K') bool: True where a slot holds a real candidate."""
        return self.ids >= 0
