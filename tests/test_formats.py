"""Format readers on tiny datasets written in the real on-disk layouts."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from PIL import Image

from xmr import registry
from xmr.data import formats
from xmr.data.formats import FORMATS, detect_format, get_reader, known_formats, load_dataset
from xmr.data.formats.common import Fields, JsonRecordsFormat, Layout, RawRecord, ReadContext, get_str
from xmr.data.formats.cuhk_pedes import standard_split
from xmr.data.images import load_image
from xmr.data.records import DatasetSplits
from xmr.errors import ConfigError, DataError
from xmr.registry import Registry


def write_image(
    path: Path, color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (8, 16)
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def make_pedes(root: Path, ann: str, records: list[dict], path_key: str = "file_path") -> Path:
    """Write `records` to root/ann and a small image for each one under root/imgs."""
    root.mkdir(parents=True, exist_ok=True)
    for r in records:
        write_image(root / "imgs" / r[path_key])
    (root / ann).write_text(json.dumps(records))
    return root


def cuhk_records() -> list[dict]:
    # ids 1..6: 1-3 train (2 images each), 4 val, 5-6 test; 2 captions per image.
    recs = []
    for pid, split, n in [
        (3, "train", 2),
        (1, "train", 2),
        (2, "train", 2),
        (4, "val", 1),
        (5, "test", 2),
        (6, "test", 1),
    ]:
        for k in range(n):
            recs.append(
                {
                    "split": split,
                    "id": pid,
                    "file_path": f"cam/{pid:04d}_{k}.jpg",
                    "captions": [f"person {pid} image {k} a", f"person {pid} image {k} b"],
                    "processed_tokens": [["person"], ["person"]],
                }
            )
    return recs


def check_consistent(s: DatasetSplits) -> None:
    assert sorted({p.pid for p in s.train}) == list(range(s.num_train_ids))
    for split in (s.val, s.test):
        if split is None:
            continue
        assert len(set(split.image_paths)) == len(split.image_paths)
        assert len(split.captions) == len(split.caption_image_ids)
        for pid, img in zip(split.caption_pids, split.caption_image_ids, strict=True):
            assert split.image_pids[img] == pid


# ------------------------------------------------------------------ CUHK-PEDES


def test_cuhk_reid_raw(tmp_path: Path) -> None:
    make_pedes(tmp_path / "CUHK-PEDES", "reid_raw.json", cuhk_records())
    s = load_dataset("CUHK-PEDES", tmp_path / "CUHK-PEDES")
    check_consistent(s)
    assert s.name == "cuhk_pedes" and s.num_train_ids == 3 and s.skipped == 0
    assert len(s.train) == 12  # 6 images x 2 captions
    # relabelled in ascending order of original ids: 1->0, 2->1, 3->2; first record is id 3
    assert s.train[0].pid == 2 and s.train[0].caption == "person 3 image 0 a"
    assert [p.image_id for p in s.train] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert s.train[0].image_path == str(tmp_path.resolve() / "CUHK-PEDES/imgs/cam/0003_0.jpg")
    assert s.val is not None and s.val.image_pids == [4] and len(s.val.captions) == 2
    assert s.test.image_pids == [5, 5, 6]  # original ids kept in eval splits
    assert s.test.caption_pids == [5, 5, 5, 5, 6, 6]
    assert s.test.caption_image_ids == [0, 0, 1, 1, 2, 2]
    assert s.test.captions[2] == "person 5 image 1 a"


def test_root_or_parent(tmp_path: Path) -> None:
    make_pedes(tmp_path / "CUHK-PEDES", "reid_raw.json", cuhk_records())
    a = load_dataset("cuhk_pedes", tmp_path)
    b = load_dataset("cuhk_pedes", tmp_path / "CUHK-PEDES")
    assert a.train == b.train and a.root == b.root
    assert detect_format(tmp_path) == "cuhk_pedes"
    assert load_dataset("auto", tmp_path).num_train_ids == 3


def test_cuhk_caption_all_standard_split_scaled(tmp_path: Path) -> None:
    recs = [{"id": pid, "file_path": f"{pid}.jpg", "captions": [f"c{pid}"]} for pid in range(26, 0, -1)]
    make_pedes(tmp_path, "caption_all.json", recs)
    s = load_dataset("cuhk_pedes", tmp_path)
    check_consistent(s)
    # 26 ids scaled from 11003:1000:1000 -> 2 val, 2 test (round(26 * 1000 / 13003) = 2), 22 train
    assert s.num_train_ids == 22
    assert s.val is not None and sorted(s.val.image_pids) == [23, 24]
    assert sorted(s.test.image_pids) == [25, 26]
    assert any("scaled" in n for n in s.notes) and any("standard split" in n for n in s.notes)


def test_standard_split_full_size() -> None:
    ids = list(range(1, 13004))
    split, notes = standard_split(ids[::-1])
    assert notes == []
    assert [sum(v == s for v in split.values()) for s in ("train", "val", "test")] == [11003, 1000, 1000]
    assert split[11003] == "train" and split[11004] == "val" and split[12004] == "test"


def test_reid_raw_preferred_over_caption_all(tmp_path: Path) -> None:
    make_pedes(tmp_path, "reid_raw.json", cuhk_records())
    (tmp_path / "caption_all.json").write_text("[]")
    assert load_dataset("cuhk_pedes", tmp_path).num_train_ids == 3


# ------------------------------------------------------------------ ICFG-PEDES


def icfg_records(n_train_ids: int = 10) -> list[dict]:
    recs = []
    for pid in range(1, n_train_ids + 1):
        for k in range(2):
            recs.append(
                {
                    "split": "train",
                    "id": pid,
                    "file_path": f"train/{pid}/{k}.jpg",
                    "captions": [f"t{pid}-{k}"],
                }
            )
    for pid in (101, 102):
        recs.append({"split": "test", "id": pid, "file_path": f"test/{pid}.jpg", "captions": [f"q{pid}"]})
    return recs


@pytest.mark.parametrize("ann", ["ICFG-PEDES.json", "ICFG_PEDES.json"])
def test_icfg_val_holdout(tmp_path: Path, ann: str) -> None:
    make_pedes(tmp_path / "ICFG-PEDES", ann, icfg_records())
    s = load_dataset("icfg_pedes", tmp_path, val_fraction=0.2, seed=3)
    check_consistent(s)
    assert s.val is not None
    val_ids = set(s.val.image_pids)
    assert len(val_ids) == 2 and s.num_train_ids == 8  # whole identities held out
    assert len(s.val.image_paths) == 4 and len(s.train) == 16
    train_ids = {int(Path(p.image_path).parent.name) for p in s.train}
    assert not val_ids & train_ids and len(train_ids) == 8
    assert s.test.image_pids == [101, 102] and s.test.captions == ["q101", "q102"]
    assert any("held out 2 of 10" in n and "seed=3" in n for n in s.notes)
    # deterministic given the seed; another seed gives another choice (for this fixture)
    again = load_dataset("icfg_pedes", tmp_path, val_fraction=0.2, seed=3)
    assert again.val is not None and set(again.val.image_pids) == val_ids
    other = {
        tuple(sorted(set(load_dataset("icfg_pedes", tmp_path, val_fraction=0.2, seed=k).val.image_pids)))
        for k in range(6)
    }
    assert len(other) > 1


def test_icfg_no_val(tmp_path: Path) -> None:
    make_pedes(tmp_path, "ICFG-PEDES.json", icfg_records(3))
    s = load_dataset("icfg_pedes", tmp_path, val_fraction=0.0)
    assert s.val is None and s.num_train_ids == 3


# ------------------------------------------------------------------ RSTPReid


def test_rstpreid(tmp_path: Path) -> None:
    recs = [
        {"id": pid, "img_path": f"{pid}_{k}.jpg", "captions": [f"a{pid}{k}", f"b{pid}{k}"], "split": split}
        for pid, split in [(10, "train"), (20, "train"), (30, "val"), (40, "test")]
        for k in range(2)
    ]
    make_pedes(tmp_path / "RSTPReid", "data_captions.json", recs, path_key="img_path")
    assert detect_format(tmp_path) == "rstpreid"
    s = load_dataset("rstpreid", tmp_path)
    check_consistent(s)
    assert s.num_train_ids == 2 and len(s.train) == 8
    assert {p.pid for p in s.train} == {0, 1}
    assert s.val is not None and s.val.image_pids == [30, 30] and len(s.val.captions) == 4
    assert s.test.caption_image_ids == [0, 0, 1, 1]


# ------------------------------------------------------------------ folder (custom data)


def write_jsonl(root: Path, rows: list[dict | str], images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in rows:
        if isinstance(r, dict):
            if images:
                write_image(root / r["image"])
            lines.append(json.dumps(r))
        else:
            lines.append(r)
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_folder_with_splits_and_string_ids(tmp_path: Path) -> None:
    rows = [
        {"image": "a/1.png", "caption": "alice one", "id": "alice", "split": "train"},
        {"image": "a/1.png", "caption": ["alice one again"], "id": "alice", "split": "train"},
        {"image": "b/1.png", "caption": ["bob", "bob 2"], "id": "bob", "split": "train"},
        {"image": "c/1.png", "caption": "carol", "id": "carol", "split": "test"},
    ]
    write_jsonl(tmp_path, rows)
    s = load_dataset("folder", tmp_path)
    check_consistent(s)
    assert s.num_train_ids == 2 and [p.caption for p in s.train] == [
        "alice one",
        "alice one again",
        "bob",
        "bob 2",
    ]
    assert [p.image_id for p in s.train] == [0, 0, 1, 1] and [p.pid for p in s.train] == [0, 0, 1, 1]
    assert s.val is None and s.test.image_pids == [2] and any("mapped" in n for n in s.notes)


def test_folder_random_split_by_identity(tmp_path: Path) -> None:
    rows = [{"image": f"{i}.png", "caption": f"cap {i}", "id": i // 2} for i in range(40)]  # 20 ids
    write_jsonl(tmp_path, rows)
    assert detect_format(tmp_path) == "folder"
    s = load_dataset("folder", tmp_path, seed=1)
    check_consistent(s)
    assert s.val is not None
    test_ids, val_ids = set(s.test.image_pids), set(s.val.image_pids)
    assert len(test_ids) == 2 and len(val_ids) == 2 and s.num_train_ids == 16 and not test_ids & val_ids
    assert len(s.train) == 32 and any("16 train / 2 val / 2 test" in n for n in s.notes)
    again = load_dataset("folder", tmp_path, seed=1)
    assert set(again.test.image_pids) == test_ids


def test_folder_default_one_id_per_image(tmp_path: Path) -> None:
    rows = [
        {"image": f"{i}.png", "caption": f"cap {i}", "split": "train" if i < 3 else "test"} for i in range(5)
    ]
    write_jsonl(tmp_path, rows)
    s = load_dataset("folder", tmp_path)
    assert s.num_train_ids == 3 and len(set(s.test.image_pids)) == 2


# ------------------------------------------------------------------ bad input


def test_unknown_format_lists_known(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="known formats: cub, cuhk_pedes, flowers102, icfg_pedes, rstpreid, folder"):
        load_dataset("flickr", tmp_path)
    assert set(FORMATS) == {"cub", "cuhk_pedes", "flowers102", "icfg_pedes", "rstpreid", "folder"}


def test_missing_annotation_lists_root(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(
        DataError, match=r"reid_raw\.json or caption_all\.json not found.*contains: imgs/, readme\.txt"
    ):
        load_dataset("cuhk_pedes", tmp_path)
    with pytest.raises(DataError, match="cannot detect"):
        detect_format(tmp_path)


def test_malformed_json_names_file(tmp_path: Path) -> None:
    (tmp_path / "data_captions.json").write_text('[{"id": 1,')
    with pytest.raises(DataError, match=r"data_captions\.json: malformed JSON at line 1"):
        load_dataset("rstpreid", tmp_path)
    write_jsonl(tmp_path / "f", [{"image": "x.png", "caption": "c", "split": "train"}, "{not json"])
    with pytest.raises(DataError, match=r"captions\.jsonl: line 2 is not valid JSON"):
        load_dataset("folder", tmp_path / "f")


def test_missing_key_and_wrong_type(tmp_path: Path) -> None:
    recs = cuhk_records()
    del recs[3]["file_path"]
    (tmp_path / "reid_raw.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"reid_raw\.json record 3: missing key 'file_path'"):
        load_dataset("cuhk_pedes", tmp_path, check_images="none")
    recs = cuhk_records()
    recs[4]["captions"] = 7
    (tmp_path / "reid_raw.json").write_text(json.dumps(recs))
    with pytest.raises(
        DataError, match=r"reid_raw\.json record 4: key 'captions' must be a list of strings, got int"
    ):
        load_dataset("cuhk_pedes", tmp_path, check_images="none")
    recs[4]["captions"] = ["ok", 3]
    recs[2]["split"] = "dev"
    (tmp_path / "reid_raw.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"record 2: key 'split' must be one of train, val, test, got 'dev'"):
        load_dataset("cuhk_pedes", tmp_path, check_images="none")


def test_skip_bad_records_counts(tmp_path: Path) -> None:
    recs = cuhk_records()
    recs[0]["captions"] = "not a list"
    recs[1]["id"] = "3"
    recs.append(["not", "an", "object"])
    make_pedes(tmp_path, "reid_raw.json", recs[:-1])
    (tmp_path / "reid_raw.json").write_text(json.dumps(recs))
    s = load_dataset("cuhk_pedes", tmp_path, on_error="skip")
    assert s.skipped == 3 and len(s.train) == 8 and s.num_train_ids == 2
    assert any("skipped 3 malformed records" in n for n in s.notes)


def test_missing_images_one_report(tmp_path: Path) -> None:
    make_pedes(tmp_path, "reid_raw.json", cuhk_records())
    gone = sorted((tmp_path / "imgs/cam").glob("*.jpg"))[:7]
    for p in gone:
        p.unlink()
    with pytest.raises(DataError) as info:
        load_dataset("cuhk_pedes", tmp_path)
    msg = str(info.value)
    assert "7 of 10 images listed in reid_raw.json are missing, first 5" in msg
    assert msg.count(".jpg") == 5 and "on_error='skip'" in msg
    s = load_dataset("cuhk_pedes", tmp_path, check_images="none")  # not checked up front
    assert len(s.train) == 12
    with pytest.raises(DataError, match=r"no usable 'train' records \(7 records were skipped\)"):
        load_dataset("cuhk_pedes", tmp_path, on_error="skip")  # the 7 are all training images


def test_missing_images_skip(tmp_path: Path) -> None:
    make_pedes(tmp_path, "reid_raw.json", cuhk_records())
    (tmp_path / "imgs/cam/0001_0.jpg").unlink()
    (tmp_path / "imgs/cam/0006_0.jpg").unlink()  # the only image of test id 6
    s = load_dataset("cuhk_pedes", tmp_path, on_error="skip")
    assert s.skipped == 2 and len(s.train) == 10 and s.num_train_ids == 3
    assert s.test.image_pids == [5, 5]
    assert any("dropped 2 records" in n for n in s.notes)


def test_corrupt_image_decode_check(tmp_path: Path) -> None:
    make_pedes(tmp_path, "reid_raw.json", cuhk_records())
    bad = tmp_path / "imgs/cam/0002_1.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(bad, quality=95)
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG
    assert load_dataset("cuhk_pedes", tmp_path).num_train_ids == 3  # "exists" does not decode
    with pytest.raises(DataError, match=r"1 of 10 images cannot be decoded.*0002_1\.jpg"):
        load_dataset("cuhk_pedes", tmp_path, check_images="decode")
    s = load_dataset("cuhk_pedes", tmp_path, check_images="decode", on_error="skip")
    assert s.skipped == 1 and len(s.train) == 10
    with pytest.raises(DataError, match="0002_1.jpg"):
        load_image(bad)


def test_conflicting_image_ids(tmp_path: Path) -> None:
    recs = cuhk_records()
    recs.append(dict(recs[0], id=2))
    make_pedes(tmp_path, "reid_raw.json", recs)
    with pytest.raises(
        DataError, match=r"record 10: image .*0003_0\.jpg was already listed by reid_raw\.json record 0"
    ):
        load_dataset("cuhk_pedes", tmp_path)
    assert load_dataset("cuhk_pedes", tmp_path, on_error="skip").skipped == 1


def test_bad_options(tmp_path: Path) -> None:
    make_pedes(tmp_path, "reid_raw.json", cuhk_records())
    with pytest.raises(ConfigError, match="on_error"):
        load_dataset("cuhk_pedes", tmp_path, on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="check_images"):
        load_dataset("cuhk_pedes", tmp_path, check_images="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="val_fraction"):
        load_dataset("cuhk_pedes", tmp_path, val_fraction=1.5)


def test_load_image_limits(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", size=(20, 10))
    assert load_image(tmp_path / "a.png").size == (20, 10)
    with pytest.raises(DataError, match="200 pixels, more than the limit of 100"):
        load_image(tmp_path / "a.png", max_pixels=100)
    with pytest.raises(DataError, match="image not found: .*nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(DataError, match="cannot decode image .*text.png"):
        load_image(tmp_path / "text.png")


# ------------------------------------------------------------------ the shared JSON-records reader

# A new JSON format in a few lines: its layout, its keys, its image folder.
TOY = JsonRecordsFormat(
    Layout("toy", files=("toy.json",), subdirs=("Toy",)),
    Fields(pid="person", image="img", captions="text", split="part", captions_may_be_str=True),
    images="pictures",
)


def toy_records() -> list[dict]:
    return [
        {
            "person": pid,
            "img": f"{pid}_{k}.png",
            "text": f"toy {pid} {k}" if k else [f"t{pid}", f"u{pid}"],
            "part": split,
        }
        for pid, split in [(7, "train"), (8, "train"), (9, "val"), (10, "test")]
        for k in range(2)
    ]


def make_toy(root: Path, records: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for r in records:
        if isinstance(r, dict) and "img" in r:
            write_image(root / "pictures" / r["img"])
    (root / "toy.json").write_text(json.dumps(records))
    return root


def test_json_records_format_declared_in_a_few_lines(tmp_path: Path) -> None:
    make_toy(tmp_path / "Toy", toy_records())
    s = TOY(tmp_path)  # the parent folder: found through the layout's sub-folders
    check_consistent(s)
    assert s.name == "toy" and s.num_train_ids == 2 and s.root == str((tmp_path / "Toy").resolve())
    assert [p.caption for p in s.train] == ["t7", "u7", "toy 7 1", "t8", "u8", "toy 8 1"]
    assert s.train[0].image_path == str((tmp_path / "Toy/pictures/7_0.png").resolve())
    assert s.val is not None and s.val.image_pids == [9, 9] and s.test.image_pids == [10, 10]
    # messages name file, record and key; skipping counts
    recs = toy_records()
    del recs[1]["text"]
    recs[2]["person"] = "8"
    (tmp_path / "Toy/toy.json").write_text(json.dumps(recs))
    with pytest.raises(DataError, match=r"toy\.json record 1: missing key 'text'"):
        TOY(tmp_path)
    s = TOY(tmp_path, on_error="skip")
    assert s.skipped == 2 and any("skipped 2 malformed records" in n for n in s.notes)
    with pytest.raises(DataError, match=r"toy: annotation file toy\.json not found"):
        TOY(tmp_path / "Toy/pictures")


def test_json_records_format_parse_and_finalize_hooks(tmp_path: Path) -> None:
    def parse(rec: dict, where: str, ctx: ReadContext) -> RawRecord:  # pid from the file name
        image = get_str(rec, "img", where)
        return RawRecord(where, int(image.split("_")[0]), str(ctx.images / image), [get_str(rec, "c", where)])

    def every_third_id_tests(records: list[RawRecord], ctx: ReadContext) -> list[str]:
        for r in records:
            r.split = "test" if r.pid % 3 == 0 else "train"
        return [f"split by id (seed {ctx.seed} unused)"]

    fmt = JsonRecordsFormat(
        Layout("ids_in_names", ("a.json",)), images=".", parse=parse, finalize=every_third_id_tests
    )
    rows = [{"img": f"{pid}_{k}.png", "c": f"c{pid}{k}"} for pid in range(1, 7) for k in range(2)]
    for r in rows:
        write_image(tmp_path / r["img"])
    (tmp_path / "a.json").write_text(json.dumps(rows))
    s = fmt(tmp_path, seed=4)
    assert s.num_train_ids == 4 and sorted(set(s.test.image_pids)) == [3, 6]
    assert s.notes[0] == "split by id (seed 4 unused)"
    with pytest.raises(ValueError, match="no Fields for annotation file"):
        JsonRecordsFormat(Layout("x", ("a.json", "b.json")), fields={"a.json": Fields()})


@pytest.fixture
def formats_registry(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A copy of the format registry for one test (registrations do not leak into other tests)."""
    fresh = copy.deepcopy(registry.FORMATS)
    monkeypatch.setattr(registry, "FORMATS", fresh)
    return fresh


