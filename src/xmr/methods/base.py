"""The contract every retrieval method implements; the engine, evaluator and CLI rely only on this."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from xmr.outputs import LossOutput


@runtime_checkable
class Method(Protocol):
    """A method pairs encoders with named, weighted losses.

    `forward(batch)` is the training step (so DDP wraps it unchanged) and returns a LossOutput whose
    `total` is backpropagated and whose `parts` are logged. Encoders return global features
    (not normalised); retrieval uses their cosine similarity.
    """

    name: str

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput: ...

    def encode_image(self, images: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor: ...

    def new_module_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of randomly initialised modules (they get a larger learning rate)."""
        ...

    def export_config(self) -> dict[str, Any]:
        """Everything needed to rebuild the network from a checkpoint (no weights)."""
        ...
