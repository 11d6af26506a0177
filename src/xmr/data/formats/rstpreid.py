"""RSTPReid reader (Zhu et al., ACM MM 2021).

Layout: ``RSTPReid/imgs/<img_path>`` and ``data_captions.json``, a list of records
{id: int, img_path: str, captions: [str, str], split: train|val|test}. The root may be the RSTPReid folder
or its parent.
"""

from __future__ import annotations

import os
from pathlib import Path

from xmr.data.formats import common
from xmr.data.records import DatasetSplits

NAME = "rstpreid"
FILES = ("data_captions.json",)
SUBDIRS = ("RSTPReid", "rstpreid", "RSTPReID")


def read(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    on_error: common.OnError = "raise",
    check_images: common.CheckImages = "exists",
) -> DatasetSplits:
    """Read RSTPReid from `root`. `val_fraction` and `seed` are unused (the file has a val split)."""
    common.check_options(on_error, check_images, val_fraction)
    base, ann = common.locate(root, FILES, SUBDIRS, NAME)
    items = common.read_json_list(ann)
    images = base / "imgs"

    def parse(rec: dict, where: str) -> common.RawRecord:
        return common.RawRecord(
            where=where,
            pid=common.get_int(rec, "id", where),
            image=str(images / common.get_str(rec, "img_path", where)),
            captions=common.get_captions(rec, "captions", where),
            split=common.get_split(rec, "split", where),
        )

    records, skipped, notes = common.collect(
        ((f"{ann.name} record {i}", r) for i, r in enumerate(items)), parse, on_error
    )
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
