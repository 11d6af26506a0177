"""Shared machinery of the format readers: locating and parsing annotation files, validating records,
checking images up front, seeded identity splits and building DatasetSplits, and the one JSON-records
reader that the JSON formats declare instead of writing.

A reader turns its file into a list of RawRecord (one per annotated image, original ids, full image
paths) and hands it to `finish`, which checks consistency and images and builds the splits. Every reader
carries a `layout` (its name, annotation file names and dataset sub-folders) for locating and detection.

A format whose annotation file is one JSON list of records (CUHK-PEDES, ICFG-PEDES, RSTPReid) is a
`JsonRecordsFormat`: its layout, which keys hold what (`Fields`), where the images are, and optionally
its own per-record `parse` and a `finalize` hook (e.g. assigning splits the file does not carry):

    >>> TOY = JsonRecordsFormat(Layout("toy", files=("toy.json",)), Fields(image="img_path"))
    >>> splits = TOY("/data/toy", on_error="skip")        # read(root, *, val_fraction, seed, ...)
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from xmr.data.images import is_image_file, verify_image
from xmr.data.records import DatasetSplits, ImageText, RetrievalSplit
from xmr.errors import ConfigError, DataError

OnError = Literal["raise", "skip"]
CheckImages = Literal["exists", "decode", "none"]
SPLITS = ("train", "val", "test")
_SHOW = 5  # how many offending paths/messages a report lists


class RecordError(DataError):
    """One annotation record is malformed (caught per record when on_error='skip')."""


@dataclass
class RawRecord:
    """One annotated image as read from the file: original id, full image path, its captions."""

    where: str  # e.g. "reid_raw.json record 17": used in messages
    pid: int
    image: str
    captions: list[str]
    split: str = "train"


def check_options(on_error: str, check_images: str, val_fraction: float = 0.1) -> None:
    """Validate the common keyword arguments of every reader."""
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if check_images not in ("exists", "decode", "none"):
        raise ConfigError(f"check_images must be 'exists', 'decode' or 'none', got {check_images!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction!r}")


# ---------------------------------------------------------------- locating and reading files


def listing(path: Path) -> str:
    """What a folder contains (first 20 names), for 'not found' messages."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    except OSError:
        return "(cannot be listed)"
    if not names:
        return "(empty)"
    return ", ".join(names[:20]) + (f", ... ({len(names)} entries)" if len(names) > 20 else "")


@dataclass(frozen=True)
class Layout:
    """Where a format keeps its annotation file: one of `files` (in order of preference) in the dataset
    folder or in one of its `subdirs` (so the dataset folder or its parent may be given).

    `fallback` formats (the generic "folder" format) are tried after all others when detecting a format.
    """

    name: str
    files: tuple[str, ...]
    subdirs: tuple[str, ...] = ()
    fallback: bool = False

    def candidates(self, root: Path) -> Iterator[tuple[Path, Path]]:
        """(dataset folder, annotation path) pairs to try, in order."""
        for base in [root, *(root / s for s in self.subdirs)]:
            for name in self.files:
                yield base, base / name

    def find(self, root: str | os.PathLike) -> Path | None:
        """The annotation file under `root`, or None (for detection: never raises)."""
        root = Path(root).expanduser()
        return next((ann for _, ann in self.candidates(root) if ann.is_file()), None)

    def locate(self, root: str | os.PathLike) -> tuple[Path, Path]:
        """Returns (dataset_root, annotation_path); raises DataError listing what root holds."""
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{self.name}: dataset root {root} does not exist or is not a directory")
        for base, ann in self.candidates(root):
            if ann.is_file():
                return base.resolve(), ann.resolve()
        wanted = " or ".join(self.files)
        where = ", ".join([str(root), *(str(root / s) for s in self.subdirs)])
        raise DataError(
            f"{self.name}: annotation file {wanted} not found in {where}; {root} contains: {listing(root)}"
        )


class Reader(Protocol):
    """What the format registry (xmr.registry.FORMATS) holds: a callable reader with its layout."""

    layout: Layout

    def __call__(
        self,
        root: str | os.PathLike,
        *,
        val_fraction: float = ...,
        seed: int = ...,
        on_error: OnError = ...,
        check_images: CheckImages = ...,
    ) -> DatasetSplits: ...


_F = TypeVar("_F", bound=Callable[..., DatasetSplits])


