"""Embed an evaluation split in batches through a method's encoders and score it; tables and JSON reports.

Library code: used by the trainer's validation callback, by `xmr evaluate`, and usable on any method. Every JSON report records the protocol (dataset, split, checkpoint digest, config,
seed, direction, tie rule, library version) so a number can be traced back to what produced it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from xmr.atomic import atomic_write_text
from xmr.data.datasets import ImageDataset, QueryDataset, build_loader
from xmr.data.records import EvalSplit, RetrievalSplit
from xmr.errors import DataError
from xmr.methods.base import Method
from xmr.methods.inference import InferenceEncoder, prepare_encoder
from xmr.outputs import Embedded, QueryBatch
from xmr.precision import autocast

if TYPE_CHECKING:
    from xmr.evaluation.tasks import Task

TIE_RULE = "ties are broken by gallery order (a stable descending sort): an item scoring exactly as a correct one ranks before it only if it comes first in the gallery"


@torch.inference_mode()
def embed_batches(encode: Callable[[dict[str, torch.Tensor]], Embedded], loader, *, device: torch.device,
                  precision: str = "fp32", progress: bool = False, desc: str = "embedding") -> Embedded:
    """Run `encode(batch)` over `loader`; return the Embedded of all items in input order, vectors
    L2-normalised float32 (extras as the encoder gave them).

    `encode` may call a method's raw encoders (autocast to `precision` here) or an `InferenceEncoder`'s,
    which applies its own recipe (its inner autocast settings take precedence).
    """
    from tqdm.auto import tqdm

    chunks: list[Embedded] = []
    order = []
    for batch in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        with autocast(device, precision):
            out = encode({k: v.to(device) for k, v in batch.items() if k != "index"})
        chunks.append(Embedded(F.normalize(out.vectors.float(), dim=-1).cpu(),
                               {n: v.cpu() for n, v in out.extras.items()}))
        order.append(batch["index"])
    index = torch.cat(order)
    inverse = torch.empty_like(index)
    inverse[index] = torch.arange(len(index))
    vectors = torch.cat([c.vectors for c in chunks])[inverse]
    extras = {n: torch.cat([c.extras[n] for c in chunks])[inverse] for n in (chunks[0].extras if chunks else {})}
    return Embedded(vectors, extras)


def _query_batch(batch: dict[str, torch.Tensor]) -> QueryBatch:
    return QueryBatch(ids=batch.get("ids"), images=batch.get("images"))


def embed_queries_and_gallery(method: Method, split: EvalSplit, tokenize: Callable[[list[str]], torch.Tensor],
                              *, batch_size: int = 128, num_workers: int = 0, device: torch.device | None = None,
                              precision: str = "fp32", progress: bool = False, compile: bool = False,
                              encoder: InferenceEncoder | None = None) -> tuple[Embedded, Embedded]:
    """(query Embedded, gallery Embedded) of a split, vectors L2-normalised, through the method's encoders.

    The encoders run through `xmr.methods.inference.prepare_encoder(method, precision, compile=compile)`;
    pass a ready `encoder` (an InferenceEncoder) to reuse one, e.g. a compiled one, across calls.
    Query images use the method's query-side transform, gallery images its gallery-side one.
    """
    device = device or next(method.parameters()).device
    encoder = encoder or prepare_encoder(method, precision, compile=compile, device=device)
    queries = QueryDataset(split.query_texts, split.query_images, tokenize, method.query_transform())
    gallery = ImageDataset(split.gallery_paths, method.gallery_transform())
    query_workers = num_workers if split.query_images is not None else 0
    q = embed_batches(lambda b: encoder.encode_query(_query_batch(b)),
                      build_loader(queries, batch_size, shuffle=False, num_workers=query_workers),
                      device=device, precision=precision, progress=progress, desc="queries")
    g = embed_batches(lambda b: encoder.encode_gallery(b["images"]),
                      build_loader(gallery, batch_size, shuffle=False, num_workers=num_workers),
                      device=device, precision=precision, progress=progress, desc="gallery")
    return q, g


def embed_split(method: Method, split: RetrievalSplit, tokenize: Callable[[list[str]], torch.Tensor],
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(caption embeddings, image embeddings) of a person split, both L2-normalised (see above)."""
    q, g = embed_queries_and_gallery(method, person_split(split), tokenize, **kwargs)
    return q.vectors, g.vectors


