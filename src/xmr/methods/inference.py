"""Inference fast path for a method's two encoders: precision, torch.compile with freezing, threads.

`InferenceEncoder(method, precision=..., compile=...)` wraps a method (anything with `encode_image` /
`encode_text`, e.g. IRRA) and gives plain callables `encode_image(images)` / `encode_text(ids)` that
return float32 global features with the *same meaning* as the method's own encoders (not normalised:
callers normalise, as the evaluator does). Everything runs under `torch.inference_mode()`.

Recipes (kept by measurement on a 2-core Sapphire Rapids with AMX, see `benchmarks/encode.py`):
- ``fp32``: the method as is; the accuracy reference.
- ``bf16`` on CPU: a private copy of the towers with bf16 weights (LayerNorms kept fp32, computing in
  fp32): as fast as autocast at batch 64, 1.5-3x faster for single queries (autocast re-casts every
  weight on each call), and what torch.compile + freezing needs to prepack the weights for AMX.
- ``bf16`` elsewhere, ``fp16``, or ``cast_weights=False``: autocast (weights stay fp32, matmuls run in
  the low precision, LayerNorm and the softmax accumulation stay fp32).
- ``compile=True``: `torch.compile` (inductor) of the towers with weight freezing
  (`torch._inductor.config.freezing`), which fuses the element-wise work between matmuls and prepacks
  the weights.  Freezing snapshots the weights: build a new encoder after the weights change.  When
  inductor is unusable (no C++ compiler, unsupported platform), it falls back to eager with a warning.

The method itself is never modified: casting and compiling work on a private copy of the model.
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from xmr.precision import PRECISIONS, autocast, precision_dtype  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count when given (a process-wide setting); returns the count in use."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def compile_available() -> tuple[bool, str]:
    """Whether torch.compile's inductor backend can run here, with the reason when it cannot."""
    try:
        import torch._inductor  # noqa: F401
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except (ImportError, RuntimeError, OSError) as e:  # no inductor or no C++ compiler: run eagerly
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def _is_layer_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm))


