"""Training objectives for cross-modal retrieval: small pure functions, formula in each docstring.

Conventions shared by every function here:

* ``B`` is the batch size; row ``i`` of the image features and row ``i`` of the text features form
  pair ``i``. ``pids`` are integer identity labels (B,).
* ``logit_scale`` is the multiplier applied to cosines, i.e. ``1 / tau`` (50 for IRRA's tau = 0.02),
  **not** its logarithm. A float or a 0-d tensor.
* Every softmax / log-softmax / cross-entropy is computed in float32 (inputs are cast with
  ``.float()``), so the losses behave the same inside a bf16/fp16 autocast region.
* All losses are means over the batch (scalar tensors) and keep the graph for backprop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "cmpm_loss",
    "id_loss",
    "itc_loss",
    "kl_distillation_loss",
    "mlm_loss",
    "proxy_anchor_loss",
    "proxy_softmax_loss",
    "same_label_matrix",
    "sdm_loss",
]

Scale = float | torch.Tensor


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise rows in float32."""
    return F.normalize(x.float(), dim=-1)


def _as_scale(logit_scale: Scale) -> Scale:
    # A tensor scale may be bf16 under autocast: keep the product in fp32.
    return logit_scale.float() if isinstance(logit_scale, torch.Tensor) else float(logit_scale)


def same_label_matrix(labels: torch.Tensor) -> torch.Tensor:
    """``y[i, j] = 1.0`` when ``labels[i] == labels[j]`` else ``0.0`` (float32, B x B)."""
    labels = labels.reshape(-1)
    return (labels[:, None] == labels[None, :]).float()


def _kl_to_target(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """``mean_rows sum_j p_j (log p_j - log(q_j + eps))`` with ``p = softmax(logits)`` (row-wise)."""
    log_p = F.log_softmax(logits.float(), dim=1)
    p = log_p.exp()
    return (p * (log_p - torch.log(target + eps))).sum(dim=1).mean()


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: Scale) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP's image-text contrastive loss) with diagonal labels.

    With ``I``, ``T`` the L2-normalised features and ``s = logit_scale``::

        itc = ( CE(s * I @ T^T, diag) + CE(s * T @ I^T, diag) ) / 2

    where ``CE(L, diag) = -mean_i log softmax(L_i)_i`` (pair ``i`` is the only positive of row ``i``).
    """
    logits = _as_scale(logit_scale) * _unit(image_feats) @ _unit(text_feats).t()
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def _sdm_labels(
    pids: torch.Tensor, image_ids: torch.Tensor | None, soft_label_weight: float | None
) -> torch.Tensor:
    """Unnormalised SDM label matrix ``y`` (see :func:`sdm_loss`)."""
    y = same_label_matrix(pids)
    if soft_label_weight is None:
        return y
    if image_ids is None:
        raise ValueError("sdm_loss: soft_label_weight needs image_ids (the image id of every pair)")
    same_image = same_label_matrix(image_ids)
    # Same image -> 1, same pid but another image -> w, otherwise 0 (same image implies same pid).
    return soft_label_weight * (y - same_image).clamp_min(0) + same_image


def sdm_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    pids: torch.Tensor,
    logit_scale: Scale,
    *,
    image_ids: torch.Tensor | None = None,
    soft_label_weight: float | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Similarity Distribution Matching (IRRA, Jiang & Ye CVPR 2023, Eq. 4-6).

    ``I``, ``T`` are the L2-normalised features and ``S = T @ I^T`` the text-to-image cosines.
    Label matrix ``y[j, k] = 1[pid_j == pid_k]`` (the diagonal is 1). Soft-label variant (only when
    both ``image_ids`` and ``soft_label_weight = w`` are given; the reference code uses w = 0.3)::

        y[j, k] = 1                if image_id_j == image_id_k
                = w                if pid_j == pid_k but the images differ
                = 0                otherwise

    True matching distribution, row-normalised: ``q[j, k] = y[j, k] / sum_k' y[j, k']``.
    Predicted distribution: ``p_j = softmax(logit_scale * S_j)``. Then::

        t2i = mean_j sum_k p[j, k] (log p[j, k] - log(q[j, k] + eps))      # KL(p_j || q_j)
        i2t = the same with S^T (image rows; y is symmetric so q is the same matrix)
        sdm = i2t + t2i

    ``log p`` is taken from ``log_softmax`` (numerically safe). Note on the reference code: it divides
    ``y`` by ``y.sum(1)`` with broadcasting, i.e. column ``k`` by the sum of row ``k``; that equals the
    row normalisation above for hard labels (matching rows have equal sums) but can differ slightly
    for soft labels; we implement the row normalisation the paper states.
    """
    y = _sdm_labels(pids, image_ids, soft_label_weight)
    q = y / y.sum(dim=1, keepdim=True)
    t2i = _as_scale(logit_scale) * _unit(text_feats) @ _unit(image_feats).t()
    return _kl_to_target(t2i.t(), q, eps) + _kl_to_target(t2i, q, eps)


