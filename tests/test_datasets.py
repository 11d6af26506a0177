"""Datasets, seeded loaders and the identity sampler."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from xmr.data.datasets import ImageDataset, ImageTextDataset, TextDataset, build_loader
from xmr.data.records import ImageText
from xmr.data.samplers import IdentitySampler
from xmr.data.transforms import TestTransform, TrainTransform
from xmr.errors import ConfigError, DataError

SIZE = (16, 8)


def tokenize(captions: list[str]) -> torch.Tensor:
    """A stand-in tokenizer: character codes, padded to 12."""
    out = torch.zeros(len(captions), 12, dtype=torch.long)
    for i, c in enumerate(captions):
        codes = [ord(ch) for ch in c][:12]
        out[i, : len(codes)] = torch.tensor(codes)
    return out


def mask_first(record: ImageText, item: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A method's item_fn: extra fields from the record and the base fields."""
    ids = item["ids"]
    labels = torch.zeros_like(ids)
    labels[0] = ids[0]
    masked = ids.clone()
    masked[0] = 1
    return {"mlm_ids": masked, "mlm_labels": labels}


@pytest.fixture
def records(tmp_path: Path) -> list[ImageText]:
    recs = []
    for i in range(12):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (10, 20), (i * 20, 100, 255 - i * 20)).save(path)
        recs.append(ImageText(pid=i // 3, image_id=i, image_path=str(path), caption=f"caption {i}"))
    return recs


def test_item_contents(records: list[ImageText]) -> None:
    ds = ImageTextDataset(records, TestTransform(SIZE), tokenize, item_fn=mask_first)
    item = ds[4]
    assert item["images"].shape == (3, 16, 8) and item["images"].dtype == torch.float32
    assert item["ids"].shape == (12,) and item["ids"].dtype == torch.long
    assert item["ids"][:9].tolist() == [ord(c) for c in "caption 4"]
    assert item["pids"].item() == 1 and item["image_ids"].item() == 4 and item["pids"].dtype == torch.long
    assert (
        item["mlm_ids"][0] == 1 and item["mlm_labels"][0] == ord("c") and item["mlm_labels"][1:].eq(0).all()
    )
    assert ds.pids == [i // 3 for i in range(12)]
    batch = next(iter(build_loader(ds, 5, shuffle=False)))
    assert batch["images"].shape == (5, 3, 16, 8) and batch["pids"].tolist() == [0, 0, 0, 1, 1]


def test_bad_image_names_record(records: list[ImageText], tmp_path: Path) -> None:
    Path(records[2].image_path).write_bytes(b"garbage")
    ds = ImageTextDataset(records, TestTransform(SIZE), tokenize)
    with pytest.raises(DataError, match=r"training record 2: cannot decode image .*2\.png"):
        ds[2]


def test_eval_datasets(records: list[ImageText]) -> None:
    images = ImageDataset([r.image_path for r in records], TestTransform(SIZE))
    texts = TextDataset([r.caption for r in records], tokenize)
    assert len(images) == 12 and images[3]["index"].item() == 3 and images[3]["images"].shape == (3, 16, 8)
    assert texts[5]["ids"][:9].tolist() == [ord(c) for c in "caption 5"] and texts[5]["index"].item() == 5


def collect(loader) -> list[dict[str, torch.Tensor]]:
    return [dict(b) for b in loader]


def test_loader_workers_reproducible(records: list[ImageText]) -> None:
    ds = ImageTextDataset(records, TestTransform(SIZE), tokenize)
    one = collect(build_loader(ds, 4, shuffle=True, num_workers=0, seed=7))
    two = collect(build_loader(ds, 4, shuffle=True, num_workers=2, seed=7))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    order = torch.cat([b["image_ids"] for b in one]).tolist()
    assert sorted(order) == list(range(12)) and order != list(range(12))
    other = torch.cat([b["image_ids"] for b in collect(build_loader(ds, 4, shuffle=True, seed=8))]).tolist()
    assert other != order


def test_loader_random_augmentation_reproducible(records: list[ImageText]) -> None:
    # augmentation draws from each worker's torch RNG, seeded from the loader's generator
    ds = ImageTextDataset(records, TrainTransform(SIZE, pad=2), tokenize)
    a = collect(build_loader(ds, 6, shuffle=True, num_workers=2, seed=3))
    b = collect(build_loader(ds, 6, shuffle=True, num_workers=2, seed=3))
    assert all(torch.equal(x["images"], y["images"]) for x, y in zip(a, b, strict=True))


def test_loader_options(records: list[ImageText]) -> None:
    ds = ImageTextDataset(records, TestTransform(SIZE), tokenize)
    sampler = IdentitySampler(ds.pids, batch_size=4, num_instances=2)
    loader = build_loader(ds, 4, shuffle=False, sampler=sampler)
    assert loader.pin_memory is torch.cuda.is_available()
    assert len(loader) == len(sampler) // 4
    with pytest.raises(ConfigError, match="shuffle"):
        build_loader(ds, 4, shuffle=True, sampler=sampler)


# ------------------------------------------------------------------ IdentitySampler


def pid_list(n_ids: int = 10, sizes=(1, 2, 4, 5, 8)) -> list[int]:
    return [pid for pid in range(n_ids) for _ in range(sizes[pid % len(sizes)])]


def batches_of(sampler: IdentitySampler) -> list[list[int]]:
    flat = list(sampler)
    assert len(flat) == len(sampler)
    return [flat[i : i + sampler.batch_size] for i in range(0, len(flat), sampler.batch_size)]


def test_identity_batches_p_by_k() -> None:
    pids = pid_list()
    s = IdentitySampler(pids, batch_size=8, num_instances=2, seed=0)
    # chunks: sizes 1,2,4,5,8 -> 1,1,2,2,4 per id = 10 per 5 ids -> 20 chunks / 4 ids per batch = 5 batches
    assert len(s) == 5 * 8
    for batch in batches_of(s):
        counts = Counter(pids[i] for i in batch)
        assert len(counts) == 4 and set(counts.values()) == {2}  # id 0 (1 item) is drawn with replacement


def test_identity_sampler_epochs() -> None:
    pids = pid_list(20)
    s = IdentitySampler(pids, batch_size=8, num_instances=4, seed=5)
    e0 = list(s)
    assert list(s) == e0
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and len(e1) == len(e0)
    t = IdentitySampler(pids, batch_size=8, num_instances=4, seed=5)
    t.set_epoch(1)
    assert list(t) == e1
    u = IdentitySampler(pids, batch_size=8, num_instances=4, seed=6)
    assert list(u) != e0


def test_identity_sampler_ranks_disjoint() -> None:
    pids = [pid for pid in range(24) for _ in range(4)]  # every id exactly K=4 items: each index used once
    full = IdentitySampler(pids, batch_size=8, num_instances=4, seed=2)
    every = batches_of(full)
    assert len(every) == 12
    ranks = [
        IdentitySampler(pids, batch_size=8, num_instances=4, seed=2, rank=r, world_size=3) for r in range(3)
    ]
    parts = [batches_of(r) for r in ranks]
    assert [len(p) for p in parts] == [4, 4, 4] and len({len(r) for r in ranks}) == 1
    assert [b for r in range(3) for b in parts[r]] == [b for r in range(3) for b in every[r::3]]
    seen = [i for p in parts for b in p for i in b]
    assert len(seen) == len(set(seen)) == 96
    # uneven: 12 batches over 5 ranks -> 2 each, same length everywhere
    five = [
        IdentitySampler(pids, batch_size=8, num_instances=4, seed=2, rank=r, world_size=5) for r in range(5)
    ]
    assert {len(r) for r in five} == {16}


def test_identity_sampler_errors() -> None:
    with pytest.raises(ConfigError, match="multiple"):
        IdentitySampler([0, 1], batch_size=6, num_instances=4)
    with pytest.raises(ConfigError, match="identities"):
        IdentitySampler([0, 0, 1, 1], batch_size=8, num_instances=2)
    with pytest.raises(ConfigError, match="rank"):
        IdentitySampler([0, 1], batch_size=2, num_instances=1, rank=2, world_size=2)


def test_identity_sampler_refuses_records_without_identity() -> None:
    pids: list[int | None] = [0, 0, 1, None, 1, None]
    with pytest.raises(ConfigError, match=r"2 of 6 training records have no identity.*data\.sampler=random"):
        IdentitySampler(pids, batch_size=2, num_instances=1)
    assert len(IdentitySampler([0, 0, 1, 1], batch_size=2, num_instances=1)) == 4
