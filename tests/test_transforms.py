"""Image transforms: exact values against a manual PIL + NumPy pipeline, seeded determinism, bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xmr.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    TestTransform,
    TrainTransform,
    build_transform,
    erase_box,
    normalize,
    to_tensor,
)

SIZE = (24, 8)


def random_image(w: int = 30, h: int = 50, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def manual(img: Image.Image, size=SIZE) -> np.ndarray:
    arr = np.asarray(img.resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32) / 255.0
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return arr.transpose(2, 0, 1)


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_test_transform_matches_manual() -> None:
    img = random_image()
    out = TestTransform(SIZE)(img)
    assert out.shape == (3, 24, 8) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), manual(img), rtol=1e-5, atol=1e-5)


def test_test_transform_converts_mode() -> None:
    grey = random_image().convert("L")
    np.testing.assert_allclose(TestTransform(SIZE)(grey).numpy(), manual(grey.convert("RGB")), atol=1e-5)


def test_train_without_augmentation_equals_test() -> None:
    img = random_image(seed=1)
    train = TrainTransform(SIZE, flip_p=0.0, pad=0, erase_p=0.0)
    assert torch.equal(train(img), TestTransform(SIZE)(img))


def test_flip_and_crop_exact() -> None:
    img = random_image(seed=2)
    base = torch.from_numpy(manual(img))
    assert torch.allclose(TrainTransform(SIZE, flip_p=1.0, pad=0, erase_p=0.0)(img), base.flip(-1), atol=1e-6)
    # pad 3 then crop: the output is a window of the zero-padded (black) image
    out = TrainTransform(SIZE, flip_p=0.0, pad=3, erase_p=0.0)(img, generator=gen(5))
    padded = torch.nn.functional.pad(to_tensor(img.resize((8, 24), Image.BICUBIC)), (3, 3, 3, 3))
    padded = normalize(padded, CLIP_MEAN, CLIP_STD)
    windows = [
        (t, c)
        for t in range(7)
        for c in range(7)
        if torch.allclose(out, padded[:, t : t + 24, c : c + 8], atol=1e-6)
    ]
    g = gen(5)
    expected = (int(torch.randint(0, 7, (1,), generator=g)), int(torch.randint(0, 7, (1,), generator=g)))
    assert expected in windows


def test_seeded_generator_is_deterministic() -> None:
    img = random_image(seed=3)
    t = TrainTransform(SIZE)
    a = [t(img, generator=gen(11)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    outs = {tuple(t(img, generator=gen(s)).flatten()[:50].tolist()) for s in range(8)}
    assert len(outs) > 1
    # the global RNG is used by default: torch.manual_seed makes it reproducible
    torch.manual_seed(4)
    x = t(img)
    torch.manual_seed(4)
    assert torch.equal(t(img), x)
    # a constructor generator is used when none is passed per call
    assert torch.equal(TrainTransform(SIZE, generator=gen(11))(img), a[0])


def test_erasing_area_within_bounds() -> None:
    img = Image.new("RGB", (64, 128), (255, 255, 255))  # white: normalised values > 0 everywhere
    t = TrainTransform((128, 64), flip_p=0.0, pad=0, erase_p=1.0, erase_area=(0.1, 0.3))
    for seed in range(20):
        out = t(img, generator=gen(seed))
        erased = (out == 0).all(dim=0)
        frac = erased.float().mean().item()
        if frac == 0:  # all 10 attempts missed (possible but rare)
            continue
        assert 0.08 <= frac <= 0.32
        rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert erased.sum() == h * w  # one rectangle


def test_erase_box_bounds() -> None:
    g = gen(0)
    for _ in range(200):
        box = erase_box(384, 128, (0.02, 0.4), (0.3, 3.3), g)
        if box is None:
            continue
        top, left, h, w = box
        assert 0 <= top and top + h <= 384 and 0 <= left and left + w <= 128
        assert 0.02 * 0.9 <= h * w / (384 * 128) <= 0.4 * 1.1


def test_erase_fill_reference_value() -> None:
    img = Image.new("RGB", (8, 24), (0, 0, 0))
    out = TrainTransform(SIZE, flip_p=0.0, pad=0, erase_p=1.0, erase_fill=CLIP_MEAN)(img, generator=gen(1))
    for c in range(3):
        assert torch.isclose(out[c], torch.tensor(CLIP_MEAN[c])).any()


def test_repr_and_build() -> None:
    t = build_transform(True, (384, 128), flip_p=0.3)
    assert isinstance(t, TrainTransform) and "flip_p=0.3" in repr(t) and "pad=10" in repr(t)
    assert "erase_area=(0.02, 0.4)" in repr(t)
    e = build_transform(False, (384, 128), flip_p=0.3)
    assert isinstance(e, TestTransform) and repr(e).startswith("TestTransform(size=(384, 128)")
    with pytest.raises(TypeError):
        build_transform(True, (384, 128), flip=0.3)
    with pytest.raises(ValueError, match="flip_p"):
        TrainTransform(flip_p=2.0)
    with pytest.raises(ValueError, match="size"):
        TestTransform((0, 4))
