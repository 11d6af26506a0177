"""Embed an evaluation split in batches and score it; tables and JSON reports.

Library code: used by the trainer's validation callback, by `xmr evaluate`, and usable on any pair
of encoders. Every JSON report records the protocol (dataset, split, checkpoint digest, config,
seed, direction, tie rule, library version) so a number can be traced back to what produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xmr.data.datasets import ImageDataset, TextDataset, build_loader
from xmr.data.records import RetrievalSplit
from xmr.methods.inference import autocast, prepare_encoder
from xmr.evaluation.metrics import retrieval_metrics

TIE_RULE = "ties are broken by gallery order (a stable descending sort): an item scoring exactly as a correct one ranks before it only if it comes first in the gallery"


@torch.inference_mode()
def embed_batches(encode: Callable[[torch.Tensor], torch.Tensor], loader, key: str, *, device: torch.device,
                  precision: str = "fp32", progress: bool = False, desc: str = "embedding") -> torch.Tensor:
    """Run `encode` over `loader` batches (field `key`), L2-normalise, return float32 (N, D) in input order.

    `encode` may be a method's raw encoder (autocast to `precision` here) or an `InferenceEncoder`'s,
    which applies its own recipe (its inner autocast settings take precedence).
    """
    from tqdm.auto import tqdm

    chunks, order = [], []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        with autocast(device, precision):
            feats = encode(batch[key].to(device))
        chunks.append(F.normalize(feats.float(), dim=-1).cpu())
        order.append(batch["index"])
    feats = torch.cat(chunks)
    index = torch.cat(order)
    out = torch.empty_like(feats)
    out[index] = feats
    return out


def embed_split(method: Any, split: RetrievalSplit, tokenize: Callable[[list[str]], torch.Tensor], transform,
                *, batch_size: int = 128, num_workers: int = 0, device: torch.device | None = None,
                precision: str = "fp32", progress: bool = False, compile: bool = False,
                encoder: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption embeddings, image embeddings) of a split, both L2-normalised.

    The encoders run through `xmr.methods.inference.prepare_encoder(method, precision, compile=compile)`;
    pass a ready `encoder` (an InferenceEncoder) to reuse one, e.g. a compiled one, across calls.
    """
    device = device or next(method.parameters()).device
    encoder = encoder or prepare_encoder(method, precision, compile=compile, device=device)
    images = build_loader(ImageDataset(split.image_paths, transform), batch_size, shuffle=False,
                          num_workers=num_workers)
    texts = build_loader(TextDataset(split.captions, tokenize), batch_size, shuffle=False, num_workers=0)
    text_feats = embed_batches(encoder.encode_text, texts, "ids", device=device, precision=precision,
                               progress=progress, desc="texts")
    image_feats = embed_batches(encoder.encode_image, images, "images", device=device, precision=precision,
                                progress=progress, desc="images")
    return text_feats, image_feats


def evaluate_split(method: Any, split: RetrievalSplit, tokenize: Callable[[list[str]], torch.Tensor], transform,
                   *, i2t: bool = False, query_chunk: int = 1024, **embed_kwargs: Any) -> dict[str, dict[str, float]]:
    """Text-to-image metrics (and image-to-text when asked) of a split, in %."""
    was_training = method.training
    method.eval()
    start = time.perf_counter()
    text_feats, image_feats = embed_split(method, split, tokenize, transform, **embed_kwargs)
    embed_s = time.perf_counter() - start
    caption_pids = torch.as_tensor(split.caption_pids)
    image_pids = torch.as_tensor(split.image_pids)
    results = {"t2i": retrieval_metrics(text_feats, image_feats, caption_pids, image_pids, query_chunk=query_chunk)}
    if i2t:
        results["i2t"] = retrieval_metrics(image_feats, text_feats, image_pids, caption_pids, query_chunk=query_chunk)
    results["t2i"]["embed_seconds"] = embed_s
    method.train(was_training)
    return results


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """t2i metrics under their plain names (R1, mAP...), other directions prefixed (i2t_R1...)."""
    flat: dict[str, float] = {}
    for direction, metrics in results.items():
        for key, value in metrics.items():
            flat[key if direction == "t2i" else f"{direction}_{key}"] = value
    return flat


METRIC_COLUMNS = ("R1", "R5", "R10", "mAP", "mINP")


def format_table(rows: dict[str, dict[str, float]], title: str = "") -> str:
    """A fixed-width table of retrieval metrics: one row per (label -> metrics)."""
    label_width = max([len(label) for label in rows] + [9])
    header = f"{'':<{label_width}}  " + "  ".join(f"{c:>6}" for c in METRIC_COLUMNS)
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for label, metrics in rows.items():
        cells = "  ".join(f"{metrics.get(c, float('nan')):6.2f}" for c in METRIC_COLUMNS)
        lines.append(f"{label:<{label_width}}  {cells}")
    return "\n".join(lines)


def file_digest(path: str | Path, limit_bytes: int | None = None) -> str:
    """sha256 of a file (first 16 hex digits): identifies the checkpoint that produced a number."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        remaining = limit_bytes
        while chunk := handle.read(1 << 20):
            digest.update(chunk if remaining is None else chunk[:remaining])
            if remaining is not None:
                remaining -= len(chunk)
                if remaining <= 0:
                    break
    return digest.hexdigest()[:16]


def protocol_record(*, dataset: str, root: str, split: str, checkpoint: str | None, config: dict[str, Any],
                    seed: int | None, directions: Sequence[str]) -> dict[str, Any]:
    from xmr import __version__

    weights = Path(checkpoint) / "model.safetensors" if checkpoint else None
    return {
        "dataset": dataset,
        "data_root": str(root),
        "split": split,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_digest(weights) if weights and weights.is_file() else None,
        "directions": list(directions),
        "seed": seed,
        "tie_rule": TIE_RULE,
        "metrics_definition": "Rank-k (CMC), mAP over all correct gallery items, mINP = #correct / rank of last correct; in %",
        "xmr_version": __version__,
        "torch_version": torch.__version__,
        "host": platform.node(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": config,
    }


def write_report(path: str | Path, results: dict[str, dict[str, float]], protocol: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"results": results, "protocol": protocol}, indent=2))
    os.replace(tmp, path)
    return path
