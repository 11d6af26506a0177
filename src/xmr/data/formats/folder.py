"""Custom data ("folder" format): a root holding ``captions.jsonl`` and the images.

Each line of ``captions.jsonl`` is a JSON object::

    {"image": "relative/path.jpg", "caption": "a man in a red coat" | ["...", "..."],
     "id": 7 | "alice" (optional), "split": "train" | "val" | "test" (optional)}

* ``image`` is relative to the root; several lines may name the same image (their captions add up).
* ``id`` groups images of the same identity. Without it every distinct image is its own identity.
  Integer ids are kept as they are; otherwise (string ids, or a mix) the distinct ids are mapped to
  0..M-1 in sorted order, noted in DatasetSplits.notes.
* ``split``: either every line has one or none does. Without split fields the identities are split
  at random, seeded: ids sorted then shuffled with ``random.Random(seed)``; 10% (at least 1) test,
  ``val_fraction`` (default 10%, at least 1 when > 0) val, the rest train, i.e. 80/10/10 by default.
Blank lines are ignored; line numbers in messages are 1-based.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmr.data.formats import common
from xmr.data.records import DatasetSplits
from xmr.errors import DataError

NAME = "folder"
FILES = ("captions.jsonl",)
SUBDIRS: tuple[str, ...] = ()
LAYOUT = common.Layout(NAME, FILES, SUBDIRS, fallback=True)  # any data set may carry a captions.jsonl
TEST_FRACTION = 0.1


@dataclass
class _FolderRecord(common.RawRecord):
    key: tuple[str, Any] = ("", None)  # ("id", value) or ("image", path) before ids become ints


def _lines(ann: Path, on_error: common.OnError) -> tuple[list[tuple[str, Any]], int, list[str]]:
    """(where, parsed object) for every non-blank line; malformed JSON raises or is counted."""
    items, bad = [], []
    with open(ann, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{ann.name} line {n}"
            try:
                items.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                if on_error == "raise":
                    raise DataError(
                        f"{ann}: line {n} is not valid JSON ({e.msg} at column {e.colno})"
                    ) from None
                bad.append(where)
    notes = [f"skipped {len(bad)} lines that are not valid JSON, e.g. {bad[0]}"] if bad else []
    return items, len(bad), notes


def _parse(root: Path):
    def parse(rec: dict, where: str) -> _FolderRecord:
        image = str(root / common.get_str(rec, "image", where))
        raw_id = rec.get("id")
        if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, (int, str))):
            raise common.RecordError(
                f"{where}: key 'id' must be an integer or a string, got {common.describe(raw_id)}"
            )
        split = common.get_split(rec, "split", where) if "split" in rec else ""
        return _FolderRecord(
            where=where,
            pid=-1,
            image=image,
            split=split,
            captions=common.get_captions(rec, "caption", where, allow_str=True),
            key=("id", raw_id) if raw_id is not None else ("image", image),
        )

    return parse


def _assign_ids(records: list[_FolderRecord]) -> list[str]:
    """Give every record an integer pid (see module docstring); returns notes."""
    keys = list(dict.fromkeys(r.key for r in records))
    if all(k[0] == "id" and isinstance(k[1], int) for k in keys):
        for r in records:
            r.pid = r.key[1]
        return []
    ordered = sorted(keys, key=lambda k: (k[0], str(k[1])))
    mapping = {k: i for i, k in enumerate(ordered)}
    for r in records:
        r.pid = mapping[r.key]
    if all(k[0] == "image" for k in keys):
        return [f"no 'id' fields: each of the {len(keys)} images is its own identity"]
    return [f"ids mapped to integers 0..{len(keys) - 1} (sorted): string ids or images without an id"]


def _check_splits(records: list[_FolderRecord], on_error: common.OnError) -> tuple[list[_FolderRecord], int]:
    """Either all records carry a split or none; records lacking one among split records are errors."""
    lacking = [r for r in records if not r.split]
    if not lacking or len(lacking) == len(records):
        return records, 0
    if on_error == "raise":
        raise DataError(
            f"{lacking[0].where}: missing key 'split' while other lines have one "
            f"({len(lacking)} lines lack it); give every line a split or none"
        )
    return [r for r in records if r.split], len(lacking)


def _random_split(records: list[_FolderRecord], val_fraction: float, seed: int) -> list[str]:
    order = common.shuffled_ids([r.pid for r in records], seed)
    n = len(order)
    if n < 2:
        raise DataError(f"{NAME}: need at least 2 identities to make a train/test split, found {n}")
    n_test = common.holdout_count(n, TEST_FRACTION)
    n_val = common.holdout_count(n - n_test, val_fraction * n / (n - n_test))
    split = {pid: "test" for pid in order[:n_test]}
    split.update({pid: "val" for pid in order[n_test : n_test + n_val]})
    for r in records:
        r.split = split.get(r.pid, "train")
    return [
        (
            f"no 'split' fields: identities split at random (seed={seed}) into "
            f"{n - n_test - n_val} train / {n_val} val / {n_test} test"
        )
    ]


@common.reader(LAYOUT)
def read(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    on_error: common.OnError = "raise",
    check_images: common.CheckImages = "exists",
) -> DatasetSplits:
    """Read a custom dataset: `root`/captions.jsonl with images relative to `root`."""
    common.check_options(on_error, check_images, val_fraction)
    base, ann = LAYOUT.locate(root)
    items, skipped, notes = _lines(ann, on_error)
    records, n, more = common.collect(items, _parse(base), on_error)
    records, n_split = _check_splits(records, on_error)
    skipped, notes = skipped + n + n_split, notes + more
    if n_split:
        notes.append(f"skipped {n_split} lines without 'split' (other lines have one)")
    if not records:
        raise DataError(f"{ann}: no usable records" + (f" ({skipped} skipped)" if skipped else ""))
    notes = _assign_ids(records) + notes
    if not records[0].split:
        notes += _random_split(records, val_fraction, seed)
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
