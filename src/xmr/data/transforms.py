"""Image pipeline without torchvision: resize, horizontal flip, pad + random crop, normalise, random erasing.

Each transform is a callable ``PIL.Image -> FloatTensor (3, H, W)``. Randomness comes only from torch:
a ``torch.Generator`` given to the transform (at construction or per call) or, by default, torch's
global RNG. DataLoader workers have their global RNG seeded by torch from the loader's generator, so
the engine's seeding makes augmentations reproducible. Do not give a constructor generator to a
transform used with several workers: each worker would get a copy in the same state and repeat the
others' augmentations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Size = int | Sequence[int]


def _size(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) != h or int(w) != w or h <= 0 or w <= 0:
        raise ValueError(f"size must be positive integers (H, W), got {size!r}")
    return int(h), int(w)


def _range(name: str, value: Sequence[float], low: float = 0.0) -> tuple[float, float]:
    a, b = (float(v) for v in value)
    if not low <= a <= b:
        raise ValueError(f"{name} must be (min, max) with {low} <= min <= max, got {value!r}")
    return a, b


def resize(img: Image.Image, size: tuple[int, int], interpolation: int = Image.BICUBIC) -> Image.Image:
    """Resize to exactly (H, W) (aspect ratio not kept), RGB."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    h, w = size
    return img if img.size == (w, h) else img.resize((w, h), resample=interpolation)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 tensor (3, H, W) in [0, 1]."""
    array = np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)  # copy: writable
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


def _uniform(a: float, b: float, g: torch.Generator | None) -> float:
    return float(torch.empty(1).uniform_(a, b, generator=g).item())


def _randint(high: int, g: torch.Generator | None) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(0, high, (1,), generator=g).item())


def erase_box(
    height: int,
    width: int,
    area: tuple[float, float],
    ratio: tuple[float, float],
    g: torch.Generator | None,
    attempts: int = 10,
) -> tuple[int, int, int, int] | None:
    """torchvision RandomErasing's box sampler: (top, left, h, w), or None after `attempts` misses.

    Area fraction ~ U(area), aspect ratio h/w log-uniform in `ratio`; the box must fit strictly.
    """
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = height * width * _uniform(area[0], area[1], g)
        aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], g))
        h = round(math.sqrt(target * aspect))
        w = round(math.sqrt(target / aspect))
        if not (h < height and w < width):
            continue
        return _randint(height - h + 1, g), _randint(width - w + 1, g), h, w
    return None


class TestTransform:
    """Evaluation pipeline: resize to (H, W) (bicubic), to [0, 1] tensor, normalise."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self,
        size: Size = (384, 128),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        interpolation: int = Image.BICUBIC,
    ) -> None:
        self.size = _size(size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return normalize(to_tensor(resize(img, self.size, self.interpolation)), self.mean, self.std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, mean={self.mean}, std={self.std})"


class TrainTransform:
    """Training pipeline of IRRA: resize, horizontal flip (p=flip_p), zero-pad `pad` px, random crop back
    to (H, W), normalise, random erasing.

    Random erasing follows torchvision's RandomErasing: with probability erase_p, up to 10 attempts to
    draw a box with area fraction in `erase_area` and log-uniform aspect ratio in `erase_ratio`, filled
    with `erase_fill`. The default fill 0.0 is the normalised value of the mean pixel ("filled with the
    mean"). The reference code passes the raw CLIP mean *after* normalisation
    (``RandomErasing(value=mean)``); ``erase_fill=CLIP_MEAN`` reproduces that exactly.
    Padding is black (0 before normalisation), like torchvision's Pad default.
    """

    def __init__(
        self,
        size: Size = (384, 128),
        flip_p: float = 0.5,
        pad: int = 10,
        erase_p: float = 0.5,
        erase_area: Sequence[float] = (0.02, 0.4),
        erase_ratio: Sequence[float] = (0.3, 3.3),
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        erase_fill: float | Sequence[float] = 0.0,
        interpolation: int = Image.BICUBIC,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _size(size)
        for name, p in (("flip_p", flip_p), ("erase_p", erase_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad!r}")
        self.flip_p, self.pad, self.erase_p = float(flip_p), int(pad), float(erase_p)
        self.erase_area = _range("erase_area", erase_area)
        self.erase_ratio = _range("erase_ratio", erase_ratio, low=1e-6)
        self.mean, self.std = tuple(mean), tuple(std)
        self.erase_fill = erase_fill if isinstance(erase_fill, (int, float)) else tuple(erase_fill)
        self.interpolation = interpolation
        self.generator = generator

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        g = generator if generator is not None else self.generator
        x = to_tensor(resize(img, self.size, self.interpolation))
        if self.flip_p > 0 and torch.rand(1, generator=g).item() < self.flip_p:
            x = x.flip(-1)
        if self.pad > 0:
            x = self._pad_crop(x, g)
        x = normalize(x, self.mean, self.std)
        if self.erase_p > 0 and torch.rand(1, generator=g).item() < self.erase_p:
            x = self._erase(x, g)
        return x

    def _pad_crop(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        p, (h, w) = self.pad, self.size
        x = F.pad(x, (p, p, p, p), value=0.0)
        top, left = _randint(2 * p + 1, g), _randint(2 * p + 1, g)  # same order as torchvision RandomCrop
        return x[:, top : top + h, left : left + w]

    def _erase(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        box = erase_box(x.shape[1], x.shape[2], self.erase_area, self.erase_ratio, g)
        if box is None:
            return x
        top, left, h, w = box
        fill = torch.as_tensor(self.erase_fill, dtype=x.dtype).reshape(-1, 1, 1)
        x = x.clone()
        x[:, top : top + h, left : left + w] = fill
        return x

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, flip_p={self.flip_p}, pad={self.pad}, "
            f"erase_p={self.erase_p}, erase_area={self.erase_area}, erase_ratio={self.erase_ratio}, "
            f"erase_fill={self.erase_fill}, mean={self.mean}, std={self.std})"
        )


_TRAIN_ONLY = ("flip_p", "pad", "erase_p", "erase_area", "erase_ratio", "erase_fill", "generator")


def build_transform(train: bool, size: Size = (384, 128), **kwargs) -> TrainTransform | TestTransform:
    """TrainTransform(size, **kwargs) when `train`, else TestTransform(size, ...).

    Training-only keywords (flip_p, pad, erase_*) are ignored for the test transform, so one config
    can build both; unknown keywords raise TypeError.
    """
    if train:
        return TrainTransform(size, **kwargs)
    return TestTransform(size, **{k: v for k, v in kwargs.items() if k not in _TRAIN_ONLY})
