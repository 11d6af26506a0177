"""Plain records produced by the dataset readers; no tensors, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImageText:
    """One training pair: a caption of an image of identity `pid` (relabelled to 0..N-1 for training)."""

    pid: int
    image_id: int
    image_path: str
    caption: str


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
