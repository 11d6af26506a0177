"""Losses against values computed by hand with plain Python math on tiny cases."""

from __future__ import annotations

import math

import pytest
import torch

from xmr import losses

# Unit vectors with simple cosines: a.b in {1, 0.8, 0.6, 0}.
IMAGES = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
TEXTS = [[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def softmax(row):
    z = [math.exp(v - max(row)) for v in row]
    return [v / sum(z) for v in z]


def kl_rows(logit_rows, target_rows, eps=1e-8):
    """mean_i sum_j p_ij (log p_ij - log(q_ij + eps)), plain Python."""
    total = 0.0
    for logits, target in zip(logit_rows, target_rows):
        p = softmax(logits)
        total += sum(pj * (math.log(pj) - math.log(qj + eps)) for pj, qj in zip(p, target))
    return total / len(logit_rows)


def cross_entropy(logit_rows, targets):
    return sum(-math.log(softmax(row)[t]) for row, t in zip(logit_rows, targets)) / len(targets)


def t(rows, scale=1.0):
    return torch.tensor(rows, dtype=torch.float32) * scale


def test_itc_two_by_two():
    # cos(I_i, T_j) = [[1, 0.6], [0, 0.8]] for I = [e1, e2], T = [e1, (0.6, 0.8)]; scale s = 2.
    image, text = t([[1.0, 0.0], [0.0, 1.0]], 3.0), t([[1.0, 0.0], [0.6, 0.8]], 0.5)
    i2t = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(-1.6))) / 2  # logits [[2,1.2],[0,1.6]]
    t2i = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-0.4))) / 2  # logits [[2,0],[1.2,1.6]]
    assert losses.itc_loss(image, text, 2.0).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)
    assert losses.itc_loss(image, text, torch.tensor(2.0)).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def sdm_by_hand(pid_labels, scale, eps=1e-8):
    """Row-normalised labels y / sum(y); t2i rows = texts, i2t rows = images."""
    n = len(IMAGES)
    q = [[pid_labels[j][k] / sum(pid_labels[j]) for k in range(n)] for j in range(n)]
    t2i = [[scale * dot(TEXTS[j], IMAGES[k]) for k in range(n)] for j in range(n)]
    i2t = [[scale * dot(IMAGES[j], TEXTS[k]) for k in range(n)] for j in range(n)]
    return kl_rows(i2t, q, eps) + kl_rows(t2i, q, eps)


