"""Settings of the search service: one dataclass, filled by the CLI, by `from_env`, or by hand."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from xmr.errors import ConfigError

ENV_PREFIX = "XMR_SERVE_"
API_KEY_ENV = "XMR_API_KEY"


@dataclass
class ServeSettings:
    """Limits and network options of `xmr.serve.create_app` / `xmr.serve.run`.

    Every limit exists to keep one bad or hostile request from taking the service down: uploads are
    capped in bytes and in decoded pixels, texts in characters, k in results, and at most
    `max_concurrency` queries run while `max_queue` more wait; beyond that the answer is 503.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, every /api route but /api/health needs header X-API-Key
    max_upload_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000  # checked from the image header, before any decoding
    max_text_chars: int = 1000
    max_k: int = 100
    default_k: int = 10
    max_rerank_depth: int = 1000  # K' of the second stage, for methods that re-rank (work per query)
    max_refine_k: int = 1000  # the same K' asked for by its MMRef name (`refine_k`)
    max_concurrency: int = 2  # retriever calls running at once (each is CPU-heavy)
    max_queue: int = 16  # calls waiting for a slot; more are refused with 503 at once
    thumbnail_size: int = 256  # longest side of /api/thumbnails images, in pixels
    thumbnail_cache_items: int = 2048  # JPEG thumbnails kept in memory (about 15 KB each)
    thumbnail_workers: int = 2
    cors_origins: tuple[str, ...] = field(default_factory=tuple)  # empty: no CORS headers at all
    log_level: str = "info"
    access_log: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first field out of range."""
        positive = ("max_upload_bytes", "max_image_pixels", "max_text_chars", "max_k", "default_k", "max_rerank_depth", "max_refine_k",
                    "max_concurrency", "thumbnail_size", "thumbnail_workers")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"ServeSettings.{name} must be a positive integer, got {value!r}")
        for name in ("max_queue", "thumbnail_cache_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"ServeSettings.{name} must be an integer >= 0, got {value!r}")
        if self.default_k > self.max_k:
            raise ConfigError(f"ServeSettings.default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"ServeSettings.port must be in 0..65535, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("ServeSettings.api_key is empty; use None to disable the key check")
        self.cors_origins = tuple(self.cors_origins)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Defaults, then `XMR_SERVE_<FIELD>` variables (and `XMR_API_KEY`), then non-None overrides.

        E.g. XMR_SERVE_PORT=9000 XMR_SERVE_MAX_K=50 XMR_API_KEY=secret; CORS origins are comma-separated.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if f.name == "api_key" and raw is None:
                raw = env.get(API_KEY_ENV)
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, cls.__dataclass_fields__[f.name].default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown ServeSettings field(s): {', '.join(sorted(unknown))}")
        return cls(**values)

    def public_limits(self) -> dict[str, int]:
        """The limits a client needs to build valid requests (exposed by /api/health)."""
        return {"max_k": self.max_k, "default_k": self.default_k, "max_text_chars": self.max_text_chars,
                "max_rerank_depth": self.max_rerank_depth, "max_refine_k": self.max_refine_k,
                "max_upload_bytes": self.max_upload_bytes, "max_image_pixels": self.max_image_pixels}


def _parse(name: str, raw: str, default: Any) -> Any:
    """Parse an environment string by the type of the field's default."""
    if name == "api_key":
        return raw
    if name == "cors_origins":
        return tuple(o.strip() for o in raw.split(",") if o.strip())
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r}: use true or false")
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r}: not an integer") from None
    return raw