def test_registered_format_is_detected_and_loaded(tmp_path: Path, formats_registry: Registry) -> None:
    formats_registry.register("toy", f"{__name__}:TOY")  # the one place a format is registered
    make_toy(tmp_path / "Toy", toy_records())
    assert detect_format(tmp_path) == "toy"
    assert load_dataset("auto", tmp_path).name == "toy" and load_dataset("TOY", tmp_path).num_train_ids == 2
    # FORMATS is computed on access, so it lists a format registered after import
    assert formats.FORMATS == known_formats() == ["cub", "cuhk_pedes", "flowers102", "icfg_pedes", "rstpreid", "toy",
                                                         "folder"]
    with pytest.raises(DataError, match=r"did you mean 'toy'\?.*known formats: .*, toy, folder"):
        load_dataset("tyo", tmp_path)


def test_detection_reads_registered_layouts(tmp_path: Path, formats_registry: Registry) -> None:
    for name in formats_registry.names():
        layout = get_reader(name).layout
        assert layout.name == name and layout.files
    # the generic folder format is tried last: a dataset folder may carry a captions.jsonl too
    write_jsonl(tmp_path, [{"image": "x.png", "caption": "c"}])
    (tmp_path / "data_captions.json").write_text("[]")
    assert detect_format(tmp_path) == "rstpreid"
    (tmp_path / "data_captions.json").unlink()
    assert detect_format(tmp_path) == "folder"
    # a registered reader without a layout is refused with a readable message
    formats_registry.register("bare", f"{__name__}:check_consistent")
    with pytest.raises(ConfigError, match="'bare'.*carry a `layout`"):
        detect_format(tmp_path / "nowhere")