def cmpm_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    pids: torch.Tensor,
    eps: float = 1e-8,
    *,
    label_norm: str = "l1",
) -> torch.Tensor:
    """Cross-Modal Projection Matching (Zhang & Lu, ECCV 2018, Eq. 1-4).

    Image features ``x`` are projected on the *normalised* text features ``z / |z|`` (no temperature)::

        p[i, j] = softmax_j( x_i . z_j / |z_j| )
        q[i, j] = y[i, j] / sum_k y[i, k],      y[i, j] = 1[pid_i == pid_j]
        i2t     = mean_i sum_j p[i, j] (log p[i, j] - log(q[i, j] + eps))
        t2i     = the same with the roles of image and text swapped (z projected on x / |x|)
        cmpm    = i2t + t2i

    ``label_norm="l2"`` divides ``y`` by its row L2 norm instead, as the IRRA reference code does
    (the CMPM paper uses the L1 normalisation, our default).
    """
    y = same_label_matrix(pids)
    if label_norm == "l1":
        q = y / y.sum(dim=1, keepdim=True)
    elif label_norm == "l2":
        q = y / y.norm(dim=1, keepdim=True)
    else:
        raise ValueError(f"cmpm_loss: label_norm must be 'l1' or 'l2', got {label_norm!r}")
    image, text = image_feats.float(), text_feats.float()
    i2t = image @ _unit(text).t()
    t2i = text @ _unit(image).t()
    return _kl_to_target(i2t, q, eps) + _kl_to_target(t2i, q, eps)


def id_loss(logits_image: torch.Tensor, logits_text: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """Identity classification loss shared by both modalities (IRRA Eq. 9)::

        id = ( CE(logits_image, pid) + CE(logits_text, pid) ) / 2

    ``logits_*`` are ``W f + b`` for the un-normalised features (B x num_ids); CE is the batch mean.
    """
    return (F.cross_entropy(logits_image.float(), pids) + F.cross_entropy(logits_text.float(), pids)) / 2


def mlm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-language-modelling loss and accuracy (IRRA's IRR objective, Eq. 8).

    Over the labelled positions ``M = {(b, l) : labels[b, l] != ignore_index}``::

        mlm      = -1/|M| sum_{(b,l) in M} log softmax(logits[b, l])[labels[b, l]]
        accuracy =  1/|M| sum_{(b,l) in M} 1[argmax logits[b, l] == labels[b, l]]

    ``logits`` is (B, L, V), ``labels`` (B, L). If no position is labelled the loss is a zero that is
    still connected to the graph (``0 * logits.sum()``) and the accuracy is 0. The accuracy is
    returned detached.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"mlm_loss: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    selected = labels != ignore_index
    if not bool(selected.any()):
        return logits.sum() * 0.0, torch.zeros((), device=logits.device)
    # Only ~15% of positions are labelled: select them before the V-wide log-softmax.
    chosen, target = logits[selected].float(), labels[selected]
    loss = F.cross_entropy(chosen, target)
    accuracy = (chosen.detach().argmax(dim=-1) == target).float().mean()
    return loss, accuracy


def kl_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Soft-target knowledge distillation (Hinton et al., 2015)::

        kd = tau^2 * mean_rows KL( softmax(t / tau) || softmax(s / tau) )
           = tau^2 * mean_rows sum_c p_t (log p_t - log p_s)

    over the last dimension; all leading dimensions are rows. The ``tau^2`` factor keeps gradient
    magnitudes comparable across temperatures. The teacher is **not** detached here: pass
    ``teacher_logits.detach()`` when the teacher must not learn.
    """
    if temperature <= 0:
        raise ValueError(f"kl_distillation_loss: temperature must be > 0, got {temperature}")
    num_classes = student_logits.shape[-1]
    log_p_s = F.log_softmax(student_logits.float().reshape(-1, num_classes) / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float().reshape(-1, num_classes) / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1).mean()
    return kl * temperature**2


def proxy_softmax_loss(feats: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """Each feature classified over all proxies by cosine (normalised softmax, ProxyNCA++ form)::

        loss = -1/N sum_j log softmax_k( cos(r_k, e_j) / tau )[y_j]

    ``feats`` (N, D), ``proxies`` (M, D), ``labels`` (N,) in 0..M-1. The positive proxy is in the
    denominator. No stop-gradient here: MMRef's global fusion passes ``feats.detach()`` (only the
    references learn) and its RGRL passes ``proxies.detach()`` (only the encoders learn).
    """
    if temperature <= 0:
        raise ValueError(f"proxy_softmax_loss: temperature must be > 0, got {temperature}")
    logits = _unit(feats) @ _unit(proxies).t() / temperature
    return F.cross_entropy(logits, labels.reshape(-1).long())


def proxy_anchor_loss(feats: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor,
                      alpha: float = 32.0, delta: float = 0.1) -> torch.Tensor:
    """Proxy-Anchor loss (Kim et al., CVPR 2020) on cosines s(x, p)::

        loss = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
             + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

    P: all M proxies; P+: those with at least one positive in the batch; X_p+ / X_p-: the batch's
    features of / not of class p. ``feats`` (N, D), ``proxies`` (M, D), ``labels`` (N,).
    """
    cos = _unit(feats) @ _unit(proxies).t()  # (N, M)
    positive = F.one_hot(labels.reshape(-1).long(), proxies.shape[0]).bool()
    zero = torch.zeros((), device=cos.device)
    pos_terms = torch.where(positive, torch.exp(-alpha * (cos - delta)), zero).sum(dim=0)
    neg_terms = torch.where(positive, zero, torch.exp(alpha * (cos + delta))).sum(dim=0)
    with_pos = positive.any(dim=0)
    pos_loss = torch.log1p(pos_terms[with_pos]).sum() / with_pos.sum().clamp(min=1)
    neg_loss = torch.log1p(neg_terms).sum() / proxies.shape[0]
    return pos_loss + neg_loss
