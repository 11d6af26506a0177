"""Methods: each paper is one module here, registered by name in `xmr.registry.METHODS`.

    >>> method = build_method(cfg, ctx)            # from an ExperimentConfig's `method:` section
    >>> method = method_from_exported(exported)    # from a checkpoint's `model` section

A method implements `xmr.methods.base.Method` (and optionally `Reranker`, `TrainHooks`).
"""

from __future__ import annotations

from typing import Any

from xmr.errors import CheckpointError, ConfigError
from xmr.methods.base import BuildContext, Method, Reranker, TrainHooks
from xmr.registry import METHODS


def method_class(name: str) -> type[Method]:
    """The registered method class `name`; ConfigError (with the known names) for an unknown one."""
    cls = METHODS.get(name)
    return cls


def build_method(method_cfg: Any, ctx: BuildContext) -> Method:
    """Build the method a validated `method:` config names (`method_cfg.name`)."""
    cls = method_class(method_cfg.name)
    if not isinstance(method_cfg, cls.Config):
        raise ConfigError(f"method {method_cfg.name!r} needs a {cls.Config.__name__}, got {type(method_cfg).__name__}")
    method = cls.build(method_cfg, ctx)
    if not isinstance(method, Method):
        raise TypeError(f"{cls.__name__}.build did not return an object implementing the Method protocol")
    return method


def method_from_exported(exported: dict[str, Any]) -> Method:
    """Rebuild a method (random weights) from a checkpoint's exported config."""
    name = exported.get("method")
    if name not in METHODS:
        raise CheckpointError(f"checkpoint names method {name!r}; known: {', '.join(METHODS.names())}")
    return METHODS.get(name).from_exported(exported)


__all__ = ["BuildContext", "Method", "Reranker", "TrainHooks", "build_method", "method_class",
           "method_from_exported"]
