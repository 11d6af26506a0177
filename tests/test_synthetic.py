"""The synthetic CUHK-PEDES generator: layout, determinism, idempotence, hard identities, faithful captions."""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xmr.data import synthetic as syn

SMALL = {"num_ids": 40, "images_per_id": 3, "captions_per_image": 2, "image_size": (96, 32), "seed": 0}
TINY = {"num_ids": 8, "images_per_id": 2, "image_size": (64, 32), "split_ids": (4, 2, 2)}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return syn.generate_pedes_demo(tmp_path_factory.mktemp("synth_a"), **SMALL)


def _records(folder: Path) -> list[dict]:
    return json.loads((folder / "reid_raw.json").read_text())


def _distance(a: syn.Identity, b: syn.Identity) -> int:
    return sum(x != y for x, y in zip(syn.attributes(a), syn.attributes(b)))


def test_layout_matches_cuhk_pedes(small: Path) -> None:
    assert small.name == "CUHK-PEDES" and (small / "demo_manifest.json").is_file()
    records = _records(small)
    assert len(records) == 40 * 3
    split_ids: dict[str, set[int]] = {"train": set(), "val": set(), "test": set()}
    for r in records:
        assert set(r) == {"split", "captions", "file_path", "processed_tokens", "id"}
        assert isinstance(r["id"], int) and isinstance(r["file_path"], str)
        assert len(r["captions"]) == 2 and all(isinstance(c, str) and c.strip() for c in r["captions"])
        assert r["processed_tokens"] == [syn.tokenize(c) for c in r["captions"]]
        assert all(t == t.lower() and re.fullmatch(r"[a-z0-9'-]+", t) for ts in r["processed_tokens"] for t in ts)
        assert (small / "imgs" / r["file_path"]).is_file()
        split_ids[r["split"]].add(r["id"])
    assert set().union(*split_ids.values()) == set(range(1, 41))  # 1-based ids
    assert sum(len(v) for v in split_ids.values()) == 40  # splits disjoint by identity
    assert [len(split_ids[s]) for s in ("train", "val", "test")] == [28, 6, 6]  # default ~70/15/15
    with Image.open(small / "imgs" / records[0]["file_path"]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (32, 96))


def test_the_real_reader_loads_it(small: Path) -> None:
    from xmr.data.formats import load_dataset

    splits = load_dataset("cuhk_pedes", small.parent)
    assert splits.num_train_ids == 28 and len(splits.train) == 28 * 3 * 2
    assert len(splits.test.image_paths) == 6 * 3 and len(splits.test.captions) == 6 * 3 * 2
    assert splits.val is not None and len(splits.val.image_paths) == 6 * 3


def test_same_seed_same_bytes_other_seed_differs(small: Path, tmp_path: Path) -> None:
    again = syn.generate_pedes_demo(tmp_path / "b", **SMALL)
    assert (again / "reid_raw.json").read_bytes() == (small / "reid_raw.json").read_bytes()
    for r in _records(small):
        assert (again / "imgs" / r["file_path"]).read_bytes() == (small / "imgs" / r["file_path"]).read_bytes()
    other = syn.generate_pedes_demo(tmp_path / "c", **{**SMALL, "seed": 1})
    assert (other / "reid_raw.json").read_bytes() != (small / "reid_raw.json").read_bytes()
    path = _records(small)[0]["file_path"]
    assert (other / "imgs" / path).read_bytes() != (small / "imgs" / path).read_bytes()


def test_second_call_reuses_a_complete_data_set(tmp_path: Path) -> None:
    out = syn.generate_pedes_demo(tmp_path, **TINY)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    start = time.perf_counter()
    assert syn.generate_pedes_demo(tmp_path, **TINY) == out
    assert time.perf_counter() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    changed = syn.generate_pedes_demo(tmp_path, **{**TINY, "images_per_id": 1})  # other parameters
    assert len(_records(changed)) == 8 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_partial_generation_is_regenerated(tmp_path: Path) -> None:
    out = syn.generate_pedes_demo(tmp_path, **TINY)
    reference = (out / "reid_raw.json").read_bytes()
    stale = tmp_path / ".CUHK-PEDES.partial-4999999-deadbeef"  # left by a killed run (no such process)
    stale.mkdir()
    (stale / "reid_raw.json").write_text("[]")
    (out / "demo_manifest.json").unlink()  # as if the run died before the manifest
    (out / "reid_raw.json").write_text("[]")
    assert syn.generate_pedes_demo(tmp_path, **TINY) == out
    assert (out / "reid_raw.json").read_bytes() == reference and (out / "demo_manifest.json").is_file()
    assert not stale.exists()
    first = _records(out)[0]["file_path"]
    (out / "imgs" / first).unlink()  # a missing image also makes it incomplete
    syn.generate_pedes_demo(tmp_path, **TINY)
    assert (out / "imgs" / first).is_file()


def test_interrupted_generation_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    real, calls = syn.render_person, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(syn, "render_person", dying)
    with pytest.raises(KeyboardInterrupt):
        syn.generate_pedes_demo(tmp_path, **TINY)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert len(_records(syn.generate_pedes_demo(tmp_path, **TINY))) == 16


