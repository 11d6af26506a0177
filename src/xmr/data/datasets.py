"""torch Datasets over plain records, and a seeded DataLoader builder.

Items are dicts of tensors so that the default collate stacks them:
ImageTextDataset -> {"images", "ids", "pids", "image_ids"} + the method's own fields (its item_fn),
ImageDataset -> {"images", "index"}, TextDataset -> {"ids", "index"}.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from xmr.data.images import load_image
from xmr.data.records import ImageText
from xmr.errors import ConfigError, DataError

Transform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], torch.Tensor]
ItemFn = Callable[[ImageText, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
NO_LABEL = -1  # "pids" of records without an identity or class


def _tokens(tokenize: Tokenize, caption: str) -> torch.Tensor:
    """Token ids of one caption as a 1-D long tensor (tokenizers return (1, L) for one caption)."""
    ids = torch.as_tensor(tokenize([caption]))
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"tokenize([caption]) must return shape (1, L) or (L,), got {tuple(ids.shape)}")
    return ids.long()


def _image(path: str, transform: Transform, what: str) -> torch.Tensor:
    try:
        img = load_image(path)
    except DataError as e:
        raise DataError(f"{what}: {e}") from None
    return transform(img)


class ImageTextDataset(Dataset):
    """Training pairs: one item per (image, caption) record.

    `tokenize` maps a list of captions to (N, L) token ids. `item_fn(record, item)`, when given, returns
    the method's extra fields for the item (e.g. IRRA's masked caption), computed after the base fields
    (so any random draws come after the image augmentation's). Records without an identity get pid -1.
    """

    def __init__(
        self,
        records: Sequence[ImageText],
        transform: Transform,
        tokenize: Tokenize,
        *,
        item_fn: ItemFn | None = None,
    ) -> None:
        self.records = list(records)
        self.transform, self.tokenize, self.item_fn = transform, tokenize, item_fn

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rec = self.records[index]
        ids = _tokens(self.tokenize, rec.caption)
        item = {
            "images": _image(rec.image_path, self.transform, f"training record {index}"),
            "ids": ids,
            "pids": torch.tensor(NO_LABEL if rec.pid is None else rec.pid, dtype=torch.long),
            "image_ids": torch.tensor(rec.image_id, dtype=torch.long),
        }
        if self.item_fn is not None:
            item.update(self.item_fn(rec, item))
        return item

    @property
    def pids(self) -> list[int | None]:
        """Identity of every item (for IdentitySampler)."""
        return [r.pid for r in self.records]


class ImageDataset(Dataset):
    """Gallery images for evaluation: {"images", "index"}."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Transform) -> None:
        self.paths = [str(p) for p in paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        images = _image(self.paths[index], self.transform, f"gallery image {index}")
        return {"images": images, "index": torch.tensor(index, dtype=torch.long)}


class TextDataset(Dataset):
    """Query captions for evaluation: {"ids", "index"}."""

    def __init__(self, captions: Sequence[str], tokenize: Tokenize) -> None:
        self.captions = list(captions)
        self.tokenize = tokenize

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "ids": _tokens(self.tokenize, self.captions[index]),
            "index": torch.tensor(index, dtype=torch.long),
        }


class QueryDataset(Dataset):
    """Evaluation queries of any kind: {"ids"} (text), {"images"} (image) or both (composed), + "index"."""

    def __init__(self, texts: Sequence[str] | None, image_paths: Sequence[str | os.PathLike] | None,
                 tokenize: Tokenize, transform: Transform | None) -> None:
        if texts is None and image_paths is None:
            raise ValueError("queries need texts, images or both")
        if texts is not None and image_paths is not None and len(texts) != len(image_paths):
            raise ValueError(f"{len(texts)} query texts for {len(image_paths)} query images")
        self.texts = None if texts is None else list(texts)
        self.paths = None if image_paths is None else [str(p) for p in image_paths]
        self.tokenize, self.transform = tokenize, transform

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"index": torch.tensor(index, dtype=torch.long)}
        if self.texts is not None:
            item["ids"] = _tokens(self.tokenize, self.texts[index])
        if self.paths is not None:
            item["images"] = _image(self.paths[index], self.transform, f"query image {index}")
        return item


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's RNGs in a worker from the seed torch gave it (torch's own is set)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    num_workers: int = 0,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    seed: int | None = None,
    persistent_workers: bool = False,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader; with `seed` its torch.Generator is seeded, so the shuffle order and the workers'
    RNG seeds (hence augmentations) are reproducible, epoch after epoch.

    `sampler` (e.g. IdentitySampler or torch's DistributedSampler) excludes `shuffle`.
    pin_memory defaults to True only when CUDA is available.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    if sampler is not None and shuffle:
        raise ConfigError(
            "build_loader: pass either shuffle=True or a sampler (the sampler does the shuffling)"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        worker_init_fn=seed_worker if num_workers > 0 else None,
        persistent_workers=persistent_workers and num_workers > 0,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
    )
