"""Reed et al.'s class-level protocol for CUB and Flowers (CVPR 2016; reedscot/cvpr2016
``classify_sje_tcnn.lua``, ``util/util_retrieval.lua``): pure functions on tensors.

Definitions (C classes = the distinct caption labels, N images, d-dim features):

* class text embedding t_c: every caption feature L2-normalised, averaged over the class's captions,
  the mean L2-normalised again (Reed uses raw dot products of unnormalised means; normalising is ours);
  image features are L2-normalised too, so scores are cosines s(c, j) = <t_c, v_j>.
* ``i2t_top1``: each image is assigned to the class of highest s(c, j); % of images assigned to their
  own class.
* ``t2i_ap{k}`` (k = ``ap_at``, 50 in Reed; named "AP@50" / "mAP@50" in Reed's output): one query per
  class, t_c, ranking all N images; the fraction of the top k that belong to class c, i.e. precision@k
  (not average precision), averaged over classes, in %. The denominator is always k: a class with fewer
  than k images (or a gallery with fewer than k images) cannot reach 100.

Tie rule: equal scores are ordered by lower index first, gallery image index for t2i, class index
(classes in ascending label order) for i2t: a stable descending sort.

Cost and memory: one pass over the captions in chunks (a C x d float64 accumulator), one C x N score
matrix (C is small: 50 CUB or 20 Flowers test classes) and its row sort; never a caption x image matrix.
"""

from __future__ import annotations

from typing import Any

import torch

_CHUNK = 16_384  # caption rows normalised at once


def _as_tensor(x: Any, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.to(torch.float64), dim=-1)


def class_text_embeddings(caption_feats: Any, caption_labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, embeddings): the distinct caption labels in ascending order (C,) and their class text
    embeddings (C, d), float64 unit rows: mean of the L2-normalised captions, normalised again."""
    feats = _as_tensor(caption_feats, "caption_feats", 2)
    labels = _as_tensor(caption_labels, "caption_labels", 1).to(torch.int64)
    if len(labels) != len(feats):
        raise ValueError(f"{len(labels)} caption labels for {len(feats)} caption features")
    if len(feats) == 0:
        raise ValueError("no captions")
    classes, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    sums = torch.zeros(len(classes), feats.shape[1], dtype=torch.float64)
    for start in range(0, len(feats), _CHUNK):
        sums.index_add_(0, inverse[start : start + _CHUNK], _normalize(feats[start : start + _CHUNK]))
    counts = torch.bincount(inverse, minlength=len(classes)).to(torch.float64)
    return classes, _normalize(sums / counts[:, None])


def reed_metrics(
    caption_feats: Any, caption_labels: Any, image_feats: Any, image_labels: Any, *, ap_at: int = 50
) -> dict[str, float]:
    """Reed's i2t top-1 accuracy and t2i precision@`ap_at` (see the module docstring), in %.

    Returns {"i2t_top1", f"t2i_ap{ap_at}", "num_classes", "num_images", "ap_at"}. Every image label must
    be a caption label (a class without captions has no embedding): ValueError otherwise.
    """
    if isinstance(ap_at, bool) or not isinstance(ap_at, int) or ap_at < 1:
        raise ValueError(f"ap_at must be a positive integer, got {ap_at!r}")
    classes, text = class_text_embeddings(caption_feats, caption_labels)
    images = _as_tensor(image_feats, "image_feats", 2)
    labels = _as_tensor(image_labels, "image_labels", 1).to(torch.int64)
    if len(labels) != len(images) or len(images) == 0:
        raise ValueError(f"{len(labels)} image labels for {len(images)} image features (need >= 1)")
    if images.shape[1] != text.shape[1]:
        raise ValueError(f"image features are {images.shape[1]}-D, caption features {text.shape[1]}-D")
    pos = torch.searchsorted(classes, labels).clamp(max=len(classes) - 1)
    unknown = classes[pos] != labels
    if bool(unknown.any()):
        raise ValueError(
            f"{int(unknown.sum())} images have labels without captions, e.g. {int(labels[unknown][0])}: "
            "their class has no text embedding"
        )
    scores = text @ _normalize(images).T  # (C, N) cosines
    best_class = torch.sort(scores, dim=0, descending=True, stable=True).indices[0]  # ties: lower class
    top1 = (best_class == pos).to(torch.float64).mean().item() * 100.0
    top = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :ap_at]  # ties: lower image
    hits = (labels[top] == classes[:, None]).sum(dim=1).to(torch.float64)
    precision = (hits / ap_at).mean().item() * 100.0
    return {
        "i2t_top1": top1,
        f"t2i_ap{ap_at}": precision,
        "num_classes": float(len(classes)),
        "num_images": float(len(images)),
        "ap_at": float(ap_at),
    }


__all__ = ["class_text_embeddings", "reed_metrics"]