def test_a_foreign_folder_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "CUHK-PEDES").mkdir()
    (tmp_path / "CUHK-PEDES" / "reid_raw.json").write_text("[]")
    with pytest.raises(FileExistsError):
        syn.generate_pedes_demo(tmp_path, **TINY)
    assert (tmp_path / "CUHK-PEDES" / "reid_raw.json").read_text() == "[]"
    assert len(_records(syn.generate_pedes_demo(tmp_path, **TINY, overwrite=True))) == 16


def test_bad_parameters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        syn.generate_pedes_demo(tmp_path, num_ids=10, split_ids=(5, 2, 2))
    with pytest.raises(ValueError):
        syn.generate_pedes_demo(tmp_path, num_ids=10, image_size=(8, 4))


def test_identities_are_unique_and_often_one_attribute_apart() -> None:
    people = syn.sample_identities(400, random.Random(0))
    assert len({syn.attributes(p) for p in people}) == 400
    near = sum(any(_distance(a, b) == 1 for b in people if b is not a) for a in people)
    assert near / len(people) >= 0.4
    for p in people:  # consistent: no lower garment under a dress, colours only for present items
        assert (p.upper_type == "dress") == (p.lower_type is None) == (p.lower_color is None)
        assert (p.bag == "none") == (p.bag_color is None) and (p.hat == "none") == (p.hat_color is None)
    assert {p.upper_color for p in people} == set(syn.COLORS) and {p.bag for p in people} == set(syn.BAGS)


def test_attributes_are_visible_in_the_image() -> None:
    base = syn.Identity("male", "black", "short", "t-shirt", "red", "plain", "trousers", "blue", "black",
                        "none", None, "none", None, False)
    changes = [{"upper_color": "green"}, {"upper_pattern": "striped"}, {"upper_type": "coat"},
               {"lower_color": "yellow"}, {"lower_type": "shorts"}, {"shoes_color": "white"},
               {"hair_color": "blonde"}, {"bag": "shoulder bag", "bag_color": "orange"},
               {"hat": "cap", "hat_color": "white"}, {"glasses": True}, {"gender": "female"}]
    for view in ("front", "side"):
        ref = np.asarray(syn.render_person(base, view, random.Random(3), (192, 64)), dtype=np.int32)
        for change in changes:
            img = syn.render_person(replace(base, **change), view, random.Random(3), (192, 64))
            diff = np.abs(np.asarray(img, dtype=np.int32) - ref).sum(-1)
            assert (diff > 60).sum() >= 8, (view, change)
    big = syn.render_person(base, "back", random.Random(0), (384, 128))
    assert big.size == (128, 384)


def test_captions_are_faithful_partial_and_varied() -> None:
    rng = random.Random(1)
    people = syn.sample_identities(150, rng)
    colors = "|".join(sorted(set(syn.COLORS) | set(syn.HAIR_COLORS), key=len, reverse=True))
    slot_nouns = {
        "upper_color": [n.split()[-1] for ns in syn.UPPER_NOUNS.values() for n in ns],
        "lower_color": [n for ns in syn.LOWER_NOUNS.values() for n in ns], "shoes_color": syn.SHOE_NOUNS,
        "bag_color": [n for ns in syn.BAG_NOUNS.values() for n in ns], "hat_color": ["cap", "baseball cap"],
        "hair_color": ["hair", "ponytail"],
    }
    noun_slot = {n: slot for slot, ns in slot_nouns.items() for n in ns}
    nouns = "|".join(sorted(noun_slot, key=len, reverse=True))
    pattern = re.compile(rf"\b({colors}) (?:(?:striped|plain) )?({nouns})\b")
    type_tokens = {t: {n.split()[-1] for n in ns} for t, ns in {**syn.UPPER_NOUNS, **syn.LOWER_NOUNS}.items()}
    matched = differ = mentions_upper = mentions_view = total = 0
    for p in people:
        view = rng.choice(syn.VIEWS)
        first, second = syn.describe(p, view, rng), syn.describe(p, view, rng)
        differ += first != second
        for caption in (first, second):
            text, total = caption.lower().replace("grey", "gray"), total + 1
            for m in pattern.finditer(text):  # every "<colour> <noun>" names the right item's colour
                assert getattr(p, noun_slot[m.group(2)]) == m.group(1), (caption, p)
                matched += 1
            tokens = set(syn.tokenize(text))
            for t, words in type_tokens.items():  # garment nouns only of the garments worn
                if t not in (p.upper_type, p.lower_type):
                    assert not tokens & words - type_tokens.get(p.upper_type, set()), (caption, t)
            mentions_upper += p.upper_color in tokens
            mentions_view += bool(tokens & {"camera", "us", "behind", "side", "sideways", "profile", "front"})
    assert matched > total  # colour mentions are frequent
    assert differ / len(people) > 0.9
    assert 0.4 < mentions_upper / total < 0.98  # partial: attributes are sometimes left out
    assert 0.2 < mentions_view / total < 0.95