def test_person_formats_never_give_pid_none(tmp_path: Path) -> None:
    make_pedes(tmp_path / "cuhk", "reid_raw.json", cuhk_records())
    make_pedes(tmp_path / "icfg", "ICFG-PEDES.json", icfg_records())
    make_pedes(
        tmp_path / "rstp",
        "data_captions.json",
        [dict(r, img_path=r["file_path"]) for r in cuhk_records()],
        path_key="img_path",
    )
    write_jsonl(tmp_path / "folder", [{"image": f"{i}.png", "caption": f"c{i}"} for i in range(10)])
    for name, sub in [
        ("cuhk_pedes", "cuhk"),
        ("icfg_pedes", "icfg"),
        ("rstpreid", "rstp"),
        ("folder", "folder"),
    ]:
        s = load_dataset(name, tmp_path / sub)
        pids = [p.pid for p in s.train] + [
            pid for split in (s.val, s.test) if split for pid in split.image_pids + split.caption_pids
        ]
        assert pids and all(type(pid) is int for pid in pids), name


def test_custom_parse_without_identity_is_refused(tmp_path: Path) -> None:
    def parse(rec: dict, where: str, ctx: ReadContext) -> RawRecord:
        return RawRecord(where, None, str(ctx.images / rec["img"]), ["c"], rec["part"])  # type: ignore[arg-type]

    make_toy(tmp_path, toy_records())
    fmt = JsonRecordsFormat(Layout("toy", ("toy.json",)), images="pictures", parse=parse)
    with pytest.raises(DataError, match=r"toy\.json record 0: identity must be an integer, got null"):
        fmt(tmp_path)