def inference_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `module` in eval mode for inference, its floating parameters cast to `dtype`.

    Normalisation layers keep their fp32 weights (CLIP's LayerNorm computes in fp32 on an fp32 copy of its
    input, so its statistics stay exact); the residual stream, the matmuls and the attention (whose
    softmax accumulates in fp32 inside SDPA) run in `dtype`. Parameters that are not cast are shared with
    `module`, not copied, and the cast ones are made directly from the originals: the copy costs only the
    memory of the cast weights. Buffers are copied as they are.
    """
    norms = {id(p) for sub in module.modules() if _is_layer_norm(sub) for p in sub.parameters(recurse=False)}
    memo: dict[int, Any] = {}
    for p in module.parameters():
        if dtype is not None and p.is_floating_point() and id(p) not in norms:
            memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
        else:
            memo[id(p)] = p
    return copy.deepcopy(module, memo).eval()


class _Tower(nn.Module):
    """One encoder of a method as a module: forward = method.<name> (so it can be compiled and frozen)."""

    def __init__(self, method: nn.Module, name: str) -> None:
        super().__init__()
        self.method = method
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.method, self.name)(x)


def _method_device(method: Any) -> torch.device:
    try:
        return next(method.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class InferenceEncoder:
    """Fast, thread-safe inference encoders of a method; outputs float32 features like the method's.

    Args:
        method: an object with `encode_image(images)` and `encode_text(ids)` (an nn.Module for
            `cast_weights` / `compile`).
        precision: "fp32" (reference), "bf16" or "fp16".
        compile: torch.compile the towers (inductor, with weight freezing); falls back to eager with a
            warning when inductor cannot run here. The first call per input shape pays the compile time.
        cast_weights: run a bf16/fp16 copy of the weights instead of autocast. None picks the measured
            best: True for bf16 on CPU (as fast as autocast at batch 64, 1.5-3x faster at batch 1 since
            autocast re-casts every weight on each call; it is also what compile + freezing wants),
            False otherwise.
        freeze: with `compile`, fold the weights into the compiled graph (inductor freezing).
        threads: torch intra-op threads to use (process-wide); None leaves the setting alone.
        device: where inputs are moved; defaults to the method's device.
    """

    def __init__(self, method: Any, precision: str = "fp32", *, compile: bool = False,
                 cast_weights: bool | None = None, freeze: bool = True, threads: int | None = None,
                 device: torch.device | str | None = None) -> None:
        self.dtype = precision_dtype(precision)
        self.precision = precision
        self.device = torch.device(device) if device is not None else _method_device(method)
        self.threads = set_threads(threads)
        if cast_weights is None:
            cast_weights = (self.dtype is torch.bfloat16 and self.device.type == "cpu"
                            and isinstance(method, nn.Module))
        if self.dtype is None:
            cast_weights = False
        if compile:
            ok, why = compile_available()
            if not ok:
                warnings.warn(f"torch.compile is unavailable here ({why}); encoding eagerly", stacklevel=2)
                compile = False
        if (cast_weights or compile) and not isinstance(method, nn.Module):
            raise TypeError(f"cast_weights/compile need an nn.Module method, got {type(method).__name__}")
        self.method = method
        self.cast_weights, self.compiled, self.freeze = bool(cast_weights), bool(compile), bool(freeze and compile)
        self._lock = threading.Lock()
        model = method
        if self.cast_weights or self.compiled:
            # A private copy: the caller's (possibly training) model keeps its weights, dtype and mode, and
            # a compiled copy is a new object, so dynamo never reuses code compiled (and frozen) for another.
            model = inference_copy(method, self.dtype if self.cast_weights else None)
        self._model = model
        self._image = self._build(model, "encode_image")
        self._text = self._build(model, "encode_text")

    def _build(self, model: Any, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        if not self.compiled:
            return getattr(model, name)
        compiled = torch.compile(_Tower(model, name))
        freeze = self.freeze

        def call(x: torch.Tensor) -> torch.Tensor:
            # Freezing is read from inductor's global config when a graph is compiled (the first call per
            # shape): `torch.compile(options={"freezing": True})` left the weights unpacked (torch 2.13).
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=freeze):
                return compiled(x)

        return call

    def describe(self) -> dict[str, Any]:
        """The recipe in use (for reports)."""
        return {"precision": self.precision, "cast_weights": self.cast_weights, "compile": self.compiled,
                "freeze": self.freeze, "threads": self.threads, "device": str(self.device)}

    def _run(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, is_float_input: bool) -> torch.Tensor:
        x = x.to(self.device)
        if self.cast_weights and is_float_input:
            x = x.to(self.dtype)
        with self._lock, torch.inference_mode():
            try:
                with autocast(self.device, "fp32" if self.cast_weights else self.precision):
                    out = fn(x)
            except Exception as e:
                if not self.compiled or not _is_compile_error(e):
                    raise
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); encoding eagerly from now on",
                              stacklevel=3)
                self.compiled = self.freeze = False
                self._image, self._text = (getattr(self._model, n) for n in ("encode_image", "encode_text"))
                fn = self._image if is_float_input else self._text
                with autocast(self.device, "fp32" if self.cast_weights else self.precision):
                    out = fn(x)
        return out.float()

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, D) float32 global features (not normalised), like method.encode_image."""
        return self._run(self._image, images, True)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, D) float32 global features (not normalised), like method.encode_text."""
        return self._run(self._text, ids, False)


def _is_compile_error(error: Exception) -> bool:
    """Errors raised by dynamo/inductor (as opposed to the model's own errors, which must propagate)."""
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch.fx")) or "Inductor" in type(error).__name__


def prepare_encoder(method: Any, precision: str = "fp32", *, compile: bool = False, **options: Any) -> InferenceEncoder:
    """An InferenceEncoder for `method` (see its arguments); the one entry point the callers use."""
    if isinstance(method, InferenceEncoder):
        return method
    return InferenceEncoder(method, precision, compile=compile, **options)
