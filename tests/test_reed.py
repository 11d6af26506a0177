"""CUB-200-2011 and Oxford-102 Flowers with Reed et al.'s captions: the readers on tiny generated trees in
the real layouts (splits from the class lists, bad input), Reed's class-level metrics by hand and against a
plain loop, and MMRef trained and evaluated on CUB end to end (both protocols printed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from xmr.data.formats import detect_format, load_dataset
from xmr.data.synthetic_reed import generate_cub_tree, generate_flowers_tree
from xmr.errors import DataError
from xmr.evaluation.reed import class_text_embeddings, reed_metrics
from xmr.evaluation.tasks import build_task


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    return generate_cub_tree(tmp_path_factory.mktemp("cub") / "CUB", num_classes=12, images_per_class=3,
                             num_test_classes=3, image_size=32, seed=1)


@pytest.fixture(scope="module")
def flowers_root(tmp_path_factory) -> Path:
    return generate_flowers_tree(tmp_path_factory.mktemp("flowers") / "flowers", num_classes=10,
                                 images_per_class=3, num_test_classes=2, image_size=32, seed=2)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def lines(path: Path) -> list[str]:
    return [s.strip() for s in path.read_text().splitlines() if s.strip()]


# ------------------------------------------------------------------ the generated trees


def test_generator_writes_the_real_layouts_deterministically(cub_root, flowers_root, tmp_path):
    cap = cub_root / "cvpr2016_cub"
    classes = sorted(p.name for p in (cap / "text_c10").iterdir())
    assert len(classes) == 12 and all(c[:3].isdigit() and c[3] == "." for c in classes)
    assert len(lines(cap / "trainvalclasses.txt")) == 9 and len(lines(cap / "testclasses.txt")) == 3
    first = min((cap / "text_c10" / classes[0]).glob("*.txt"))
    assert len(lines(first)) == 10
    assert (cub_root / "CUB_200_2011" / "images" / classes[0] / f"{first.stem}.jpg").is_file()
    assert any((cap / "images").glob("*.t7"))  # Reed's CNN features, which readers must ignore
    fl = flowers_root / "cvpr2016_flowers"
    assert min(p.name for p in (fl / "text_c10").iterdir()) == "class_00001"
    stem = min((fl / "text_c10" / "class_00001").glob("*.txt")).stem
    assert stem.startswith("image_") and (flowers_root / "jpg" / f"{stem}.jpg").is_file()
    again = generate_cub_tree(tmp_path / "CUB", num_classes=12, images_per_class=3, num_test_classes=3,
                              image_size=32, seed=1)
    assert (again / first.relative_to(cub_root)).read_text() == first.read_text()
    assert (cap / "testclasses.txt").read_text() == (again / "cvpr2016_cub" / "testclasses.txt").read_text()


# ------------------------------------------------------------------ reading


@pytest.mark.parametrize("fmt", ["cub", "flowers102"])
def test_splits_follow_the_class_lists(fmt, cub_root, flowers_root):
    root = cub_root if fmt == "cub" else flowers_root
    captions = root / ("cvpr2016_cub" if fmt == "cub" else "cvpr2016_flowers")
    assert detect_format(root) == fmt
    splits = load_dataset(fmt, root, val_fraction=0.25, seed=3)
    test_classes, trainval = lines(captions / "testclasses.txt"), lines(captions / "trainvalclasses.txt")
    number = (lambda c: int(c.split(".")[0]) - 1) if fmt == "cub" else (lambda c: int(c.split("_")[1]) - 1)
    assert set(splits.test.image_pids) == {number(c) for c in test_classes}
    val_ids = set(splits.val.image_pids)
    assert val_ids and val_ids <= {number(c) for c in trainval} and not val_ids & set(splits.test.image_pids)
    n_val = round(0.25 * len(trainval))
    assert len(val_ids) == n_val and splits.num_train_ids == len(trainval) - n_val
    assert sorted({r.pid for r in splits.train}) == list(range(splits.num_train_ids))  # relabelled 0..m-1
    per_image = len(trainval) - n_val  # classes; 3 images each, 10 captions each
    assert len(splits.train) == per_image * 3 * 10
    assert len(splits.test.captions) == len(test_classes) * 3 * 10 and len(splits.test.image_paths) == len(
        test_classes) * 3
    assert splits.task == "person" and splits.task_options == {"class_level_at": 50}
    # the val classes are a seeded draw: the same seed, the same classes; no test class is ever drawn
    assert set(load_dataset(fmt, root, val_fraction=0.25, seed=3).val.image_pids) == val_ids
    assert not set(load_dataset(fmt, root, val_fraction=0.5, seed=9).val.image_pids) & set(splits.test.image_pids)
    whole = load_dataset(fmt, root, val_fraction=0.0)
    assert whole.val is None and whole.num_train_ids == len(trainval)


def test_separate_trees_and_the_parent_folder(cub_root, tmp_path):
    pictures = copy_tree(cub_root / "CUB_200_2011", tmp_path / "pics" / "CUB_200_2011")
    captions = copy_tree(cub_root / "cvpr2016_cub", tmp_path / "text" / "cvpr2016_cub")
    apart = load_dataset("cub", None, images_root=pictures, captions_root=captions, val_fraction=0.0)
    together = load_dataset("cub", cub_root, val_fraction=0.0)
    assert len(apart.train) == len(together.train) and apart.num_train_ids == together.num_train_ids
    assert load_dataset("cub", cub_root.parent, val_fraction=0.0).num_train_ids == together.num_train_ids
    with pytest.raises(DataError, match="images_root.*only to formats with separate trees"):
        load_dataset("cuhk_pedes", cub_root, images_root=pictures)


# ------------------------------------------------------------------ bad input


def test_missing_trees_name_the_archive_they_come_from(cub_root, flowers_root, tmp_path):
    bad = copy_tree(cub_root, tmp_path / "a")
    shutil.rmtree(bad / "cvpr2016_cub" / "text_c10")
    with pytest.raises(DataError, match=r"text_c10.*cvpr2016_cub\.tar\.gz"):
        load_dataset("cub", bad)
    bad = copy_tree(cub_root, tmp_path / "b")
    shutil.rmtree(bad / "cvpr2016_cub")
    with pytest.raises(DataError, match=r"cvpr2016_cub/ not found.*separate download.*holds the pictures"):
        load_dataset("cub", bad)
    bad = copy_tree(flowers_root, tmp_path / "c")
    shutil.rmtree(bad / "jpg")
    with pytest.raises(DataError, match=r"pictures come from 102flowers\.tgz"):
        load_dataset("flowers102", bad)
    bad = copy_tree(cub_root, tmp_path / "d")
    (bad / "cvpr2016_cub" / "testclasses.txt").unlink()
    with pytest.raises(DataError, match=r"class list .*testclasses\.txt not found"):
        load_dataset("cub", bad)


def test_a_short_caption_file_is_kept_and_reported_once(cub_root, tmp_path):
    root = copy_tree(cub_root, tmp_path / "short")
    files = sorted((root / "cvpr2016_cub" / "text_c10").rglob("*.txt"))
    for f in files[:2]:
        f.write_text("\n".join(lines(f)[:9]) + "\n")
    splits = load_dataset("cub", root, val_fraction=0.0)
    notes = [n for n in splits.notes if "exactly 10" in n]
    assert len(notes) == 1 and notes[0].startswith("2 caption files") and "(9 lines)" in notes[0]
    total = len(splits.train) + len(splits.test.captions)
    assert total == len(files) * 10 - 2


def test_unknown_class_folder_and_overlapping_lists_are_errors(cub_root, tmp_path):
    root = copy_tree(cub_root, tmp_path / "unknown")
    (root / "cvpr2016_cub" / "text_c10" / "999.Unlisted_Bird").mkdir()
    with pytest.raises(DataError, match=r"1 class folders .* neither trainvalclasses\.txt nor testclasses\.txt"
                                        r".*999\.Unlisted_Bird"):
        load_dataset("cub", root)
    root = copy_tree(cub_root, tmp_path / "both")
    test_classes = lines(root / "cvpr2016_cub" / "testclasses.txt")
    with open(root / "cvpr2016_cub" / "trainvalclasses.txt", "a") as f:
        f.write(test_classes[0] + "\n")
    with pytest.raises(DataError, match=r"listed in both .*unseen in training"):
        load_dataset("cub", root)
    root = copy_tree(cub_root, tmp_path / "malformed")
    (root / "cvpr2016_cub" / "testclasses.txt").write_text("Black_footed_Albatross\n")
    with pytest.raises(DataError, match=r"testclasses\.txt line 1: 'Black_footed_Albatross' is not a class folder"):
        load_dataset("cub", root)


def test_missing_pictures_raise_or_are_skipped_with_a_count(cub_root, tmp_path):
    root = copy_tree(cub_root, tmp_path / "nopics")
    gone = sorted((root / "CUB_200_2011" / "images").rglob("*.jpg"))[:3]
    for p in gone:
        p.unlink()
    with pytest.raises(DataError, match=r"3 caption files have no picture.*CUB_200_2011\.tgz"):
        load_dataset("cub", root)
    splits = load_dataset("cub", root, on_error="skip", val_fraction=0.0)
    assert splits.skipped == 3
    assert len(splits.train) + len(splits.test.captions) == (12 * 3 - 3) * 10


# ------------------------------------------------------------------ Reed's metrics


def test_reed_metrics_by_hand():
    # class 0: captions (1, 0) and (0.8, 0.6) -> mean (0.9, 0.3) -> t0 = (0.9, 0.3) / 0.948683
    # class 1: caption (0, 1) -> t1 = (0, 1)
    caps = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    cap_labels = torch.tensor([0, 0, 1])
    imgs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.28, 0.96]])
    img_labels = torch.tensor([0, 0, 1, 1])
    classes, text = class_text_embeddings(caps, cap_labels)
    assert classes.tolist() == [0, 1]
    assert text[0].tolist() == pytest.approx([0.9 / 0.9486833, 0.3 / 0.9486833], abs=1e-6)
    # scores t0: v0 .9487, v1 .3162, v2 .8222, v3 .5692; t1: 0, 1, .8, .96
    # i2t: v0 -> 0 (right), v1 -> 1 (wrong), v2 -> 0 (wrong: .8222 > .8), v3 -> 1 (right): 50 %
    # t2i@1: class 0's top is v0 (right), class 1's is v1 (wrong): 50 %; @3: class 0 {v0, v2, v3} 1/3,
    # class 1 {v1, v3, v2} 2/3: 50 %
    out = reed_metrics(caps, cap_labels, imgs, img_labels, ap_at=1)
    assert out["i2t_top1"] == pytest.approx(50.0) and out["t2i_ap1"] == pytest.approx(50.0)
    assert reed_metrics(caps, cap_labels, imgs, img_labels, ap_at=3)["t2i_ap3"] == pytest.approx(50.0)
    # the denominator is always the cut-off: 2 images per class at @4 -> at most 50 %
    assert reed_metrics(caps, cap_labels, imgs, img_labels, ap_at=4)["t2i_ap4"] == pytest.approx(50.0)
    # ties: the lower class wins i2t, the lower image index wins t2i
    tie = reed_metrics(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([3, 7]),
                       torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([7, 3]), ap_at=1)
    assert tie["i2t_top1"] == 50.0 and tie["t2i_ap1"] == 50.0
    with pytest.raises(ValueError, match="labels without captions"):
        reed_metrics(caps, cap_labels, imgs, torch.tensor([0, 0, 1, 5]))


def test_reed_metrics_equal_a_plain_loop_with_ties():
    g = torch.Generator().manual_seed(0)
    caps = torch.randint(-2, 3, (60, 4), generator=g).float() + 0.01
    cap_labels = torch.randint(0, 6, (60,), generator=g)
    imgs = torch.randint(-2, 3, (40, 4), generator=g).float()
    imgs[imgs.norm(dim=1) == 0] = 1.0
    imgs[5] = imgs[6]  # duplicated images: tied scores
    img_labels = torch.tensor([int(cap_labels[i % 60]) for i in range(40)])
    out = reed_metrics(caps, cap_labels, imgs, img_labels, ap_at=7)
    classes = sorted(set(cap_labels.tolist()))
    emb = {}
    for c in classes:
        rows = [caps[i].double() / caps[i].double().norm() for i in range(60) if cap_labels[i] == c]
        mean = sum(rows) / len(rows)
        emb[c] = mean / mean.norm()
    unit = [v.double() / v.double().norm() for v in imgs]
    correct = 0
    for j, v in enumerate(unit):
        scores = [float(emb[c] @ v) for c in classes]
        best = max(range(len(classes)), key=lambda i: (scores[i], -i))
        correct += classes[best] == int(img_labels[j])
    precisions = []
    for c in classes:
        order = sorted(range(40), key=lambda j: (-float(emb[c] @ unit[j]), j))[:7]
        precisions.append(sum(int(img_labels[j]) == c for j in order) / 7)
    assert out["i2t_top1"] == pytest.approx(100 * correct / 40)
    assert out["t2i_ap7"] == pytest.approx(100 * sum(precisions) / len(precisions))


def test_person_task_adds_the_class_level_direction():
    from xmr.data.records import EvalSplit

    task = build_task("person", class_level_at=2)
    assert task.directions == ("t2i", "class") and task.columns_of("class") == ("i2t_top1", "t2i_ap2")
    caps = torch.eye(3)[[0, 0, 1, 2]]
    imgs = torch.eye(3)[[0, 1, 2, 2]]
    split = EvalSplit(gallery_paths=["a", "b", "c", "d"], positives=[[0], [0], [1], [2, 3]],
                      query_texts=["w", "x", "y", "z"], query_labels=[0, 0, 1, 2], gallery_labels=[0, 1, 2, 2])
    results = task.evaluate(split, caps, imgs)
    assert results["t2i"]["R1"] == 100.0 and results["class"]["i2t_top1"] == 100.0
    assert results["class"]["t2i_ap2"] == pytest.approx(100 * (0.5 + 0.5 + 1.0) / 3)
    assert "class/i2t_top1" in task.describe()["metrics"]
    assert build_task("person").directions == ("t2i",)


# ------------------------------------------------------------------ end to end


def test_mmref_on_cub_trains_and_evaluates_both_protocols(cub_root, tmp_path):
    from conftest import tiny_overrides
    from test_cli import xmr

    run = tmp_path / "run"
    overrides = [o for o in tiny_overrides(cub_root, run, **{"data.format": "cub", "optim.epochs": 1,
                                                             "model.image_size": [32, 32], "data.batch_size": 8,
                                                             "data.val_fraction": 0.25})
                 if not o.startswith("method.cmt_depth")]
    args = ["train", "--config", "configs/mmref/cub.yaml"]
    for item in overrides + ["method.refine.k=5"]:
        args += ["--set", item]
    proc = xmr(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = yaml.safe_load((run / "last" / "config.yaml").read_text())
    assert config["train_data"]["num_train_ids"] == 7 and config["model"]["num_classes"] == 7  # m references
    out = tmp_path / "report.json"
    proc = xmr("evaluate", "--checkpoint", str(run / "last"), "--data", str(cub_root), "--out", str(out),
               "--workers", "0", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class-level (Reed) (test)" in proc.stdout and "i2t_top1" in proc.stdout and "t2i_ap50" in proc.stdout
    assert "t2i refined (test)" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"t2i", "t2i_initial", "class"}
    cls = report["results"]["class"]
    assert cls["num_classes"] == 3 and cls["num_images"] == 9 and 0 <= cls["i2t_top1"] <= 100
    assert report["protocol"]["task"]["class_level_at"] == 50
    assert report["protocol"]["single_stage_directions"] == ["class"]