def test_sdm_with_a_shared_pid():
    pids = torch.tensor([4, 4, 9])  # pairs 0 and 1 are the same person
    y = [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    expected = sdm_by_hand(y, 10.0)
    got = losses.sdm_loss(t(IMAGES, 2.0), t(TEXTS, 7.0), pids, 10.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # The numbers by hand: q rows are [.5,.5,0], [.5,.5,0], [0,0,1].
    assert expected > 0


def test_sdm_all_distinct_pids_is_kl_to_the_diagonal():
    pids = torch.tensor([0, 1, 2])
    expected = sdm_by_hand([[1, 0, 0], [0, 1, 0], [0, 0, 1]], 5.0)
    assert losses.sdm_loss(t(IMAGES), t(TEXTS), pids, 5.0).item() == pytest.approx(expected, rel=1e-5)


def test_sdm_soft_labels():
    # pids [3,3,3]; images of pairs 0 and 1 are the same picture, pair 2 another picture of the person.
    w = 0.3
    y = [[1, 1, w], [1, 1, w], [w, w, 1]]
    expected = sdm_by_hand(y, 10.0)
    got = losses.sdm_loss(t(IMAGES), t(TEXTS), torch.tensor([3, 3, 3]), 10.0,
                          image_ids=torch.tensor([8, 8, 5]), soft_label_weight=w)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    hard = losses.sdm_loss(t(IMAGES), t(TEXTS), torch.tensor([3, 3, 3]), 10.0)
    assert hard.item() == pytest.approx(sdm_by_hand([[1] * 3] * 3, 10.0), rel=1e-5)
    with pytest.raises(ValueError, match="image_ids"):
        losses.sdm_loss(t(IMAGES), t(TEXTS), torch.tensor([3, 3, 3]), 10.0, soft_label_weight=w)


def test_cmpm_uses_raw_image_on_unit_text():
    pids = torch.tensor([1, 1, 2])
    image, text = t(IMAGES, 2.0), t(TEXTS, 3.0)  # raw norms 2 and 3
    n = 3
    q = [[1 / 2, 1 / 2, 0], [1 / 2, 1 / 2, 0], [0, 0, 1]]
    i2t = [[2.0 * dot(IMAGES[i], TEXTS[j]) for j in range(n)] for i in range(n)]
    t2i = [[3.0 * dot(TEXTS[i], IMAGES[j]) for j in range(n)] for i in range(n)]
    expected = kl_rows(i2t, q) + kl_rows(t2i, q)
    assert losses.cmpm_loss(image, text, pids).item() == pytest.approx(expected, rel=1e-5)
    q2 = [[1 / math.sqrt(2), 1 / math.sqrt(2), 0], [1 / math.sqrt(2), 1 / math.sqrt(2), 0], [0, 0, 1]]
    expected_l2 = kl_rows(i2t, q2) + kl_rows(t2i, q2)
    got_l2 = losses.cmpm_loss(image, text, pids, label_norm="l2")
    assert got_l2.item() == pytest.approx(expected_l2, rel=1e-5)


def test_id_loss():
    logits_i, logits_t = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], [[0.0, 1.0, 0.0], [3.0, -2.0, 1.0]]
    pids = [0, 2]
    expected = (cross_entropy(logits_i, pids) + cross_entropy(logits_t, pids)) / 2
    got = losses.id_loss(t(logits_i), t(logits_t), torch.tensor(pids))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_mlm_ignores_unlabelled_positions():
    logits = [[[0.0, 2.0, 1.0, 0.0], [5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0]]]
    labels = torch.tensor([[1, 0, 2]])  # position 1 is ignored (label 0) despite its confident logits
    expected = cross_entropy([logits[0][0], logits[0][2]], [1, 2])
    loss, acc = losses.mlm_loss(t(logits), labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert acc.item() == pytest.approx(0.5)  # position 0 right (argmax 1), position 2 wrong (argmax 3)


def test_mlm_without_labels_is_a_connected_zero():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss, acc = losses.mlm_loss(logits, torch.zeros(2, 3, dtype=torch.long))
    assert loss.item() == 0.0 and acc.item() == 0.0
    loss.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_kl_distillation():
    student, teacher, tau = [[1.0, 0.0, -1.0]], [[0.0, 2.0, 0.0]], 2.0
    p_t, p_s = softmax([v / tau for v in teacher[0]]), softmax([v / tau for v in student[0]])
    expected = tau**2 * sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s))
    got = losses.kl_distillation_loss(t(student), t(teacher), tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert losses.kl_distillation_loss(t(teacher), t(teacher), tau).item() == pytest.approx(0.0, abs=1e-7)


def test_gradients_flow():
    torch.manual_seed(0)
    image = torch.randn(6, 8, requires_grad=True)
    text = torch.randn(6, 8, requires_grad=True)
    pids = torch.tensor([0, 0, 1, 2, 2, 3])
    total = (losses.sdm_loss(image, text, pids, 50.0) + losses.itc_loss(image, text, 50.0)
             + losses.cmpm_loss(image, text, pids))
    total.backward()
    for grad in (image.grad, text.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    x, y = torch.randn(8, 16), torch.randn(8, 16)
    pids = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4])
    head = torch.nn.Linear(8, 6)

    def all_losses():
        image, text = layer(x), layer(y)
        mlm, _ = losses.mlm_loss(head(image).unsqueeze(1), pids.unsqueeze(1) + 1)
        return torch.stack([
            losses.itc_loss(image, text, 50.0),
            losses.sdm_loss(image, text, pids, 50.0),
            losses.cmpm_loss(image, text, pids),
            losses.id_loss(head(image), head(text), pids),
            mlm,
            losses.kl_distillation_loss(head(image), head(text), 2.0),
        ])

    reference = all_losses()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = all_losses()
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, reference, rtol=5e-2, atol=5e-2)
