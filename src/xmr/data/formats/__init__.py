"""Dataset readers: one module per on-disk format, each turning annotation files into plain records.

    >>> splits = load_dataset("cuhk_pedes", "/data/CUHK-PEDES")       # or the parent folder
    >>> splits = load_dataset(detect_format(root), root, on_error="skip")

Every reader has the signature ``read(root, *, val_fraction, seed, on_error, check_images) -> DatasetSplits``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from xmr.data.formats import common, cuhk_pedes, folder, icfg_pedes, rstpreid
from xmr.data.records import DatasetSplits
from xmr.errors import DataError

Reader = Callable[..., DatasetSplits]

FORMATS: dict[str, Reader] = {
    cuhk_pedes.NAME: cuhk_pedes.read,
    icfg_pedes.NAME: icfg_pedes.read,
    rstpreid.NAME: rstpreid.read,
    folder.NAME: folder.read,
}

# Where each format keeps its annotation file (file names, sub-folders of a parent root): for detection.
_LAYOUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    cuhk_pedes.NAME: (cuhk_pedes.FILES, cuhk_pedes.SUBDIRS),
    icfg_pedes.NAME: (icfg_pedes.FILES, icfg_pedes.SUBDIRS),
    rstpreid.NAME: (rstpreid.FILES, rstpreid.SUBDIRS),
    folder.NAME: (folder.FILES, ()),
}


def _canonical(name: str) -> str:
    # Accept the spellings people use: "CUHK-PEDES", "cuhk-pedes", "RSTPReid", "ICFG_PEDES" ...
    return name.strip().lower().replace("-", "_")


def detect_format(root: str | os.PathLike) -> str:
    """Name of the format whose annotation file exists in `root` (or in its dataset sub-folder)."""
    root = Path(root).expanduser()
    for name, (files, subdirs) in _LAYOUTS.items():
        for base in [root, *(root / s for s in subdirs)]:
            if any((base / f).is_file() for f in files):
                return name
    expected = "; ".join(f"{n}: {' or '.join(files)}" for n, (files, _) in _LAYOUTS.items())
    listing = common.listing(root) if root.is_dir() else "(not a directory)"
    raise DataError(
        f"cannot detect the dataset format of {root}: none of the known annotation files "
        f"found ({expected}); {root} contains: {listing}"
    )


def load_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    on_error: common.OnError = "raise",
    check_images: common.CheckImages = "exists",
) -> DatasetSplits:
    """Read dataset `name` (a key of FORMATS, or "auto" to detect it) from `root`.

    val_fraction/seed: only for formats without a val split (ICFG-PEDES, folder without splits).
    on_error: "raise" stops at the first bad record with a message naming file, record and key;
        "skip" drops bad records and counts them in DatasetSplits.skipped (with notes).
    check_images: "exists" (default) checks that every image file exists, "decode" also decodes each,
        "none" checks nothing up front. Problems are reported once (count and first 5 paths).
    """
    key = _canonical(name)
    if key == "auto":
        key = detect_format(root)
    if key not in FORMATS:
        raise DataError(f"unknown dataset format {name!r}; known formats: {', '.join(FORMATS)} (or 'auto')")
    return FORMATS[key](
        root, val_fraction=val_fraction, seed=seed, on_error=on_error, check_images=check_images
    )


__all__ = ["FORMATS", "detect_format", "load_dataset"]
