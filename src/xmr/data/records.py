"""Plain records produced by the dataset readers; no tensors, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageText:
    """One training pair: a caption of an image of identity `pid` (relabelled to 0..N-1 for training).

    `pid` is None where the data has no identities or classes (image-text data sets, unlabelled images).
    """

    pid: int | None
    image_id: int
    image_path: str
    caption: str


@dataclass(frozen=True)
class ComposedTriplet:
    """One composed query: a reference image and a modifying text, with its target image(s).

    targets: paths of the correct gallery images (one for FashionIQ and CIRR, several for CIRCO; empty
    for a test split whose answers are hidden). candidates: CIRR's subset of gallery paths for
    Recall_subset (None elsewhere). category: FashionIQ's garment category (None elsewhere).
    """

    query_id: str
    reference_path: str
    modifier: str
    targets: tuple[str, ...] = ()
    candidates: tuple[str, ...] | None = None
    category: str | None = None


@dataclass
class RetrievalSplit:
    """An evaluation split: every caption is a query, every image is in the gallery; match by pid."""

    image_paths: list[str]
    image_pids: list[int]
    captions: list[str]
    caption_pids: list[int]
    caption_image_ids: list[int] = field(default_factory=list)  # index into image_paths of the captioned image

    def __post_init__(self) -> None:
        if len(self.image_paths) != len(self.image_pids):
            raise ValueError("image_paths and image_pids differ in length")
        if len(self.captions) != len(self.caption_pids):
            raise ValueError("captions and caption_pids differ in length")


@dataclass
class DatasetSplits:
    """What a reader returns: training pairs, a validation split (may be None) and a test split."""

    name: str
    root: str
    train: list[ImageText]
    val: RetrievalSplit | None
    test: RetrievalSplit
    num_train_ids: int
    skipped: int = 0  # records skipped because of bad input (only when the reader was asked to skip)
    notes: list[str] = field(default_factory=list)
    task: str = "person"  # the task kind its evaluation splits are scored under (xmr.evaluation.tasks)
    # that task's options the data asks for (CUB/Flowers: {"class_level_at": 50}, Reed's class protocol)
    task_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalSplit:
    """A method-neutral evaluation split: queries, a gallery, and each query's positives.

    Queries are texts, images (paths), or both (composed: `query_images[i]` modified by `query_texts[i]`).
    positives[i] lists gallery indices that are correct for query i. Optional, per query:
    exclude[i] (a gallery index removed from query i's ranking, e.g. CIRR's reference image, or -1),
    groups[i] (gallery indices forming query i's candidate subset, for Recall_subset), categories[i]
    (results are also reported per category and averaged, as FashionIQ does).
    """

    gallery_paths: list[str]
    positives: list[list[int]]
    query_texts: list[str] | None = None
    query_images: list[str] | None = None
    query_ids: list[str] | None = None
    exclude: list[int] | None = None
    groups: list[list[int]] | None = None
    categories: list[str] | None = None
    gallery_labels: list[int] | None = None
    query_labels: list[int] | None = None

    def __post_init__(self) -> None:
        n = len(self.positives)
        for name in ("query_texts", "query_images", "query_ids", "exclude", "groups", "categories",
                     "query_labels"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries for {n} queries")
        if self.query_texts is None and self.query_images is None:
            raise ValueError("an evaluation split needs query texts, query images or both")
        if self.gallery_labels is not None and len(self.gallery_labels) != len(self.gallery_paths):
            raise ValueError("gallery_labels and gallery_paths differ in length")

    def __len__(self) -> int:
        return len(self.positives)

    @property
    def query_kind(self) -> str:
        if self.query_texts is not None and self.query_images is not None:
            return "composed"
        return "text" if self.query_texts is not None else "image"
