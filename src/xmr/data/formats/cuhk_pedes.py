"""CUHK-PEDES reader (Li et al., CVPR 2017).

Layout: ``CUHK-PEDES/imgs/<file_path>`` plus either

* ``reid_raw.json``: the re-split copy used by IRRA and most follow-ups, a list of records
  {split: train|val|test, captions: [str, ...], file_path: str, processed_tokens: [[str]] (ignored),
  id: int}; or
* ``caption_all.json``: the authors' original release, same records without ``split``. The standard split
  is applied by identity: ids sorted ascending, the first 11,003 train, the next 1,000 val, the last
  1,000 test. With fewer ids the three parts are scaled proportionally (noted in DatasetSplits.notes).

The root may be the CUHK-PEDES folder or its parent.
"""

from __future__ import annotations

import os
from pathlib import Path

from xmr.data.formats import common
from xmr.data.records import DatasetSplits

NAME = "cuhk_pedes"
FILES = ("reid_raw.json", "caption_all.json")
SUBDIRS = ("CUHK-PEDES", "CUHK_PEDES", "cuhk-pedes", "cuhk_pedes")
STANDARD = (11_003, 1_000, 1_000)  # train / val / test identities of the authors' split


def standard_split(ids: list[int]) -> tuple[dict[int, str], list[str]]:
    """Assign each distinct id to train/val/test by the standard CUHK-PEDES split (sorted ids).

    Returns (id -> split, notes). With other than 13,003 ids the proportions 11003:1000:1000 are kept.
    """
    order = sorted(set(ids))
    n, total = len(order), sum(STANDARD)
    notes: list[str] = []
    if n == total:
        n_val, n_test = STANDARD[1], STANDARD[2]
    else:
        n_test = max(1, round(n * STANDARD[2] / total)) if n >= 2 else 0
        n_val = max(1, round(n * STANDARD[1] / total)) if n >= 3 else 0
        notes.append(
            f"caption_all.json has {n} identities, not {total}: standard split scaled "
            f"proportionally to {n - n_val - n_test} train / {n_val} val / {n_test} test ids"
        )
    n_train = n - n_val - n_test
    split = {
        pid: ("train" if i < n_train else "val" if i < n_train + n_val else "test")
        for i, pid in enumerate(order)
    }
    return split, notes


def read(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    on_error: common.OnError = "raise",
    check_images: common.CheckImages = "exists",
) -> DatasetSplits:
    """Read CUHK-PEDES from `root` (the dataset folder or its parent).

    `val_fraction` and `seed` are unused: both annotation files define a validation split.
    """
    common.check_options(on_error, check_images, val_fraction)
    base, ann = common.locate(root, FILES, SUBDIRS, NAME)
    items = common.read_json_list(ann)
    has_split = ann.name == "reid_raw.json"
    images = base / "imgs"

    def parse(rec: dict, where: str) -> common.RawRecord:
        return common.RawRecord(
            where=where,
            pid=common.get_int(rec, "id", where),
            image=str(images / common.get_str(rec, "file_path", where)),
            captions=common.get_captions(rec, "captions", where),
            split=common.get_split(rec, "split", where) if has_split else "train",
        )

    records, skipped, notes = common.collect(
        ((f"{ann.name} record {i}", r) for i, r in enumerate(items)), parse, on_error
    )
    if not has_split:
        assignment, more = standard_split([r.pid for r in records])
        for r in records:
            r.split = assignment[r.pid]
        notes = [f"{ann.name}: no split field, applied the standard split by identity", *more, *notes]
    return common.finish(
        NAME,
        Path(base),
        ann,
        records,
        on_error=on_error,
        check_images=check_images,
        skipped=skipped,
        notes=notes,
    )