def reader(layout: Layout) -> Callable[[_F], _F]:
    """Decorator giving a hand-written read function its layout (JsonRecordsFormat has one already)."""

    def attach(fn: _F) -> _F:
        fn.layout = layout  # type: ignore[attr-defined]
        return fn

    return attach


def read_json(path: Path) -> Any:
    """Parse a JSON file; malformed JSON raises DataError naming the file, line and column."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def read_json_list(path: Path) -> list[Any]:
    """Read a JSON file whose top level must be a list of records."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: top level must be a JSON list of records, got {describe(data)}")
    return data


# ---------------------------------------------------------------- field validation


def describe(value: Any) -> str:
    """A short JSON-flavoured type name for messages."""
    names = {
        dict: "object",
        list: "list",
        str: "str",
        int: "int",
        float: "float",
        bool: "bool",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def require_object(rec: Any, where: str) -> dict:
    if not isinstance(rec, dict):
        raise RecordError(f"{where}: must be a JSON object, got {describe(rec)}")
    return rec


def _get(rec: dict, key: str, where: str) -> Any:
    if key not in rec:
        raise RecordError(
            f"{where}: missing key '{key}' (keys present: {', '.join(map(str, rec)) or 'none'})"
        )
    return rec[key]


def get_str(rec: dict, key: str, where: str) -> str:
    value = _get(rec, key, where)
    if not isinstance(value, str) or not value.strip():
        got = "an empty string" if isinstance(value, str) else describe(value)
        raise RecordError(f"{where}: key '{key}' must be a non-empty string, got {got}")
    return value


def get_int(rec: dict, key: str, where: str) -> int:
    value = _get(rec, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"{where}: key '{key}' must be an integer, got {describe(value)}")
    return value


def get_captions(rec: dict, key: str, where: str, *, allow_str: bool = False) -> list[str]:
    """A list of caption strings (or a single string when allow_str). Empty strings are dropped;
    a record left with no caption is an error."""
    value = _get(rec, key, where)
    if allow_str and isinstance(value, str):
        value = [value]
    expected = "a string or a list of strings" if allow_str else "a list of strings"
    if not isinstance(value, list):
        raise RecordError(f"{where}: key '{key}' must be {expected}, got {describe(value)}")
    bad = [describe(v) for v in value if not isinstance(v, str)]
    if bad:
        raise RecordError(f"{where}: key '{key}' must be {expected}, got a list containing {bad[0]}")
    captions = [c for c in value if c.strip()]
    if not captions:
        raise RecordError(f"{where}: key '{key}' has no non-empty caption")
    return captions


def get_split(rec: dict, key: str, where: str, allowed: Sequence[str] = SPLITS) -> str:
    value = _get(rec, key, where)
    if value not in allowed:
        raise RecordError(f"{where}: key '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    return value


def collect(
    items: Iterable[tuple[str, Any]], parse: Callable[[dict, str], RawRecord], on_error: OnError
) -> tuple[list[RawRecord], int, list[str]]:
    """Parse (where, raw) items; with on_error='skip' malformed ones are dropped and counted.
    Returns (records, skipped, notes)."""
    records: list[RawRecord] = []
    errors: list[str] = []
    for where, raw in items:
        try:
            records.append(parse(require_object(raw, where), where))
        except RecordError as e:
            if on_error == "raise":
                raise
            errors.append(str(e))
    notes = []
    if errors:
        notes.append(f"skipped {len(errors)} malformed records, e.g.: " + " | ".join(errors[:3]))
    return records, len(errors), notes


# ---------------------------------------------------------------- consistency and images


def check_consistency(records: list[RawRecord], on_error: OnError) -> tuple[list[RawRecord], int, list[str]]:
    """An image listed twice must keep one identity and one split; later conflicting records are errors."""
    seen: dict[str, RawRecord] = {}
    kept: list[RawRecord] = []
    errors: list[str] = []
    for r in records:
        first = seen.setdefault(r.image, r)
        if first is not r and (first.pid != r.pid or first.split != r.split):
            msg = (
                f"{r.where}: image {r.image} was already listed by {first.where} with "
                f"id {first.pid} / split {first.split}, here with id {r.pid} / split {r.split}"
            )
            if on_error == "raise":
                raise DataError(msg)
            errors.append(msg)
            continue
        kept.append(r)
    notes = (
        [f"skipped {len(errors)} records that contradict an earlier record, e.g.: {errors[0]}"]
        if errors
        else []
    )
    return kept, len(errors), notes


def _find_corrupt(paths: list[str]) -> list[tuple[str, str]]:
    def check(p: str) -> tuple[str, str] | None:
        try:
            verify_image(p)
        except DataError as e:
            return p, str(e)
        return None

    # PIL releases the GIL while decoding, so threads speed this up on large datasets.
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [r for r in pool.map(check, paths) if r is not None]


def check_image_files(
    records: list[RawRecord], mode: CheckImages, on_error: OnError, dataset: str, annotation: str
) -> tuple[list[RawRecord], int, list[str]]:
    """Check every distinct image once, up front; report all problems in one message (count + examples)."""
    if mode == "none":
        return records, 0, []
    paths = list(dict.fromkeys(r.image for r in records))
    missing = [p for p in paths if not is_image_file(p)]
    corrupt: list[tuple[str, str]] = []
    if mode == "decode":
        missing_set = set(missing)
        corrupt = _find_corrupt([p for p in paths if p not in missing_set])
    if not missing and not corrupt:
        return records, 0, []
    parts = []
    if missing:
        parts.append(
            f"{len(missing)} of {len(paths)} images listed in {annotation} are missing, first "
            f"{min(_SHOW, len(missing))}: " + ", ".join(missing[:_SHOW])
        )
    if corrupt:
        parts.append(
            f"{len(corrupt)} of {len(paths)} images cannot be decoded, first "
            f"{min(_SHOW, len(corrupt))}: " + "; ".join(m for _, m in corrupt[:_SHOW])
        )
    report = f"{dataset}: " + ". ".join(parts)
    if on_error == "raise":
        raise DataError(report + ". Check the image folder, or pass on_error='skip' to drop these records.")
    bad = set(missing) | {p for p, _ in corrupt}
    kept = [r for r in records if r.image not in bad]
    dropped = len(records) - len(kept)
    return kept, dropped, [f"dropped {dropped} records with unusable images: {report}"]


# ---------------------------------------------------------------- identity splits


def shuffled_ids(ids: Iterable[int], seed: int) -> list[int]:
    """Distinct ids sorted, then shuffled by a seeded RNG: deterministic given (ids, seed)."""
    order = sorted(set(ids))
    random.Random(seed).shuffle(order)
    return order


def holdout_count(n: int, fraction: float, keep: int = 1) -> int:
    """round(fraction * n), at least 1 when fraction > 0, leaving at least `keep` ids behind."""
    if fraction <= 0 or n <= keep:
        return 0
    return min(max(1, round(fraction * n)), n - keep)


# ---------------------------------------------------------------- building DatasetSplits


def _retrieval(records: list[RawRecord]) -> RetrievalSplit:
    index: dict[str, int] = {}
    split = RetrievalSplit([], [], [], [], [])
    for r in records:
        if r.image not in index:
            index[r.image] = len(split.image_paths)
            split.image_paths.append(r.image)
            split.image_pids.append(r.pid)
        for caption in r.captions:
            split.captions.append(caption)
            split.caption_pids.append(r.pid)
            split.caption_image_ids.append(index[r.image])
    return split


def _training(records: list[RawRecord]) -> tuple[list[ImageText], int]:
    # Relabel to 0..N-1 in ascending order of the original ids (the reference code asserts instead).
    relabel = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    image_ids: dict[str, int] = {}
    pairs = []
    for r in records:
        image_id = image_ids.setdefault(r.image, len(image_ids))
        pairs.extend(ImageText(relabel[r.pid], image_id, r.image, c) for c in r.captions)
    return pairs, len(relabel)


def build_splits(
    name: str, root: Path, records: list[RawRecord], *, skipped: int = 0, notes: list[str] | None = None
) -> DatasetSplits:
    """Group records by split: training pairs with relabelled pids, val/test as gallery + queries."""
    by_split: dict[str, list[RawRecord]] = {s: [] for s in SPLITS}
    for r in records:
        if isinstance(r.pid, bool) or not isinstance(r.pid, int):  # a custom parse must give every pid
            raise DataError(f"{r.where}: identity must be an integer, got {describe(r.pid)} ({name} reader)")
        by_split[r.split].append(r)
    for s in ("train", "test"):
        if not by_split[s]:
            raise DataError(
                f"{name} at {root}: no usable '{s}' records"
                + (f" ({skipped} records were skipped)" if skipped else "")
            )
    train, num_ids = _training(by_split["train"])
    val = _retrieval(by_split["val"]) if by_split["val"] else None
    return DatasetSplits(
        name=name,
        root=str(root),
        train=train,
        val=val,
        test=_retrieval(by_split["test"]),
        num_train_ids=num_ids,
        skipped=skipped,
        notes=list(notes or []),
    )


def finish(
    name: str,
    root: Path,
    annotation: Path,
    records: list[RawRecord],
    *,
    on_error: OnError,
    check_images: CheckImages,
    skipped: int = 0,
    notes: list[str] | None = None,
) -> DatasetSplits:
    """The common tail of every reader: consistency, image checks, then build_splits."""
    notes = list(notes or [])
    records, n, more = check_consistency(records, on_error)
    skipped += n
    notes += more
    records, n, more = check_image_files(records, check_images, on_error, name, annotation.name)
    skipped += n
    notes += more
    return build_splits(name, root, records, skipped=skipped, notes=notes)


# ---------------------------------------------------------------- the JSON-records reader


@dataclass(frozen=True)
class Fields:
    """Which keys of a record hold what (used by `parse_fields`, the default per-record parse).

    split=None: the file has no split field; every record starts as "train" and the format's
    `finalize` hook assigns the splits. captions_may_be_str: a single caption string is accepted.
    """

    pid: str = "id"
    image: str = "file_path"
    captions: str = "captions"
    split: str | None = "split"
    captions_may_be_str: bool = False


@dataclass(frozen=True)
class ReadContext:
    """What a per-record parse function and a `finalize` hook may use."""

    root: Path  # the dataset folder (resolved)
    annotation: Path  # the annotation file found
    images: Path  # image paths in records are relative to this folder
    fields: Fields  # the field mapping for this annotation file
    val_fraction: float
    seed: int


def parse_fields(rec: dict, where: str, ctx: ReadContext) -> RawRecord:
    """The default per-record parse: id, image, captions (and split) under the keys of `ctx.fields`."""
    f = ctx.fields
    return RawRecord(
        where=where,
        pid=get_int(rec, f.pid, where),
        image=str(ctx.images / get_str(rec, f.image, where)),
        captions=get_captions(rec, f.captions, where, allow_str=f.captions_may_be_str),
        split=get_split(rec, f.split, where) if f.split is not None else "train",
    )


ParseFn = Callable[[dict, str, ReadContext], RawRecord]
FinalizeFn = Callable[[list[RawRecord], ReadContext], list[str]]


@dataclass(frozen=True)
class JsonRecordsFormat:
    """A data set whose annotation file is one JSON list of records, one per annotated image.

    Reading: check the options, locate the file (`layout`), read the list, parse every record with
    `parse` (messages name file, record and key; on_error='skip' drops and counts bad records), run
    `finalize(records, ctx)` (may assign splits in place; returns notes put first), then `finish`.
    `fields` is one mapping for every annotation file, or one per file name (e.g. only one of a
    format's files carries a split). Calling the format reads it: it is the module's `read`.
    """

    layout: Layout
    fields: Fields | Mapping[str, Fields] = Fields()
    images: str = "imgs"  # the image folder, relative to the dataset folder
    parse: ParseFn = parse_fields
    finalize: FinalizeFn | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fields, Fields):
            missing = [f for f in self.layout.files if f not in self.fields]
            if missing:
                raise ValueError(f"{self.layout.name}: no Fields for annotation file(s) {', '.join(missing)}")

    def fields_for(self, annotation: Path) -> Fields:
        if isinstance(self.fields, Fields):
            return self.fields
        return self.fields[annotation.name]

    def __call__(
        self,
        root: str | os.PathLike,
        *,
        val_fraction: float = 0.1,
        seed: int = 0,
        on_error: OnError = "raise",
        check_images: CheckImages = "exists",
    ) -> DatasetSplits:
        """Read the data set from `root` (its folder or the parent of one of `layout.subdirs`)."""
        check_options(on_error, check_images, val_fraction)
        base, ann = self.layout.locate(root)
        ctx = ReadContext(base, ann, base / self.images, self.fields_for(ann), val_fraction, seed)
        items = read_json_list(ann)
        records, skipped, notes = collect(
            ((f"{ann.name} record {i}", r) for i, r in enumerate(items)),
            lambda rec, where: self.parse(rec, where, ctx),
            on_error,
        )
        if self.finalize is not None:
            notes = self.finalize(records, ctx) + notes
        return finish(
            self.layout.name,
            base,
            ann,
            records,
            on_error=on_error,
            check_images=check_images,
            skipped=skipped,
            notes=notes,
        )
