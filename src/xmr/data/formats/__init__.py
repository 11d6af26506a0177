"""Dataset readers: one module per on-disk format, each turning annotation files into plain records.

    >>> splits = load_dataset("cuhk_pedes", "/data/CUHK-PEDES")       # or the parent folder
    >>> splits = load_dataset(detect_format(root), root, on_error="skip")

Every reader has the signature ``read(root, *, val_fraction, seed, on_error, check_images) -> DatasetSplits``
and carries its `layout` (common.Layout: annotation file names, dataset sub-folders). Formats are found
through the registry ``xmr.registry.FORMATS`` (name -> "module:read"), the one place a new format is
registered; detection asks each registered reader's layout, the `fallback` ones (folder) last.
``FORMATS`` here is the list of registered names in that order.
"""

from __future__ import annotations

import difflib
import inspect
import os
from pathlib import Path

from xmr import registry
from xmr.data.formats import common
from xmr.data.formats.common import Layout, Reader
from xmr.data.records import DatasetSplits
from xmr.errors import ConfigError, DataError


def _canonical(name: str) -> str:
    # Accept the spellings people use: "CUHK-PEDES", "cuhk-pedes", "RSTPReid", "ICFG_PEDES" ...
    return name.strip().lower().replace("-", "_")


def get_reader(name: str) -> Reader:
    """The registered reader of format `name` (imported on first use); checks that it has a layout."""
    reader = registry.FORMATS.get(name)
    if not isinstance(getattr(reader, "layout", None), Layout) or not callable(reader):
        raise ConfigError(
            f"dataset format {name!r}: the registered reader must be callable and carry a `layout` "
            "(declare it as common.JsonRecordsFormat, or decorate its read function with @common.reader)"
        )
    return reader


def known_formats() -> list[str]:
    """Registered format names, in detection order: dataset-specific formats, then fallback ones."""
    return sorted(registry.FORMATS.names(), key=lambda n: (get_reader(n).layout.fallback, n))


def __getattr__(name: str) -> list[str]:
    # FORMATS is computed on access, so a format registered after this import is listed too.
    if name == "FORMATS":
        return known_formats()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def detect_format(root: str | os.PathLike) -> str:
    """Name of the format whose annotation file exists in `root` (or in its dataset sub-folder)."""
    root = Path(root).expanduser()
    names = known_formats()
    for name in names:
        if get_reader(name).layout.find(root) is not None:
            return name
    expected = "; ".join(f"{n}: {' or '.join(get_reader(n).layout.files)}" for n in names)
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
    images_root: str | os.PathLike | None = None,
    captions_root: str | os.PathLike | None = None,
) -> DatasetSplits:
    """Read dataset `name` (a registered format, or "auto" to detect it) from `root`.

    val_fraction/seed: only for formats without a val split (ICFG-PEDES, folder without splits).
    on_error: "raise" stops at the first bad record with a message naming file, record and key;
        "skip" drops bad records and counts them in DatasetSplits.skipped (with notes).
    check_images: "exists" (default) checks that every image file exists, "decode" also decodes each,
        "none" checks nothing up front. Problems are reported once (count and first 5 paths).
    """
    key = _canonical(name)
    if key == "auto":
        key = detect_format(root)
    if key not in registry.FORMATS:
        known = known_formats()
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(
            f"unknown dataset format {name!r}{hint}; known formats: {', '.join(known)} (or 'auto')"
        )
    reader = get_reader(key)
    trees = {k: v for k, v in (("images_root", images_root), ("captions_root", captions_root)) if v is not None}
    if trees:
        try:
            inspect.signature(reader).bind(root, **trees)
        except TypeError:
            raise DataError(
                f"format {key} keeps its images and annotations under one root: "
                f"{' and '.join(sorted(trees))} apply only to formats with separate trees (cub, flowers102)"
            ) from None
    return reader(root, val_fraction=val_fraction, seed=seed, on_error=on_error, check_images=check_images, **trees)


__all__ = ["FORMATS", "detect_format", "get_reader", "known_formats", "load_dataset"]
