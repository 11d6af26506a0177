"""Task kinds: hand-computed cases, and every metric against a plain full-sort oracle on tied scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xmr.data.records import EvalSplit
from xmr.errors import ConfigError
from xmr.evaluation.metrics import Positives, positive_ranks
from xmr.evaluation.tasks import (
    ComposedTask,
    ImageTextTask,
    PersonTask,
    Task,
    build_task,
    map_from_ranks,
    positive_ranks_excluding,
    subset_ranks,
)

RAW = {"normalize": False}  # hand cases give the scores themselves


# ----------------------------------------------------------------------------------------------
# Oracle: a stable descending full sort per query (ties: lower gallery index first)
# ----------------------------------------------------------------------------------------------
def oracle_ranks(scores: np.ndarray, lists, exclude=None) -> list[list[int]]:
    out = []
    for q, row in enumerate(scores):
        removed = -1 if exclude is None else exclude[q]
        order = np.argsort(-row, kind="stable")
        order = order[order != removed]
        correct = set(lists[q]) - {removed}
        out.append([i + 1 for i, g in enumerate(order) if int(g) in correct])
    return out


def oracle_subset_rank(row: np.ndarray, group, correct, removed: int) -> int:
    members = np.array(sorted(set(group) - {removed}))
    order = members[np.argsort(-row[members], kind="stable")]
    hits = [i + 1 for i, g in enumerate(order) if int(g) in set(correct)]
    return hits[0] if hits else 0


def pct(flags) -> float:
    return 100.0 * float(np.mean(flags))


def oracle_ap(ranks: list[int], k: int) -> float:
    return sum((j + 1) / r for j, r in enumerate(ranks) if r <= k) / min(len(ranks), k)


def oracle_first(ranks: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    first = np.array(ranks, dtype=np.float64)
    out = {f"R{k}": pct(first <= k) for k in ks}
    out.update(medr=np.floor(np.median(first - 1)) + 1, meanr=first.mean())
    return out


def unit_features(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    """Four entries of +-1/2 per row: unit norm exactly, scores multiples of 1/4 (many exact ties)."""
    out = np.zeros((n, d), dtype=np.float32)
    for row in out:
        row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return out


def scores_of(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    return queries.astype(np.float64) @ gallery.astype(np.float64).T


# ----------------------------------------------------------------------------------------------
# Exclusion and subsets
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,query_chunk,gallery_chunk", [(0, 7, 13), (1, 64, None), (2, 1, 50), (3, 16, 1)])
def test_excluding_matches_oracle_with_ties(seed, query_chunk, gallery_chunk):
    rng = np.random.default_rng(seed)
    queries, gallery = unit_features(rng, 50), unit_features(rng, 120)
    lists = [sorted(rng.choice(120, int(rng.integers(0, 6)), replace=False).tolist()) for _ in range(50)]
    exclude = rng.integers(-1, 120, 50)
    for q in range(0, 50, 4):  # some excluded items are positives
        if lists[q]:
            exclude[q] = lists[q][0]
    ranks, counts = positive_ranks_excluding(queries, gallery, Positives.from_lists(lists, 120), exclude,
                                             query_chunk=query_chunk, gallery_chunk=gallery_chunk)
    expected = oracle_ranks(scores_of(queries, gallery), lists, exclude)
    assert counts.tolist() == [len(r) for r in expected]
    assert [ranks[q, : len(r)].tolist() for q, r in enumerate(expected)] == expected
    assert int((ranks[:, 1:] > 0).sum()) == sum(max(len(r) - 1, 0) for r in expected)  # padding stays 0


def test_excluded_item_ties_follow_gallery_index():
    query, gallery = np.array([[1.0]]), np.array([[0.5], [0.5], [0.5], [0.25]])
    positives = Positives.from_lists([[1]], 4)
    assert positive_ranks_excluding(query, gallery, positives, [0], **RAW)[0].tolist() == [[1]]  # 0 precedes 1
    assert positive_ranks_excluding(query, gallery, positives, [2], **RAW)[0].tolist() == [[2]]  # 2 follows 1
    ranks, counts = positive_ranks_excluding(query, gallery, Positives.from_lists([[0, 1]], 4), [0], **RAW)
    assert ranks.tolist() == [[1]] and counts.tolist() == [1]  # an excluded positive is dropped


def test_subset_ranks_match_oracle_with_ties():
    rng = np.random.default_rng(4)
    queries, gallery = unit_features(rng, 40), unit_features(rng, 60)
    groups = [rng.choice(60, 6, replace=False).tolist() for _ in range(40)]
    lists = [[g[int(rng.integers(0, 6))]] if q % 5 else [] for q, g in enumerate(groups)]
    exclude = [g[0] for g in groups]
    got = subset_ranks(queries, gallery, groups, lists, exclude, query_chunk=7)
    scores = scores_of(queries, gallery)
    assert got.tolist() == [oracle_subset_rank(scores[q], groups[q], lists[q], exclude[q]) for q in range(40)]


# ----------------------------------------------------------------------------------------------
# Composed: hand cases
# ----------------------------------------------------------------------------------------------
def test_cirr_reference_removed_and_recall_subset():
    # Gallery scores for query 0: ref 0.9 > a 0.8 > target 0.7 > b 0.6 > c 0.5 > d 0.4 (> filler).
    query = np.array([[1.0], [1.0]])
    gallery = np.array([[0.875], [0.75], [0.625], [0.5], [0.375], [0.25], [0.125], [0.0]])
    split = EvalSplit(gallery_paths=[f"{i}.png" for i in range(8)], positives=[[2], [2]],
                      query_texts=["t", "t"], query_images=["r.png", "r.png"], exclude=[0, 0],
                      groups=[[0, 1, 3, 4, 5, 2], [0, 2, 3, 4, 5, 6]])
    task = ComposedTask("cirr")
    ranks, _ = positive_ranks_excluding(query, gallery, Positives.from_lists(split.positives, 8), split.exclude,
                                        **RAW)
    assert ranks.tolist() == [[2], [2]]  # third overall, second once the reference is gone
    out = task.evaluate(split, query, gallery, **RAW)["composed"]
    assert out["R@1"] == 0 and out["R@5"] == 100 and out["R@50"] == 100
    # Query 0: members minus ref ordered a > target > ...: subset rank 2; query 1: the target is best.
    assert out["Rs@1"] == 50 and out["Rs@2"] == 100 and out["Rs@3"] == 100
    assert out["avg"] == pytest.approx((100 + 50) / 2)
    assert task.primary == "avg" and task.primary_value({"composed": out}) == out["avg"]


def test_circo_average_precision_by_hand():
    # Three positives placed at ranks 1, 3 and 12 of a 20-item gallery (scores descending by index).
    gallery = np.array([[20.0 - i] for i in range(20)])
    split = EvalSplit(gallery_paths=[str(i) for i in range(20)], positives=[[0, 2, 11]], query_texts=["t"],
                      query_images=["r"])
    out = ComposedTask("circo").evaluate(split, np.array([[1.0]]), gallery, **RAW)["composed"]
    assert out["mAP@5"] == pytest.approx(55.5556, abs=1e-4) and out["mAP@10"] == pytest.approx(55.5556, abs=1e-4)
    assert out["mAP@25"] == pytest.approx(63.8889, abs=1e-4) and out["mAP@50"] == pytest.approx(63.8889, abs=1e-4)
    # |GT| = 7 hit at 2 and 4: (1/2 + 2/4) / 5; |GT| = 23 with the top 5 all hits: 1.
    ranks = torch.tensor([[2, 4, 60, 61, 62, 63, 64] + [0] * 16, list(range(1, 24))])
    got = map_from_ranks(ranks, torch.tensor([7, 23]), (5,))
    assert got[5] == pytest.approx(100 * (0.2 + 1.0) / 2)


def test_fashioniq_categories_are_averaged_without_weighting():
    # R@10 per category: dress 1/5 = 20, shirt 3/10 = 30, toptee 4/10 = 40 -> 30 (pooled would be 32).
    cats = ["dress"] * 5 + ["shirt"] * 10 + ["toptee"] * 10
    hits = [1] * 1 + [0] * 4 + [1] * 3 + [0] * 7 + [1] * 4 + [0] * 6
    ranks = torch.tensor([[5] if h else [11] for h in hits])  # 11: a miss at 10, a hit at 50
    split = EvalSplit(gallery_paths=[str(i) for i in range(60)], positives=[[0]] * 25, query_texts=["t"] * 25,
                      query_images=["r"] * 25, categories=cats)
    out = ComposedTask("fashioniq").metrics_from_ranks(ranks, torch.ones(25, dtype=torch.int64), split, "composed")
    assert (out["dress/R@10"], out["shirt/R@10"], out["toptee/R@10"]) == pytest.approx((20, 30, 40))
    assert out["R@10"] == pytest.approx(30) and out["R@50"] == 100
    assert out["avg"] == pytest.approx(65) and out["shirt/num_queries"] == 10
    assert "category_mean/R@10" not in out


def test_queries_without_positive_are_skipped_and_counted():
    gallery = np.array([[1.0], [0.5], [0.25]])
    split = EvalSplit(gallery_paths=["a", "b", "c"], positives=[[1], [], [0]], query_texts=["t"] * 3,
                      query_images=["r"] * 3)
    out = ComposedTask().evaluate(split, np.ones((3, 1)), gallery, **RAW)["composed"]
    assert out["R@1"] == 50 and out["num_queries"] == 3 and out["num_queries_without_positive"] == 1
    hidden = EvalSplit(gallery_paths=["a"], positives=[[]], query_texts=["t"], query_images=["r"])
    with pytest.raises(ValueError, match="no query has a positive"):
        ComposedTask().evaluate(hidden, np.ones((1, 1)), np.ones((1, 1)))


# ----------------------------------------------------------------------------------------------
# Composed: oracle
# ----------------------------------------------------------------------------------------------
def composed_case(seed: int, q: int = 60, g: int = 150):
    rng = np.random.default_rng(seed)
    queries, gallery = unit_features(rng, q), unit_features(rng, g)
    lists = [sorted(rng.choice(g, int(rng.integers(1, 6)), replace=False).tolist()) for _ in range(q)]
    lists[3] = []  # hidden answer
    exclude = [int(x) for x in rng.integers(0, g, q)]
    groups = [sorted({exclude[i], *lists[i][:1], *rng.choice(g, 4, replace=False).tolist()}) for i in range(q)]
    cats = [["dress", "shirt", "toptee"][int(c)] for c in rng.choice(3, q, p=[0.2, 0.3, 0.5])]
    split = EvalSplit(gallery_paths=[f"{i}.jpg" for i in range(g)], positives=lists, query_texts=["t"] * q,
                      query_images=["r"] * q, exclude=exclude, groups=groups, categories=cats)
    return queries, gallery, split


def oracle_composed(scores: np.ndarray, split: EvalSplit, task: ComposedTask, rows) -> dict[str, float]:
    exclude = split.exclude if task.remove_reference is not False else None
    ranks = oracle_ranks(scores, split.positives, exclude)
    rows = [q for q in rows if ranks[q]]
    out = {f"R@{k}": pct([ranks[q][0] <= k for q in rows]) for k in task.spec.recall}
    out.update({f"mAP@{k}": 100 * np.mean([oracle_ap(ranks[q], k) for q in rows]) for k in task.spec.mean_ap})
    for k in task.spec.subset:
        sub = [oracle_subset_rank(scores[q], split.groups[q], split.positives[q], split.exclude[q]) for q in rows]
        out[f"Rs@{k}"] = pct([1 <= s <= k for s in sub])
    return out


@pytest.mark.parametrize("protocol", ["generic", "fashioniq", "cirr", "circo"])
@pytest.mark.parametrize("with_categories", [False, True])
def test_composed_metrics_match_oracle(protocol, with_categories):
    queries, gallery, split = composed_case(5)
    if not with_categories:
        split.categories = None
    task = ComposedTask(protocol)
    got = task.evaluate(split, queries, gallery, query_chunk=9, gallery_chunk=40)["composed"]
    scores = scores_of(queries, gallery)
    pooled = oracle_composed(scores, split, task, range(len(split)))
    if with_categories:
        per_cat = {c: oracle_composed(scores, split, task, [q for q, x in enumerate(split.categories) if x == c])
                   for c in ("dress", "shirt", "toptee")}
        for cat, values in per_cat.items():
            assert {k: got[f"{cat}/{k}"] for k in values} == pytest.approx(values)
        mean = {k: np.mean([v[k] for v in per_cat.values()]) for k in pooled}
        headline = mean if protocol == "fashioniq" else pooled
        if protocol != "fashioniq":
            assert {k: got[f"category_mean/{k}"] for k in mean} == pytest.approx(mean)
    else:
        headline = pooled
    assert {k: got[k] for k in headline} == pytest.approx(headline)
    assert set(task.columns) <= set(got) and got["num_queries_without_positive"] == 1
    if protocol == "fashioniq":
        assert got["avg"] == pytest.approx((headline["R@10"] + headline["R@50"]) / 2)
    if protocol == "cirr":
        assert got["avg"] == pytest.approx((pooled["R@5"] + pooled["Rs@1"]) / 2)


def test_generic_protocol_removes_the_reference_only_when_given():
    queries, gallery, split = composed_case(6)
    removed = ComposedTask("generic").evaluate(split, queries, gallery)["composed"]
    split.exclude = None
    kept = ComposedTask("generic").evaluate(split, queries, gallery)["composed"]
    assert removed != kept
    task = ComposedTask("circo")
    assert task.evaluate(split, queries, gallery)["composed"]["mAP@10"] == pytest.approx(
        oracle_composed(scores_of(queries, gallery), split, task, range(len(split)))["mAP@10"])
    with pytest.raises(ValueError, match="split.exclude"):
        ComposedTask("cirr").evaluate(split, queries, gallery)


# ----------------------------------------------------------------------------------------------
# Image-text
# ----------------------------------------------------------------------------------------------
def image_text_case(scores: np.ndarray, captions_per_image: int = 5):
    """Images as one-hot rows and captions as columns of ``scores`` (images x captions): raw scores."""
    n_img, n_cap = scores.shape
    split = EvalSplit(gallery_paths=[f"{i}.jpg" for i in range(n_img)],
                      positives=[[c // captions_per_image] for c in range(n_cap)], query_texts=["c"] * n_cap)
    return split, scores.T.astype(np.float32).copy(), np.eye(n_img, dtype=np.float32)


def three_image_scores() -> np.ndarray:
    s = np.zeros((3, 15))
    s[0, :5] = 5  # image 0: its own captions first -> rank 1
    s[1, [0, 2]], s[1, 5:10] = 9, 5  # image 1: two of image 0's captions ahead -> rank 3
    s[2, :6], s[2, 10:] = 2, 1  # image 2: six captions ahead -> rank 7
    return s


def test_image_text_best_caption_at_rank_three_and_rsum_by_hand():
    split, captions, images = image_text_case(three_image_scores())
    task = ImageTextTask()
    ranks, counts = task.ranks(split, captions, images, "i2t", **RAW)
    assert ranks[:, 0].tolist() == [1, 3, 7] and counts.tolist() == [5, 5, 5]
    assert ranks[1].tolist() == [3, 4, 5, 6, 7]
    one = task.metrics_from_ranks(ranks[1:2], counts[1:2], EvalSplit(["x"], [[0]] * 5, query_texts=["c"] * 5),
                                  "i2t")
    assert (one["R1"], one["R5"], one["medr"]) == (0, 100, 3)
    out = task.evaluate(split, captions, images, **RAW)
    # t2i: captions 0 and 2 see image 1 (9) above image 0 (5): rank 2; the other 13 rank 1.
    assert out["t2i"]["R1"] == pytest.approx(1300 / 15) and out["t2i"]["R5"] == 100
    assert out["t2i"]["medr"] == 1 and out["t2i"]["meanr"] == pytest.approx(17 / 15)
    assert out["i2t"]["R1"] == pytest.approx(100 / 3) and out["i2t"]["R5"] == pytest.approx(200 / 3)
    assert out["i2t"]["R10"] == 100 and out["i2t"]["medr"] == 3 and out["i2t"]["meanr"] == pytest.approx(11 / 3)
    assert out["t2i"]["rsum"] == pytest.approx(1300 / 15 + 100 + 100 + 100 / 3 + 200 / 3 + 100)  # 486.67
    assert task.primary_value(out) == pytest.approx(486.6667, abs=1e-4)


def test_image_text_ties_follow_caption_index():
    s = three_image_scores()
    s[1, 4] = 5  # ties image 1's own captions and comes first: image 1's best caption drops to rank 4
    split, captions, images = image_text_case(s)
    out = ImageTextTask().evaluate(split, captions, images, **RAW)
    assert out["i2t"]["medr"] == 4 and out["i2t"]["meanr"] == 4
    assert out["t2i"]["R1"] == pytest.approx(1300 / 15)  # caption 4: images 0 and 1 tie, image 0 first


def test_image_text_reference_code_example():
    # 0-based best ranks: i2t (0, 2, 11); t2i ten 0, three 1, two 2.
    split = EvalSplit([f"{i}" for i in range(3)], [[c // 5] for c in range(15)], query_texts=["c"] * 15)
    task = ImageTextTask()
    i2t = task.metrics_from_ranks(torch.tensor([[1], [3], [12]]), torch.ones(3, dtype=torch.int64), split, "i2t")
    t2i = task.metrics_from_ranks(torch.tensor([[1]] * 10 + [[2]] * 3 + [[3]] * 2),
                                  torch.ones(15, dtype=torch.int64), split, "t2i")
    assert [i2t[k] for k in ("R1", "R5", "R10", "medr")] == pytest.approx([33.333, 66.667, 66.667, 3], abs=1e-3)
    assert i2t["meanr"] == pytest.approx(16 / 3)
    assert [t2i[k] for k in ("R1", "R5", "R10", "medr")] == pytest.approx([66.667, 100, 100, 1], abs=1e-3)
    assert t2i["meanr"] == pytest.approx(22 / 15)
    assert task.add_summary({"t2i": t2i, "i2t": i2t})["t2i"]["rsum"] == pytest.approx(433.333, abs=1e-3)
    two = task.metrics_from_ranks(torch.tensor([[1], [2]]), torch.ones(2, dtype=torch.int64),
                                  EvalSplit(["a", "b"], [[0], [1]], query_texts=["c"] * 2), "t2i")
    assert two["medr"] == 1  # floor(median of 0-based ranks {0, 1}) + 1


def random_image_text(seed: int, n_img: int = 20, per: int = 5):
    rng = np.random.default_rng(seed)
    images, captions = unit_features(rng, n_img), unit_features(rng, n_img * per)
    owner = rng.permutation(np.repeat(np.arange(n_img), per))  # captions not grouped by image
    split = EvalSplit([f"{i}.jpg" for i in range(n_img)], [[int(o)] for o in owner], query_texts=["c"] * len(owner))
    return split, captions, images, owner


def oracle_image_text(captions, images, owner, folds: int) -> dict[str, dict[str, float]]:
    size, per_fold = len(images) // folds, {"t2i": [], "i2t": []}
    for f in range(folds):
        caps = np.flatnonzero((owner >= f * size) & (owner < (f + 1) * size))
        local = owner[caps] - f * size
        scores = scores_of(captions[caps], images[f * size : (f + 1) * size])
        t2i = oracle_ranks(scores, [[int(i)] for i in local])
        i2t = oracle_ranks(scores.T, [np.flatnonzero(local == i).tolist() for i in range(size)])
        per_fold["t2i"].append(oracle_first([r[0] for r in t2i]))
        per_fold["i2t"].append(oracle_first([r[0] for r in i2t]))
    return {d: {k: np.mean([m[k] for m in ms]) for k in ms[0]} for d, ms in per_fold.items()}


@pytest.mark.parametrize("folds", [None, 5])
def test_image_text_matches_oracle_with_ties(folds):
    split, captions, images, owner = random_image_text(7)
    out = ImageTextTask(folds=folds).evaluate(split, torch.from_numpy(captions), images, query_chunk=6,
                                              gallery_chunk=5)
    expected = oracle_image_text(captions, images, owner, folds or 1)
    for direction in ("t2i", "i2t"):
        assert {k: out[direction][k] for k in expected[direction]} == pytest.approx(expected[direction])
    assert out["t2i"]["rsum"] == pytest.approx(sum(expected[d][f"R{k}"] for d in expected for k in (1, 5, 10)))


def test_coco_folds_equal_the_average_of_single_fold_runs():
    split, captions, images, owner = random_image_text(8, n_img=25)
    folded = ImageTextTask(folds=5).evaluate(split, captions, images)
    runs = []
    for f in range(5):
        caps = np.flatnonzero(owner // 5 == f)
        sub = EvalSplit([f"{i}" for i in range(5)], [[int(owner[c]) - 5 * f] for c in caps],
                        query_texts=["c"] * len(caps))
        runs.append(ImageTextTask().evaluate(sub, captions[caps], images[5 * f : 5 * f + 5]))
    for direction in ("t2i", "i2t"):
        for key in ("R1", "R5", "R10", "medr", "meanr"):
            assert folded[direction][key] == pytest.approx(np.mean([r[direction][key] for r in runs]))
    assert folded["t2i"]["rsum"] == pytest.approx(np.mean([r["t2i"]["rsum"] for r in runs]))
    with pytest.raises(ValueError, match="equal folds"):
        ImageTextTask(folds=4).evaluate(split, captions, images)


# ----------------------------------------------------------------------------------------------
# Person
# ----------------------------------------------------------------------------------------------
def test_person_matches_oracle_and_ranks_both_ways():
    rng = np.random.default_rng(9)
    texts, images = unit_features(rng, 70), unit_features(rng, 90)
    text_ids, image_ids = rng.integers(0, 30, 70), rng.integers(0, 30, 90)
    text_ids[0] = 99  # an identity without images
    split = EvalSplit([f"{i}" for i in range(90)], [np.flatnonzero(image_ids == t).tolist() for t in text_ids],
                      query_texts=["c"] * 70, query_labels=text_ids.tolist(), gallery_labels=image_ids.tolist())
    task = PersonTask(i2t=True)
    out = task.evaluate(split, texts, images, query_chunk=11, gallery_chunk=17)
    scores = scores_of(texts, images)
    for direction, s, ql, gl in (("t2i", scores, text_ids, image_ids), ("i2t", scores.T, image_ids, text_ids)):
        ranks = [r for r in oracle_ranks(s, [np.flatnonzero(gl == label).tolist() for label in ql]) if r]
        expected = {f"R{k}": pct([r[0] <= k for r in ranks]) for k in (1, 5, 10)}
        expected["mAP"] = 100 * np.mean([np.mean([(j + 1) / x for j, x in enumerate(r)]) for r in ranks])
        expected["mINP"] = 100 * np.mean([len(r) / r[-1] for r in ranks])
        assert {k: out[direction][k] for k in expected} == pytest.approx(expected)
        q, g = (texts, images) if direction == "t2i" else (images, texts)
        r, n = positive_ranks(q, g, Positives.from_labels(ql, gl))
        from_ranks = task.metrics_from_ranks(r, n, split, direction)
        assert from_ranks == pytest.approx(out[direction])
    assert out["t2i"]["num_queries_without_positive"] == int(np.isin(text_ids, image_ids, invert=True).sum()) >= 1
    assert list(PersonTask().evaluate(split, texts, images)) == ["t2i"]


# ----------------------------------------------------------------------------------------------
# Building and describing
# ----------------------------------------------------------------------------------------------
def test_build_task_options_and_describe():
    assert isinstance(build_task("person"), PersonTask)
    coco = build_task("image_text", folds=5)
    assert isinstance(coco, ImageTextTask) and coco.folds == 5 and coco.primary == "rsum"
    cirr = build_task("composed", protocol="cirr")
    assert isinstance(cirr, Task) and cirr.name == "composed" and cirr.columns[-1] == "avg"
    assert ComposedTask("circo").primary == "mAP@10" and ComposedTask().primary == "R@10"
    for task in (PersonTask(i2t=True), coco, cirr, ComposedTask("fashioniq")):
        report = json.loads(json.dumps(task.describe()))
        assert report["task"] == task.name and report["primary"] == task.primary
        assert "lower first" in report["tie_rule"] and task.primary in report["metrics"] | {"R1": ""}
    assert coco.describe()["folds"] == 5 and cirr.describe()["reference"].startswith("removed")
    with pytest.raises(ConfigError, match="did you mean"):
        build_task("composd")
    with pytest.raises(ConfigError, match="task 'composed'"):
        build_task("composed", protocl="cirr")
    with pytest.raises(ConfigError, match="unknown protocol"):
        build_task("composed", protocol="cir")
    with pytest.raises(ValueError, match="directions"):
        PersonTask().evaluate(EvalSplit(["a"], [[0]], query_texts=["t"]), np.ones((1, 2)), np.ones((1, 2)),
                              directions=["x2y"])
