"""Datasets captioned by Reed et al. (CVPR 2016, "Learning Deep Representations of Fine-Grained Visual
Descriptions"): CUB-200-2011 birds and Oxford-102 flowers. One reader, parameterised by a `ReedCaptions`
layout; `cub.py` and `flowers102.py` declare theirs.

Two trees from two archives, both under one dataset folder (``data.root``, or its parent when a layout
subdir such as ``CUB/`` holds them):

* the captions tree ``<captions>/`` (Reed's ``cvpr2016_cub.tar.gz`` / ``cvpr2016_flowers.tar.gz``):
  ``text_c10/<class>/<image>.txt`` with 10 captions per image, one per line, and the class lists
  ``trainvalclasses.txt`` and ``testclasses.txt`` (one class folder name per line). The archive's
  ``images/<class>.t7`` files are CNN features, not pictures: never read. ``trainclasses.txt``,
  ``valclasses.txt`` and ``allclasses.txt`` are not used either.
* the pictures tree (``CUB_200_2011.tgz``: ``CUB_200_2011/images/<class>/<image>.jpg``; ``102flowers.tgz``:
  ``jpg/<image>.jpg``). The picture of caption file ``text_c10/<class>/<image>.txt`` is found by its stem.

Class id = the number in the class folder name minus 1 (``001.Black_footed_Albatross`` -> 0,
``class_00001`` -> 0). Splits by class, read from the lists (never hard-coded):

* test = the classes of ``testclasses.txt``;
* val = a seeded ``val_fraction`` of the ``trainvalclasses.txt`` classes (ids sorted, shuffled with
  ``random.Random(seed)``, the first ``round(val_fraction * n)``, at least 1, never all); never a test
  class. ``val_fraction=0``: no val split, every trainval class trains (m = 150 CUB, 82 Flowers);
* train = the other trainval classes: one ImageText per (image, caption), pid = class relabelled to
  0..m-1 in ascending class id (m = num_train_ids = the number of MMRef references).

Val and test are RetrievalSplits whose pids are the class ids, so same-class images are the positives
of the "person" task (per-caption R1/5/10, mAP, mINP); Reed's class-level protocol is
``xmr.evaluation.reed``.

Bad input. Always an error (the trees do not fit together): the captions folder, ``text_c10``, a class
list or the pictures folder missing (the message names the archive each comes from), a class listed in
both lists, a class folder in ``text_c10`` that no list names. ``on_error="raise"`` stops at, and
``"skip"`` drops and counts (DatasetSplits.skipped, with a note): a listed class without a caption
folder, an empty caption file, caption files whose picture is missing (one message, count and first
five; checked unless ``check_images="none"``; ``"decode"`` also decodes each picture). A caption file
without exactly 10 non-empty lines is kept with the lines it has and reported once, with a count, in
DatasetSplits.notes; so are files that are not valid UTF-8 (undecodable bytes replaced).

Separate trees: the read function also takes ``images_root`` (the pictures tree: ``CUB_200_2011`` or its
``images`` folder; the folder holding ``jpg`` or ``jpg`` itself) and ``captions_root`` (the
``cvpr2016_*`` folder); then `root` is needed only for what is not given.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from xmr.data.formats import common
from xmr.data.records import DatasetSplits
from xmr.errors import DataError

CAPTIONS_PER_IMAGE = 10
CLASS_LEVEL_AT = 50  # Reed's t2i "AP@50" cut-off
TEXT = "text_c10"
TRAINVAL, TEST = "trainvalclasses.txt", "testclasses.txt"
_SHOW = 5


@dataclass(frozen=True)
class ReedCaptions:
    """The on-disk layout of one Reed-caption dataset; calling it reads the dataset (it is `read`)."""

    layout: common.Layout  # name; files = the trainval list inside the captions tree (for detection)
    captions: str  # the captions tree, relative to the dataset folder ("cvpr2016_cub")
    captions_archive: str  # where it comes from, for messages
    pictures: tuple[str, ...]  # candidate pictures folders, relative to the dataset folder, in order
    pictures_archive: str
    class_pattern: str  # a class folder name (full match); group 1 = the 1-based class number
    example_class: str  # for messages
    pictures_per_class: bool  # pictures/<class>/<stem>.jpg (CUB) or pictures/<stem>.jpg (Flowers)

    @property
    def name(self) -> str:
        return self.layout.name

    def class_id(self, folder: str) -> int | None:
        """0-based class id of a class folder name, or None when the name does not fit the pattern."""
        m = re.fullmatch(self.class_pattern, folder)
        return int(m.group(1)) - 1 if m else None

    def picture(self, pictures: Path, folder: str, stem: str) -> Path:
        return (pictures / folder if self.pictures_per_class else pictures) / f"{stem}.jpg"

    def __call__(
        self,
        root: str | os.PathLike | None = None,
        *,
        val_fraction: float = 0.1,
        seed: int = 0,
        on_error: common.OnError = "raise",
        check_images: common.CheckImages = "exists",
        images_root: str | os.PathLike | None = None,
        captions_root: str | os.PathLike | None = None,
    ) -> DatasetSplits:
        """Read the dataset (see the module docstring)."""
        spec = self
        common.check_options(on_error, check_images, val_fraction)
        root_p = _path(root)
        captions = _find_captions(spec, root_p, _path(captions_root)).resolve()
        base = captions.parent if captions_root is None else root_p
        pictures = _find_pictures(spec, base, _path(images_root)).resolve()
        text = captions / TEXT
        if not text.is_dir():
            raise DataError(
                f"{spec.name}: caption folder {text} not found; {TEXT}/ (10 captions per image, "
                f"{TEXT}/<class>/<image>.txt) comes from Reed et al.'s {spec.captions_archive}, not from "
                f"{spec.pictures_archive}; {captions} contains: {common.listing(captions)}"
            )
        trainval, test = _read_list(spec, captions / TRAINVAL), _read_list(spec, captions / TEST)
        _check_lists(spec, captions, trainval, test)
        present, notes = _check_folders(spec, text, trainval + test, on_error)
        split, split_note = _assign_splits(spec, trainval, test, val_fraction, seed)
        kept = set(present)
        scan = _read_captions(spec, text, pictures, {c: s for c, s in split.items() if c in kept}, on_error,
                              check_images)
        splits = common.finish(
            spec.name,
            captions.parent,
            text,
            scan.records,
            on_error=on_error,
            check_images="decode" if check_images == "decode" else "none",  # existence was checked above
            skipped=scan.skipped,
            notes=[split_note, *notes, *scan.notes],
        )
        # labels are classes: evaluation adds Reed's class-level protocol to the per-caption one
        splits.task_options = {"class_level_at": CLASS_LEVEL_AT}
        return splits


# ---------------------------------------------------------------- locating the two trees


def _captions_hint(spec: ReedCaptions, root: Path) -> str:
    if (root / TEXT).is_dir() or (root / TRAINVAL).is_file():
        return (
            f" {root} looks like the captions tree itself: give its parent, the folder holding both "
            f"{spec.captions}/ and the pictures ({spec.pictures[0]}/)."
        )
    if any((root / p).is_dir() for p in spec.pictures):
        return (
            f" {root} holds the pictures ({spec.pictures_archive}) but not the captions: Reed's captions "
            f"are a separate download, {spec.captions_archive}; extract it next to the pictures."
        )
    return ""


def _find_captions(spec: ReedCaptions, root: Path | None, captions_root: Path | None) -> Path:
    if captions_root is not None:
        if not captions_root.is_dir():
            raise DataError(
                f"{spec.name}: captions_root {captions_root} is not a directory; it should be the "
                f"{spec.captions}/ folder from {spec.captions_archive}"
            )
        return captions_root
    if root is None:
        raise DataError(f"{spec.name}: give the dataset root (or captions_root and images_root)")
    if not root.is_dir():
        raise DataError(f"{spec.name}: dataset root {root} does not exist or is not a directory")
    bases = [root, *(root / s for s in spec.layout.subdirs)]
    for base in bases:
        if (base / spec.captions).is_dir():
            return base / spec.captions
    where = ", ".join(str(b) for b in bases[:3]) + (", ..." if len(bases) > 3 else "")
    raise DataError(
        f"{spec.name}: captions folder {spec.captions}/ not found in {where}; it comes from "
        f"{spec.captions_archive}, a separate download from the pictures ({spec.pictures_archive}); "
        f"{root} contains: {common.listing(root)}.{_captions_hint(spec, root)}"
    )


def _holds_features(folder: Path) -> bool:
    """Reed's images/ folder: <class>.t7 CNN features, no pictures."""
    return next(folder.glob("*.t7"), None) is not None


