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

from xmr.data.formats import common

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


def _apply_standard_split(records: list[common.RawRecord], ctx: common.ReadContext) -> list[str]:
    if ctx.fields.split is not None:  # reid_raw.json carries its split
        return []
    assignment, notes = standard_split([r.pid for r in records])
    for r in records:
        r.split = assignment[r.pid]
    return [f"{ctx.annotation.name}: no split field, applied the standard split by identity", *notes]


# `val_fraction` and `seed` are unused: both annotation files define a validation split.
read = common.JsonRecordsFormat(
    common.Layout(NAME, FILES, SUBDIRS),
    fields={"reid_raw.json": common.Fields(), "caption_all.json": common.Fields(split=None)},
    finalize=_apply_standard_split,
)
