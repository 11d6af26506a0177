"""Inference fast path for a method's encoders: precision, torch.compile with freezing, threads.

`InferenceEncoder(method, precision=..., compile=...)` wraps any `Method` and gives
`encode_query(QueryBatch) -> Embedded` and `encode_gallery(images) -> Embedded` with the *same meaning*
as the method's own (float32 vectors, not normalised: callers normalise, as the evaluator does; extras
float32). Each query kind (text, image, composed) and the gallery side is its own compiled graph.
Everything runs under `torch.inference_mode()`.

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

from xmr.methods.base import Method
from xmr.outputs import Embedded, QueryBatch
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


SIDES = ("text", "image", "composed", "gallery")


class _Tower(nn.Module):
    """One side of a method as a module of plain tensors (so it can be compiled and frozen).

    forward(ids, images) -> (vectors, extras) of method.encode_query (text / image / composed) or
    method.encode_gallery (gallery); the unused input is None.
    """

    def __init__(self, method: nn.Module, side: str) -> None:
        super().__init__()
        self.method = method
        self.side = side

    def forward(self, ids: torch.Tensor | None, images: torch.Tensor | None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.side == "gallery":
            out = self.method.encode_gallery(images)
        else:
            out = self.method.encode_query(QueryBatch(ids=ids, images=images))
        return out.vectors, out.extras


def _method_device(method: Method) -> torch.device:
    try:
        return next(method.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


class InferenceEncoder:
    """Fast, thread-safe inference encoders of a method; outputs float32 features like the method's.

    Args:
        method: a `Method` (an nn.Module for `cast_weights` / `compile`).
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

    def __init__(self, method: Method, precision: str = "fp32", *, compile: bool = False,
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
        self._sides: dict[str, Callable[..., Any]] = {}  # built on first use: a text-only caller compiles one

    def _side(self, side: str) -> Callable[..., Any]:
        if side not in self._sides:
            self._sides[side] = self._build(self._model, side)
        return self._sides[side]

    def _build(self, model: Any, side: str) -> Callable[..., Any]:
        tower = _Tower(model, side)
        if not self.compiled:
            return tower
        compiled = torch.compile(tower)
        freeze = self.freeze

        def call(ids: torch.Tensor | None, images: torch.Tensor | None) -> Any:
            # Freezing is read from inductor's global config when a graph is compiled (the first call per
            # shape): `torch.compile(options={"freezing": True})` left the weights unpacked (torch 2.13).
            import torch._inductor.config as inductor_config

            with inductor_config.patch(freezing=freeze):
                return compiled(ids, images)

        return call

    def describe(self) -> dict[str, Any]:
        """The recipe in use (for reports)."""
        return {"precision": self.precision, "cast_weights": self.cast_weights, "compile": self.compiled,
                "freeze": self.freeze, "threads": self.threads, "device": str(self.device)}

    def _inputs(self, ids: torch.Tensor | None, images: torch.Tensor | None):
        if ids is not None:
            ids = ids.to(self.device)
        if images is not None:
            images = images.to(self.device)
            if self.cast_weights:
                images = images.to(self.dtype)
        return ids, images

    def _call(self, side: str, ids: torch.Tensor | None, images: torch.Tensor | None) -> Embedded:
        ids, images = self._inputs(ids, images)
        precision = "fp32" if self.cast_weights else self.precision
        with self._lock, torch.inference_mode():
            try:
                with autocast(self.device, precision):
                    vectors, extras = self._side(side)(ids, images)
            except Exception as e:
                if not self.compiled or not _is_compile_error(e):
                    raise
                warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); encoding eagerly from now on",
                              stacklevel=3)
                self.compiled = self.freeze = False
                self._sides.clear()
                with autocast(self.device, precision):
                    vectors, extras = self._side(side)(ids, images)
        return Embedded(vectors.float(), {name: value.float() for name, value in extras.items()})

    def encode_query(self, query: QueryBatch) -> Embedded:
        """Queries (text, image or composed) -> float32 Embedded, like method.encode_query (not normalised)."""
        return self._call(query.kind, query.ids, query.images)

    def encode_gallery(self, images: torch.Tensor) -> Embedded:
        """(B, 3, H, W) gallery images -> float32 Embedded, like method.encode_gallery (not normalised)."""
        return self._call("gallery", None, images)


def _is_compile_error(error: Exception) -> bool:
    """Errors raised by dynamo/inductor (as opposed to the model's own errors, which must propagate)."""
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch.fx")) or "Inductor" in type(error).__name__


def prepare_encoder(method: Method | InferenceEncoder, precision: str = "fp32", *, compile: bool = False,
                    **options: Any) -> InferenceEncoder:
    """An InferenceEncoder for `method` (see its arguments); the one entry point the callers use."""
    if isinstance(method, InferenceEncoder):
        return method
    return InferenceEncoder(method, precision, compile=compile, **options)