def _find_pictures(spec: ReedCaptions, base: Path | None, images_root: Path | None) -> Path:
    if images_root is not None:
        leaf = Path(spec.pictures[0]).name
        candidates = [images_root / leaf, images_root]
    elif base is not None:
        candidates = [base / p for p in spec.pictures]
    else:
        raise DataError(f"{spec.name}: give the dataset root or images_root (the pictures tree)")
    features = [c for c in candidates if c.is_dir() and _holds_features(c)]
    for c in candidates:
        if c.is_dir() and c not in features:
            return c
    shown = images_root if images_root is not None else base
    note = (
        f" {features[0]} holds .t7 files: those are Reed's CNN features from {spec.captions_archive}, "
        "not pictures."
        if features
        else ""
    )
    raise DataError(
        f"{spec.name}: pictures folder {' or '.join(str(c) for c in candidates)} not found; the pictures "
        f"come from {spec.pictures_archive}, not from Reed's caption archive.{note} "
        f"{shown} contains: {common.listing(shown) if shown.is_dir() else '(not a directory)'}"
    )


# ---------------------------------------------------------------- class lists


def _read_list(spec: ReedCaptions, path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(
            f"{spec.name}: class list {path} not found; it comes with the captions in "
            f"{spec.captions_archive}; {path.parent} contains: {common.listing(path.parent)}"
        )
    names: list[str] = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        if spec.class_id(name) is None:
            raise DataError(
                f"{path} line {n}: {name!r} is not a class folder name like {spec.example_class!r}"
            )
        names.append(name)
    if not names:
        raise DataError(f"{spec.name}: class list {path} is empty (one class folder name per line expected)")
    return list(dict.fromkeys(names))


def _check_lists(spec: ReedCaptions, captions: Path, trainval: list[str], test: list[str]) -> None:
    both = sorted(set(trainval) & set(test))
    if both:
        raise DataError(
            f"{spec.name}: {len(both)} classes are listed in both {captions / TRAINVAL} and "
            f"{captions / TEST}, e.g. {', '.join(both[:_SHOW])}; test classes must be unseen in training"
        )
    by_id: dict[int, str] = {}
    for name in trainval + test:
        other = by_id.setdefault(spec.class_id(name), name)  # type: ignore[arg-type]
        if other != name:
            raise DataError(f"{spec.name}: class folders {other!r} and {name!r} have the same class number")


def _check_folders(
    spec: ReedCaptions, text: Path, listed: list[str], on_error: common.OnError
) -> tuple[list[str], list[str]]:
    """Listed classes that have a caption folder, and notes; an unlisted folder is always an error."""
    folders = sorted(p.name for p in text.iterdir() if p.is_dir() and not p.name.startswith("."))
    known = set(listed)
    unknown = [f for f in folders if f not in known]
    if unknown:
        raise DataError(
            f"{spec.name}: {len(unknown)} class folders in {text} are in neither {TRAINVAL} nor {TEST}, "
            f"first {min(_SHOW, len(unknown))}: {', '.join(unknown[:_SHOW])}; the class lists and text_c10 "
            f"must come from the same copy of {spec.captions_archive}"
        )
    present = set(folders)
    missing = [c for c in listed if c not in present]
    if not missing:
        return listed, []
    msg = (
        f"{spec.name}: {len(missing)} listed classes have no caption folder in {text}, first "
        f"{min(_SHOW, len(missing))}: {', '.join(missing[:_SHOW])}; re-extract text_c10/ from "
        f"{spec.captions_archive}"
    )
    if on_error == "raise":
        raise DataError(msg + ", or pass on_error='skip' to leave these classes out")
    return [c for c in listed if c in present], [f"left out: {msg}"]


def _assign_splits(
    spec: ReedCaptions, trainval: list[str], test: list[str], val_fraction: float, seed: int
) -> tuple[dict[str, str], str]:
    ids = {spec.class_id(c): c for c in trainval}
    order = common.shuffled_ids(ids, seed)
    n_val = common.holdout_count(len(order), val_fraction)
    val = {ids[i] for i in order[:n_val]}
    split = {c: ("val" if c in val else "train") for c in trainval}
    split.update({c: "test" for c in test})
    note = (
        f"classes from {TRAINVAL} / {TEST}: {len(trainval) - n_val} train, {n_val} val (val_fraction="
        f"{val_fraction}, seed={seed}, drawn from the trainval classes), {len(test)} test"
    )
    return split, note


# ---------------------------------------------------------------- caption files


def _read_lines(path: Path) -> tuple[list[str], bool]:
    """Non-empty, stripped lines of a caption file; and whether it was valid UTF-8."""
    data = path.read_bytes()
    try:
        text, ok = data.decode("utf-8"), True
    except UnicodeDecodeError:
        text, ok = data.decode("utf-8", errors="replace"), False
    return [s for s in (line.strip() for line in text.splitlines()) if s], ok


@dataclass
class _Scan:
    records: list[common.RawRecord]
    skipped: int
    notes: list[str]


def _read_captions(
    spec: ReedCaptions,
    text: Path,
    pictures: Path,
    split: dict[str, str],
    on_error: common.OnError,
    check_images: common.CheckImages,
) -> _Scan:
    records: list[common.RawRecord] = []
    empty: list[Path] = []
    uneven: list[tuple[Path, int]] = []
    not_utf8: list[Path] = []
    no_picture: list[tuple[Path, Path]] = []
    no_files: list[str] = []
    classes = sorted(split, key=spec.class_id)  # type: ignore[arg-type]
    for folder in classes:
        files = sorted(p for p in (text / folder).iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            no_files.append(folder)
        for path in files:
            lines, ok = _read_lines(path)
            if not ok:
                not_utf8.append(path)
            if not lines:
                if on_error == "raise":
                    raise DataError(
                        f"{path}: caption file is empty; each image has {CAPTIONS_PER_IMAGE} captions, one "
                        f"per line, in {spec.captions_archive} (or pass on_error='skip' to drop such files)"
                    )
                empty.append(path)
                continue
            if len(lines) != CAPTIONS_PER_IMAGE:
                uneven.append((path, len(lines)))
            picture = spec.picture(pictures, folder, path.stem)
            if check_images != "none" and not picture.is_file():
                no_picture.append((path, picture))
                continue
            where = f"{TEXT}/{folder}/{path.name}"
            records.append(common.RawRecord(where, spec.class_id(folder), str(picture), lines, split[folder]))

    notes: list[str] = []
    skipped = len(empty)
    if no_picture:
        shown = "; ".join(f"{c} -> {p}" for c, p in no_picture[:_SHOW])
        msg = (
            f"{spec.name}: {len(no_picture)} caption files have no picture, first "
            f"{min(_SHOW, len(no_picture))}: {shown}; the pictures come from {spec.pictures_archive}, "
            f"extracted as {pictures}/"
        )
        if on_error == "raise":
            raise DataError(msg + " (or pass on_error='skip' to drop these captions)")
        skipped += len(no_picture)
        notes.append(f"dropped: {msg}")
    if empty:
        notes.append(f"dropped {len(empty)} empty caption files, e.g. {empty[0]}")
    if uneven:
        path, n = uneven[0]
        notes.append(
            f"{len(uneven)} caption files do not have exactly {CAPTIONS_PER_IMAGE} non-empty lines (kept "
            f"with the captions they have), e.g. {path} ({n} lines)"
        )
    if not_utf8:
        notes.append(f"{len(not_utf8)} caption files are not valid UTF-8 (bytes replaced), e.g. {not_utf8[0]}")
    if no_files:
        notes.append(f"{len(no_files)} class folders have no caption files, e.g. {text / no_files[0]}")
    return _Scan(records, skipped, notes)


# ---------------------------------------------------------------- the reader


def _path(p: str | os.PathLike | None) -> Path | None:
    return None if p is None else Path(p).expanduser()
