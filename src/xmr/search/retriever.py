"""The search facade: a checkpoint (encoders + tokenizer + transform) over an index of images.

`xmr.load(index_dir)` gives a Retriever; the CLI's `xmr search` and the HTTP service both use it.
An index remembers the model that embedded its images (`manifest.model_id`, the weights' digest);
a Retriever refuses to pair it with another checkpoint, since the vectors would not be comparable.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from xmr.methods.inference import autocast, prepare_encoder
from xmr.errors import XmrError

COMPOSE_MODES = ("native", "sum")


class UnsupportedQuery(XmrError):
    """The model cannot answer this kind of query (e.g. image + text on a text-to-image model)."""


class ModelMismatch(XmrError):
    """The index was built with another model than the checkpoint given."""


@dataclass
class Hit:
    id: int
    path: str
    score: float


class Retriever:
    """Encode queries with a loaded checkpoint and search an index; thread-safe for concurrent callers.

    Composed queries (image + modifying text) use the method's own `encode_composed` when it has one.
    Otherwise they are refused, unless `compose="sum"` is chosen: the zero-shot late-fusion baseline
    normalise(normalise(f_image) + normalise(f_text)), which any dual encoder can do, but which is a
    baseline, not a composed-retrieval model.
    """

    def __init__(self, model: Any, index: Any, *, images_root: str | Path | None = None, precision: str = "bf16",
                 device: str = "cpu", compose: str | None = None, check_model: bool = True,
                 compile: bool = False) -> None:
        from xmr.data.transforms import build_transform
        from xmr.search.embed import model_fingerprint

        if compose is not None and compose not in COMPOSE_MODES:
            raise XmrError(f"compose={compose!r}: use one of {COMPOSE_MODES} or None")
        self.model, self.index = model, index
        self.model_id = model_fingerprint(model.path)
        if check_model and index.manifest.model_id != self.model_id:
            raise ModelMismatch(f"the index was built with model {index.manifest.model_id} but checkpoint "
                                f"{model.path} is model {self.model_id}; embed the images again with this "
                                "checkpoint or pass the checkpoint that built the index")
        root = images_root or index.manifest.extra.get("images_root")
        if root is None:
            raise XmrError("the index manifest records no images_root; pass images_root=")
        self.images_root = Path(root).resolve()
        self.precision, self.device = precision, torch.device(device)
        self.transform = build_transform(False, model.image_size)
        self.compose = compose
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads with autocast state
        # Queries go through the inference fast path (bf16 on CPU: a bf16 copy of the weights, no per-call
        # casts); `compile` adds torch.compile + freezing (slow first query per batch shape).
        self.encoder = prepare_encoder(model.method, precision, compile=compile, device=self.device)

    # -- properties ------------------------------------------------------------------------------
    @property
    def supports_composed(self) -> bool:
        return hasattr(self.model.method, "encode_composed") or self.compose == "sum"

    def __len__(self) -> int:
        return len(self.index)

    def info(self) -> dict[str, Any]:
        m = self.index.manifest
        return {"model_id": self.model_id, "checkpoint": self.model.path, "count": len(self.index),
                "backend": m.backend, "kind": m.kind, "dim": m.dim, "metric": m.metric,
                "supports_composed": self.supports_composed,
                "compose": "native" if hasattr(self.model.method, "encode_composed") else self.compose}

    # -- encoding --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        ids = self.model.tokenize(texts).to(self.device)
        feats = self.encoder.encode_text(ids)  # the encoder serialises callers itself
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        batch = torch.stack([self.transform(im.convert("RGB")) for im in images]).to(self.device)
        feats = self.encoder.encode_image(batch)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_composed(self, image: Image.Image, text: str) -> np.ndarray:
        method = self.model.method
        if hasattr(method, "encode_composed"):
            batch = self.transform(image.convert("RGB")).unsqueeze(0).to(self.device)
            ids = self.model.tokenize([text]).to(self.device)
            with self._lock, autocast(self.device, self.precision):
                feats = method.encode_composed(batch, ids)
            return F.normalize(feats.float(), dim=-1).cpu().numpy()
        if self.compose == "sum":
            fused = self.encode_images([image]) + self.encode_texts([text])
            return fused / np.linalg.norm(fused, axis=-1, keepdims=True).clip(1e-12)
        raise UnsupportedQuery(
            f"this model ({getattr(method, 'name', type(method).__name__)}, a text-to-image model) cannot compose "
            "an image with a modifying text; search by text or by image, use a composed-retrieval model, or "
            "enable the late-fusion baseline (--compose sum)")

    # -- search ----------------------------------------------------------------------------------
    def search_vectors(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        if k < 1:
            raise XmrError(f"k must be >= 1, got {k}")
        scores, ids = self.index.search(np.asarray(queries, dtype=np.float32), k)
        out = []
        for row_scores, row_ids in zip(scores, ids):
            out.append([Hit(int(i), self.index.path(int(i)), float(s))
                        for s, i in zip(row_scores, row_ids) if i >= 0])
        return out

    def search_text(self, text: str, k: int = 10) -> list[Hit]:
        if not text or not text.strip():
            raise XmrError("empty query text")
        return self.search_vectors(self.encode_texts([text]), k)[0]

    def search_image(self, image: Image.Image, k: int = 10) -> list[Hit]:
        return self.search_vectors(self.encode_images([image]), k)[0]

    def search_composed(self, image: Image.Image, text: str, k: int = 10) -> list[Hit]:
        if not text or not text.strip():
            raise XmrError("empty modification text")
        return self.search_vectors(self.encode_composed(image, text), k)[0]

    def image_path(self, id: int) -> Path:
        """Absolute path of an indexed image; KeyError when the id is not (or no longer) indexed."""
        relative = self.index.path(int(id))
        path = Path(relative)
        return path if path.is_absolute() else self.images_root / path


def load(index: str | Path, checkpoint: str | Path | None = None, *, device: str = "cpu",
         precision: str = "bf16", compose: str | None = None, mmap: bool = False, compile: bool = False) -> Retriever:
    """Open an index and the checkpoint that built it (default: the one its manifest records).

    `precision` ("fp32" | "bf16" | "fp16") and `compile` choose the query encoders' recipe (`xmr.methods.inference`).
    """
    from xmr.jobs.train import load_checkpoint
    from xmr.index import open_index

    opened = open_index(index, mmap=mmap)
    checkpoint = checkpoint or opened.manifest.extra.get("checkpoint")
    if checkpoint is None:
        raise XmrError(f"{index}: the manifest records no checkpoint; pass checkpoint=")
    return Retriever(load_checkpoint(checkpoint, device=device), opened, precision=precision, device=device,
                     compose=compose, compile=compile)
