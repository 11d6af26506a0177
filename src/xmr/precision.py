"""Precision names and the autocast context: one place for every layer (config, engine, evaluation, inference).

Importing this module does not import torch (the config layer uses the names alone).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, where: str = "precision") -> str:
    """`precision` itself when it is one of PRECISIONS; ValueError naming `where` otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"{where}={precision!r}: use one of {', '.join(PRECISIONS)}")
    return precision


def precision_dtype(precision: str) -> torch.dtype | None:
    """The low-precision dtype of a precision name (None for fp32); raises on an unknown name."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[check_precision(precision)]


def autocast(device: torch.device | str, precision: str) -> torch.autocast:
    """Autocast context for `precision` on `device` (disabled for fp32)."""
    import torch

    device = torch.device(device)
    dtype = precision_dtype(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
