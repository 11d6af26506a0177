"""Bounded-memory retrieval metrics against a plain full-sort oracle (per query, stable argsort)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmr.evaluation import (
    Positives,
    order_keys,
    positive_ranks,
    recall_at_k,
    retrieval_metrics,
    topk_bounded,
)

KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------------
# Oracle: the definitions, written plainly (full stable sort of each query's scores)
# ----------------------------------------------------------------------------------------------
def oracle_ranks(scores: np.ndarray, positives: list[set[int]]) -> list[np.ndarray]:
    out = []
    for row, correct in zip(scores, positives):
        order = np.argsort(-row, kind="stable")  # ties: lower gallery index first
        good = np.array([int(g) in correct for g in order])
        out.append(np.flatnonzero(good) + 1)
    return out


def oracle_metrics(scores: np.ndarray, positives: list[set[int]], ks=KS) -> dict[str, float]:
    hits = {k: 0 for k in ks}
    ap = inp = 0.0
    n = skipped = 0
    for ranks in oracle_ranks(scores, positives):
        if len(ranks) == 0:
            skipped += 1
            continue
        n += 1
        for k in ks:
            hits[k] += int(ranks[0] <= k)
        ap += float(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inp += len(ranks) / float(ranks[-1])
    out = {f"R{k}": 100.0 * hits[k] / n for k in ks}
    out.update(mAP=100.0 * ap / n, mINP=100.0 * inp / n, num_queries_without_positive=skipped)
    return out


def label_sets(query_labels: np.ndarray, gallery_labels: np.ndarray) -> list[set[int]]:
    return [set(np.flatnonzero(gallery_labels == label).tolist()) for label in query_labels]


def assert_same(ours: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


def quantised_case(seed: int = 0, q: int = 60, g: int = 250, d: int = 8, labels: int = 15):
    """Features on a 1/4 grid: every dot product is exact in fp32/bf16, and ties are frequent."""
    rng = np.random.default_rng(seed)
    queries = rng.integers(-2, 3, (q, d)) / 4.0
    gallery = rng.integers(-2, 3, (g, d)) / 4.0
    gallery_labels = rng.integers(0, labels, g)
    query_labels = rng.integers(0, labels, q)
    query_labels[3] = labels + 5  # a query without any correct gallery item
    return queries, gallery, query_labels, gallery_labels


# ----------------------------------------------------------------------------------------------
# retrieval_metrics
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "query_chunk,gallery_chunk",
    [(1024, None), (1, None), (7, 13), (7, 1), (1000, 7), (60, 250), (13, 1000), (1, 1)],
)
def test_metrics_match_oracle_with_ties_and_chunks(query_chunk, gallery_chunk):
    queries, gallery, ql, gl = quantised_case()
    expected = oracle_metrics(queries @ gallery.T, label_sets(ql, gl))
    ours = retrieval_metrics(
        torch.tensor(queries, dtype=torch.float32), torch.tensor(gallery, dtype=torch.float32), ql, gl,
        query_chunk=query_chunk, gallery_chunk=gallery_chunk, normalize=False)
    assert expected["num_queries_without_positive"] == 1
    assert_same(ours, expected)
    assert ours["num_queries"] == 60 and ours["num_gallery"] == 250


@pytest.mark.parametrize("seed", range(8))
def test_random_shapes_and_chunks(seed):
    rng = np.random.default_rng(100 + seed)
    q, g, d = int(rng.integers(1, 40)), int(rng.integers(1, 120)), int(rng.integers(1, 6))
    queries, gallery = rng.integers(-1, 2, (q, d)) / 2.0, rng.integers(-1, 2, (g, d)) / 2.0
    ql, gl = rng.integers(0, 4, q), rng.integers(0, 4, g)
    ql[0] = gl[0]  # at least one query with a positive
    query_chunk = int(rng.integers(1, 50))
    gallery_chunk = None if seed % 3 == 0 else int(rng.integers(1, 50))
    positives = Positives.from_labels(ql, gl)
    args = {"normalize": False, "query_chunk": query_chunk, "gallery_chunk": gallery_chunk}
    ours = retrieval_metrics(torch.tensor(queries), torch.tensor(gallery), ql, gl, **args)
    assert_same(ours, oracle_metrics(queries @ gallery.T, label_sets(ql, gl)))
    ranks, _ = positive_ranks(torch.tensor(queries), torch.tensor(gallery), positives, **args)
    for i, expected in enumerate(oracle_ranks(queries @ gallery.T, label_sets(ql, gl))):
        assert ranks[i, : len(expected)].tolist() == expected.tolist()


def test_all_scores_tied_orders_by_gallery_index():
    gl = np.array([0, 1, 0, 2, 1, 0])
    ql = np.array([0, 1, 2])
    zeros_q, zeros_g = torch.zeros(3, 4), torch.zeros(6, 4)
    ours = retrieval_metrics(zeros_q, zeros_g, ql, gl, normalize=False, gallery_chunk=4)
    # label 0 at ranks 1,3,6; label 1 at 2,5; label 2 at 4.
    ap = [(1 / 1 + 2 / 3 + 3 / 6) / 3, (1 / 2 + 2 / 5) / 2, 1 / 4]
    inp = [3 / 6, 2 / 5, 1 / 4]
    assert ours["R1"] == pytest.approx(100 / 3)
    assert ours["R5"] == pytest.approx(100.0)
    assert ours["mAP"] == pytest.approx(100 * sum(ap) / 3)
    assert ours["mINP"] == pytest.approx(100 * sum(inp) / 3)


def test_negative_zero_ties_with_positive_zero():
    keys = order_keys(torch.tensor([-0.0, 0.0, -0.0]), torch.arange(3))
    assert bool((keys[:-1] > keys[1:]).all())  # equal scores: index order only
    assert order_keys(torch.tensor([-1.0]), torch.tensor([0]))[0] < order_keys(
        torch.tensor([-0.5]), torch.tensor([5]))[0]


def test_normalize_true_matches_oracle_on_cosines():
    rng = np.random.default_rng(1)
    # Four entries of +-1 per row: the norm is exactly 2, so the cosines are exact dyadics.
    def rows(n):
        x = np.zeros((n, 8))
        for row in x:
            row[rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
        return x

    queries, gallery = rows(40), rows(120)
    ql, gl = rng.integers(0, 6, 40), rng.integers(0, 6, 120)
    expected = oracle_metrics((queries / 2) @ (gallery / 2).T, label_sets(ql, gl))
    ours = retrieval_metrics(torch.tensor(queries * 3.0, dtype=torch.float32),
                             torch.tensor(gallery * 0.5, dtype=torch.float32), ql, gl,
                             query_chunk=9, gallery_chunk=31)
    assert_same(ours, expected)


def test_generic_float_features():
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((80, 32)).astype(np.float32)
    gallery = rng.standard_normal((400, 32)).astype(np.float32)
    ql, gl = rng.integers(0, 30, 80), rng.integers(0, 30, 400)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    expected = oracle_metrics(qn.astype(np.float64) @ gn.T.astype(np.float64), label_sets(ql, gl))
    ours = retrieval_metrics(queries, gallery, ql, gl, query_chunk=16, gallery_chunk=64)
    assert_same(ours, expected)


def test_memmap_gallery_and_numpy_queries(tmp_path):
    queries, gallery, ql, gl = quantised_case(seed=3)
    path = tmp_path / "gallery.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=gallery.shape)
    mm[:] = gallery
    mm.flush()
    readonly = np.memmap(path, dtype=np.float32, mode="r", shape=gallery.shape)
    ours = retrieval_metrics(queries.astype(np.float32), readonly, ql, gl, normalize=False,
                             query_chunk=11, gallery_chunk=17)
    assert_same(ours, oracle_metrics(queries @ gallery.T, label_sets(ql, gl)))


def test_bf16_compute_is_exact_on_exact_products():
    queries, gallery, ql, gl = quantised_case(seed=4)
    ours = retrieval_metrics(torch.tensor(queries), torch.tensor(gallery), ql, gl, normalize=False,
                             query_chunk=8, gallery_chunk=40, compute_dtype=torch.bfloat16)
    assert_same(ours, oracle_metrics(queries @ gallery.T, label_sets(ql, gl)))


def test_positive_ranks_equal_oracle_ranks():
    queries, gallery, ql, gl = quantised_case(seed=5)
    positives = Positives.from_labels(ql, gl)
    ranks, counts = positive_ranks(torch.tensor(queries), torch.tensor(gallery), positives,
                                   normalize=False, query_chunk=5, gallery_chunk=23)
    for i, expected in enumerate(oracle_ranks(queries @ gallery.T, label_sets(ql, gl))):
        assert int(counts[i]) == len(expected)
        assert ranks[i, : len(expected)].tolist() == expected.tolist()
        assert not ranks[i, len(expected):].any()


def test_recall_at_k_with_lists_of_positives():
    queries, gallery, _, _ = quantised_case(seed=6)
    rng = np.random.default_rng(6)
    lists = [sorted(rng.choice(250, size=int(rng.integers(1, 6)), replace=False).tolist()) for _ in range(60)]
    lists[0] = lists[0] + lists[0][:1]  # duplicates are ignored
    expected = oracle_metrics(queries @ gallery.T, [set(items) for items in lists])
    ours = recall_at_k(torch.tensor(queries), torch.tensor(gallery), lists, ks=(1, 5, 10, 50),
                       normalize=False, query_chunk=7, gallery_chunk=19)
    expected50 = oracle_metrics(queries @ gallery.T, [set(items) for items in lists], ks=(50,))["R50"]
    assert set(ours) == {"R1", "R5", "R10", "R50"}
    assert_same(ours, {k: expected[k] for k in ("R1", "R5", "R10")})
    assert ours["R50"] == pytest.approx(expected50, abs=1e-6)


def test_no_query_with_positive_raises():
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics(torch.ones(2, 3), torch.ones(4, 3), [7, 8], [0, 1, 2, 3])


def test_nan_gallery_items_rank_last():
    queries, gallery, ql, gl = quantised_case(seed=9)
    broken = np.flatnonzero(~np.isin(gl, ql))[:3]  # items nobody is looking for
    gallery[broken] = np.nan
    scores = np.nan_to_num(queries @ gallery.T, nan=-np.inf)  # NaN items after every real score
    ours = retrieval_metrics(torch.tensor(queries), torch.tensor(gallery), ql, gl, normalize=False,
                             query_chunk=16, gallery_chunk=32)
    assert_same(ours, oracle_metrics(scores, label_sets(ql, gl)))


def test_nan_item_does_not_hide_a_candidate():
    # Item 0 is NaN in every row's scores; item 2 outscores query 0's positive (item 1).
    gallery = torch.tensor([[float("nan"), 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    queries = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    ours = retrieval_metrics(queries, gallery, [0, 1, 2, 3], [99, 0, 5, 1, 2, 3], normalize=False)
    assert ours["R1"] == pytest.approx(75.0)
    assert ours["mAP"] == pytest.approx(100 * (0.5 + 3) / 4)


def test_nan_features_raise():
    gallery = torch.ones(4, 3)
    gallery[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.ones(2, 3), gallery, [1, 1], [0, 1, 2, 3], normalize=False)


# ----------------------------------------------------------------------------------------------
# topk_bounded
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,query_chunk,gallery_chunk", [(10, 1024, None), (10, 7, 13), (5, 1, 3), (300, 9, 64)])
def test_topk_bounded_equals_stable_full_sort(k, query_chunk, gallery_chunk):
    queries, gallery, _, _ = quantised_case(seed=7)
    scores, indices = topk_bounded(torch.tensor(queries), torch.tensor(gallery), k, query_chunk,
                                   gallery_chunk, normalize=False)
    full = torch.tensor(queries @ gallery.T, dtype=torch.float32)
    kk = min(k, 250)
    assert scores.shape == indices.shape == (60, kk)
    stable = np.argsort(-full.numpy(), axis=1, kind="stable")[:, :kk]
    assert indices.tolist() == stable.tolist()  # ties resolved by gallery index
    # Scores equal torch.topk's (which leaves the order of tied indices unspecified).
    assert torch.equal(scores, full.topk(kk, dim=1).values)
    assert torch.equal(scores, full.gather(1, indices))


def test_topk_bounded_streams_a_memmap(tmp_path):
    queries, gallery, _, _ = quantised_case(seed=8)
    mm = np.memmap(tmp_path / "g.f32", dtype=np.float32, mode="w+", shape=gallery.shape)
    mm[:] = gallery
    scores, indices = topk_bounded(queries.astype(np.float32), mm, 7, 16, 29, normalize=False)
    stable = np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :7]
    assert indices.tolist() == stable.tolist()
    assert np.array_equal(scores.numpy(), np.take_along_axis(queries @ gallery.T, stable, 1).astype(np.float32))
