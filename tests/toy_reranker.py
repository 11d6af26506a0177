"""Test-only methods. ToyReranker: a two-stage method: IRRA's towers, a second stage that fuses the global cosine with the best
match between the query and four stored patch tokens of each gallery image (like a region-word score)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from xmr.methods.irra import IRRA, IRRAConfig
from xmr.outputs import Candidates, Embedded
from xmr.registry import METHODS

NAME = "toy_rerank"


@dataclass
class ToyConfig(IRRAConfig):
    name: str = NAME


class ToyReranker(IRRA):
    name: ClassVar[str] = NAME
    Config: ClassVar[type[ToyConfig]] = ToyConfig
    rerank_depth: int = 5

    def encode_gallery(self, images: torch.Tensor) -> Embedded:
        out = self.clip.encode_image(images)
        return Embedded(out.pooled, {"patches": out.tokens[:, 1:5]})

    def gallery_extras(self) -> tuple[str, ...]:
        return ("patches",)

    def pair_scores(self, query: torch.Tensor, vectors: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(Q, D) normalised queries against (Q, K, D) vectors and (Q, K, R, D) patches -> (Q, K)."""
        local = torch.einsum("qd,qkrd->qkr", query, F.normalize(patches.float(), dim=-1)).amax(-1)
        return 0.5 * torch.einsum("qd,qkd->qk", query, vectors.float()) + 0.5 * local

    def rerank(self, query: Embedded, candidates: Candidates) -> torch.Tensor:
        return self.pair_scores(query.vectors.float(), candidates.vectors, candidates.extras["patches"])


class IdentityReranker(ToyReranker):
    """A second stage that returns the first-stage scores: two stages must then equal one, bit for bit."""

    def rerank(self, query: Embedded, candidates: Candidates) -> torch.Tensor:
        return candidates.scores.clone()


@dataclass
class ToyHooksConfig(IRRAConfig):
    name: str = "toy_hooks"


class ToyHooks(IRRA):
    """IRRA with training hooks that count epochs and optimiser steps (state kept for exact resume)."""

    name: ClassVar[str] = "toy_hooks"
    Config: ClassVar[type[ToyHooksConfig]] = ToyHooksConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epochs_seen: list[int] = []
        self.steps_seen = 0

    def on_epoch_start(self, epoch: int) -> None:
        self.epochs_seen.append(epoch)

    def after_step(self, step: int) -> None:
        self.steps_seen += 1
        assert step == self.steps_seen, "after_step gets the trainer's global step"

    def hook_state_dict(self) -> dict:
        return {"epochs_seen": list(self.epochs_seen), "steps_seen": self.steps_seen}

    def load_hook_state_dict(self, state: dict) -> None:
        self.epochs_seen, self.steps_seen = list(state["epochs_seen"]), int(state["steps_seen"])


def register() -> None:
    if NAME not in METHODS:
        METHODS.register(NAME, "toy_reranker:ToyReranker")
        METHODS.register("toy_hooks", "toy_reranker:ToyHooks")
