"""ICFG-PEDES reader (Ding et al., 2021).

Layout: ``ICFG-PEDES/imgs/{train,test}/...`` and ``ICFG-PEDES.json`` (some copies: ``ICFG_PEDES.json``),
a list of records {split: train|test, captions: [str] (one caption), file_path: str, id: int,
processed_tokens (ignored)}. The root may be the ICFG-PEDES folder or its parent.

Validation split: the file has none, so a seeded random ``val_fraction`` of the *training identities*
(whole identities, never individual images) is held out as the val split; training uses the rest.
The choice is deterministic given (the set of training ids, seed): ids are sorted, shuffled with
``random.Random(seed)``, and the first ``round(val_fraction * n)`` (at least 1) become val.
``val_fraction=0`` keeps all training ids and gives no val split. A copy whose records already carry
``split: val`` keeps that split instead.
"""

from __future__ import annotations

from xmr.data.formats import common

NAME = "icfg_pedes"
FILES = ("ICFG-PEDES.json", "ICFG_PEDES.json")
SUBDIRS = ("ICFG-PEDES", "ICFG_PEDES", "icfg-pedes", "icfg_pedes")


def hold_out_val(records: list[common.RawRecord], val_fraction: float, seed: int) -> list[str]:
    """Move a seeded `val_fraction` of training identities to split 'val' (in place); returns notes."""
    train_ids = [r.pid for r in records if r.split == "train"]
    order = common.shuffled_ids(train_ids, seed)
    n_val = common.holdout_count(len(order), val_fraction)
    if n_val == 0:
        return ["no val split (val_fraction=0 or too few training identities)"]
    val_ids = set(order[:n_val])
    for r in records:
        if r.split == "train" and r.pid in val_ids:
            r.split = "val"
    return [
        (
            f"val split: held out {n_val} of {len(order)} training identities "
            f"(val_fraction={val_fraction}, seed={seed}); training uses the other {len(order) - n_val}"
        )
    ]


def _val_split(records: list[common.RawRecord], ctx: common.ReadContext) -> list[str]:
    if any(r.split == "val" for r in records):  # a re-split copy that already has a val split
        return ["the annotation file has its own val split: val_fraction unused"]
    return hold_out_val(records, ctx.val_fraction, ctx.seed)


read = common.JsonRecordsFormat(
    common.Layout(NAME, FILES, SUBDIRS),
    fields=common.Fields(captions_may_be_str=True),
    finalize=_val_split,
)