def person_split(split: RetrievalSplit) -> EvalSplit:
    """A person-retrieval split as an EvalSplit: captions query images; same identity = correct."""
    by_pid: dict[int, list[int]] = {}
    for index, pid in enumerate(split.image_pids):
        by_pid.setdefault(pid, []).append(index)
    return EvalSplit(gallery_paths=list(split.image_paths), positives=[by_pid.get(p, []) for p in split.caption_pids],
                     query_texts=list(split.captions), query_labels=list(split.caption_pids),
                     gallery_labels=list(split.image_pids))


def caption_split(split: RetrievalSplit, task: str = "person") -> EvalSplit:
    """A captioned split as an EvalSplit for `task`: `person` matches by identity, `image_text` by the
    captioned image itself (each caption's one image; each image's captions)."""
    if task == "person":
        return person_split(split)
    if task == "image_text":
        if len(split.caption_image_ids) != len(split.captions):
            raise DataError("image_text evaluation needs each caption's image (RetrievalSplit.caption_image_ids)")
        return EvalSplit(gallery_paths=list(split.image_paths), positives=[[i] for i in split.caption_image_ids],
                         query_texts=list(split.captions))
    raise DataError(f"a captioned data set has no {task!r} queries; use a format that provides them "
                    "(e.g. reference image + modifier triplets for 'composed')")


def evaluate_split(method: Method, split: RetrievalSplit | EvalSplit, tokenize: Callable[[list[str]], torch.Tensor],
                   *, task: str | Task = "person", i2t: bool = False, query_chunk: int = 1024,
                   rerank_depth: int | None = None, **embed_kwargs: Any) -> dict[str, dict[str, float]]:
    """Metrics (in %) of `method` on a split under a task kind (`person`, `image_text`, `composed`).

    Reranking methods are scored through the same two stages as search (`evaluation/shortlist.py`) with
    depth `rerank_depth` (default: the method's own); the depth is recorded in the results.
    """
    from xmr.evaluation.scoring import score_split

    was_training = method.training
    method.eval()
    eval_split = caption_split(split, task if isinstance(task, str) else task.name) \
        if isinstance(split, RetrievalSplit) else split
    start = time.perf_counter()
    queries, gallery = embed_queries_and_gallery(method, eval_split, tokenize, **embed_kwargs)
    embed_s = time.perf_counter() - start
    results = score_split(method, task, eval_split, queries, gallery, i2t=i2t, query_chunk=query_chunk,
                          depth=rerank_depth).results
    first = next(iter(results))
    results[first]["embed_seconds"] = embed_s
    method.train(was_training)
    return results


def flat_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """The first (main) direction's metrics under their plain names (R1, mAP...), others prefixed (i2t_R1...)."""
    flat: dict[str, float] = {}
    main = next(iter(results), None)
    for direction, metrics in results.items():
        for key, value in metrics.items():
            flat[key if direction == main else f"{direction}_{key}"] = value
    return flat


METRIC_COLUMNS = ("R1", "R5", "R10", "mAP", "mINP")


def format_table(rows: dict[str, dict[str, float]], title: str = "",
                 columns: Sequence[str] = METRIC_COLUMNS) -> str:
    """A fixed-width table of retrieval metrics: one row per (label -> metrics); missing cells print nan."""
    label_width = max([len(label) for label in rows] + [9])
    width = max([6, *(len(c) for c in columns)])
    header = f"{'':<{label_width}}  " + "  ".join(f"{c:>{width}}" for c in columns)
    lines = [title] if title else []
    lines += [header, "-" * len(header)]
    for label, metrics in rows.items():
        cells = "  ".join(f"{metrics.get(c, float('nan')):{width}.2f}" for c in columns)
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
    return atomic_write_text(path, json.dumps({"results": results, "protocol": protocol}, indent=2))
