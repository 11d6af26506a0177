"""Tiny procedural birds and flowers with 10 captions per picture, written in the real layouts of
CUB-200-2011 + Reed's ``cvpr2016_cub`` and Oxford-102 + Reed's ``cvpr2016_flowers`` (see
``xmr.data.formats.cub`` / ``flowers102``), for tests and demos.

Every class is a distinct combination of visible attributes, drawn with PIL so that a model can learn them:
birds have a body colour, a wing colour, a short or long beak and a crest or none; flowers a petal colour,
a centre colour, 4/5/6/8 petals and round or pointed petals. Each picture varies pose, size, position,
facing and background; each of its 10 captions names a random subset (at least two) of the class's
attributes from varied templates, as real annotators do.

Written (CUB; Flowers alike with ``jpg/image_NNNNN.jpg``, numbers a seeded permutation as in the real set):
``CUB_200_2011/images/<NNN.Name>/<Name>_<kkkk>_<random>.jpg``, ``CUB_200_2011/{classes,images,
image_class_labels}.txt``; ``cvpr2016_cub/text_c10/<NNN.Name>/<stem>.txt``, ``cvpr2016_cub/
{allclasses,trainvalclasses,testclasses,trainclasses,valclasses}.txt`` and placeholder
``cvpr2016_cub/images/<NNN.Name>.t7`` files (the real archive's CNN features; readers must ignore them).
Test classes are a seeded choice, not a contiguous range, so readers must read the lists.

Deterministic: every class and picture draws from its own ``random.Random`` seeded by a string derived
from ``seed``: the same arguments give the same files. Trees a previous call wrote (marked with
``.xmr-synthetic``) are replaced; a tree without the marker is never touched (FileExistsError).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

MARKER = ".xmr-synthetic"
CAPTIONS_PER_IMAGE = 10
COLORS = {"red": (205, 40, 35), "blue": (40, 80, 210), "green": (40, 150, 60), "yellow": (240, 210, 40),
          "black": (30, 30, 34), "white": (242, 242, 238), "brown": (120, 75, 35), "orange": (245, 135, 25),
          "purple": (130, 55, 170), "pink": (245, 145, 195), "gray": (130, 130, 136)}
BIRD_COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange")
BEAKS, CRESTS = ("short", "long"), ("crest", "none")
PETAL_COLORS = ("red", "blue", "yellow", "white", "purple", "pink", "orange", "brown")
CENTRE_COLORS = ("yellow", "black", "green", "white")
PETAL_COUNTS, PETAL_SHAPES = (4, 5, 6, 8), ("round", "pointed")
NUMBER_WORDS = {4: "four", 5: "five", 6: "six", 8: "eight"}

BIRD_TEMPLATES = (
    "this bird has a {body} body and {wing} wings.",
    "a {body} bird with {wing} wings and a {beak} beak.",
    "the bird is mostly {body} with {wing} wing feathers.",
    "this small bird has a {beak} pointed beak, a {body} belly and {wing} wings.",
    "a bird with {wing} wings, a {body} breast and a {beak} bill.",
    "this {body} bird has {wing} secondaries and a {beak} beak.",
    "a {body} bird {crest_phrase}.",
    "this bird has {wing} wings {crest_phrase} and a {beak} bill.",
    "the {body} bird has a {beak} beak.",
    "a bird with a {body} crown, {wing} wingbars and a {beak} beak.",
)
FLOWER_TEMPLATES = (
    "this flower has {count} {color} petals with a {centre} center.",
    "a flower with {shape} {color} petals and a {centre} pistil.",
    "the petals are {color} and {shape}, surrounding a {centre} center.",
    "this flower is {color} in color, with {count} {shape} petals.",
    "a {color} flower with {count} petals.",
    "this flower has {shape} petals that are {color} and a {centre} stigma.",
    "the flower has {count} {color} petals.",
    "a {centre} center is surrounded by {shape} {color} petals.",
    "this flower has petals that are {color} with {shape} tips.",
    "a flower with {count} {shape} petals and a {centre} middle.",
)


# ---------------------------------------------------------------- shared helpers


def _prepare(root: Path, trees: list[str]) -> None:
    for name in trees:
        tree = root / name
        if not tree.exists():
            continue
        if not (tree / MARKER).exists():
            raise FileExistsError(f"{tree} exists and was not written by xmr.data.synthetic_reed; not replacing it")
        shutil.rmtree(tree)
    for name in trees:
        (root / name).mkdir(parents=True)
        (root / name / MARKER).write_text("written by xmr.data.synthetic_reed\n")


def _check_args(num_classes: int, images_per_class: int, num_test: int, combos: int, image_size: int) -> None:
    if not 2 <= num_classes <= combos:
        raise ValueError(f"num_classes must be in 2..{combos}, got {num_classes}")
    if images_per_class < 1 or image_size < 16:
        raise ValueError("images_per_class must be >= 1 and image_size >= 16")
    if not 1 <= num_test < num_classes:
        raise ValueError(f"num_test_classes must be in 1..{num_classes - 1}, got {num_test}")


def _split_classes(names: list[str], num_test: int, seed: int) -> dict[str, list[str]]:
    """Reed-style lists: test a seeded choice; val a third of the rest (Reed: 50 of 150), train the others."""
    order = list(names)
    random.Random(f"{seed}:split").shuffle(order)
    test, trainval = sorted(order[:num_test]), sorted(order[num_test:])
    n_val = len(trainval) // 3
    return {"allclasses": sorted(names), "trainvalclasses": trainval, "testclasses": test,
            "valclasses": sorted(trainval[:n_val]), "trainclasses": sorted(trainval[n_val:])}


def _write_lists(captions: Path, lists: dict[str, list[str]]) -> None:
    for name, classes in lists.items():
        (captions / f"{name}.txt").write_text("".join(f"{c}\n" for c in classes))
    (captions / "images").mkdir()
    for c in lists["allclasses"]:  # stand-ins for Reed's CNN features: not pictures
        (captions / "images" / f"{c}.t7").write_bytes(b"xmr synthetic placeholder: not a torch7 file\n")


def _jitter(color: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)  # type: ignore[return-value]


def _captions(templates: tuple[str, ...], words: dict[str, str], rng: random.Random) -> list[str]:
    chosen = rng.sample(templates, CAPTIONS_PER_IMAGE) if len(templates) >= CAPTIONS_PER_IMAGE else [
        rng.choice(templates) for _ in range(CAPTIONS_PER_IMAGE)]
    return [t.format(**words) for t in chosen]


def _background(size: int, rng: random.Random, palette: list[tuple[int, int, int]]) -> Image.Image:
    top, bottom = _jitter(rng.choice(palette), rng, 25), _jitter(rng.choice(palette), rng, 25)
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / max(1, size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    return img


# ---------------------------------------------------------------- birds


def _draw_bird(attrs: tuple[str, str, str, str], size: int, rng: random.Random) -> Image.Image:
    body_c, wing_c, beak, crest = attrs
    img = _background(size, rng, [(150, 195, 235), (120, 170, 110), (200, 210, 220), (90, 140, 90)])
    d = ImageDraw.Draw(img)
    s = size * rng.uniform(0.8, 1.0)
    cx, cy = size * rng.uniform(0.42, 0.58), size * rng.uniform(0.45, 0.6)
    d.line([(0, cy + 0.2 * s), (size, cy + 0.24 * s)], fill=(95, 60, 30), width=max(2, size // 20))  # branch
    body, wing = _jitter(COLORS[body_c], rng), _jitter(COLORS[wing_c], rng)
    face = 1 if rng.random() < 0.5 else -1  # facing right or left

    def x(v: float) -> float:
        return cx + face * v * s

    d.polygon([(x(-0.22), cy), (x(-0.42), cy - 0.08 * s), (x(-0.42), cy + 0.1 * s)], fill=wing)  # tail
    d.ellipse([cx - 0.24 * s, cy - 0.14 * s, cx + 0.24 * s, cy + 0.14 * s], fill=body)
    hx, hy, hr = x(0.22), cy - 0.14 * s, 0.1 * s
    if crest == "crest":
        d.polygon([(hx - 0.05 * s, hy - 0.06 * s), (x(0.18), hy - 0.24 * s), (hx + 0.05 * s, hy - 0.07 * s)],
                  fill=wing)
    d.ellipse([hx - hr, hy - hr, hx + hr, hy + hr], fill=body)
    length = 0.09 if beak == "short" else 0.22
    d.polygon([(x(0.3), hy - 0.03 * s), (x(0.3 + length), hy + 0.01 * s), (x(0.3), hy + 0.04 * s)],
              fill=(235, 150, 40))
    er = max(1.0, 0.022 * s)
    d.ellipse([x(0.25) - er, hy - 0.03 * s - er, x(0.25) + er, hy - 0.03 * s + er], fill=(10, 10, 10))
    d.chord([cx - 0.2 * s, cy - 0.16 * s, cx + 0.14 * s, cy + 0.1 * s], 200 if face > 0 else -20,
            340 if face > 0 else 160, fill=wing)  # wing
    return img


def _bird_name(attrs: tuple[str, str, str, str]) -> str:
    body, wing, beak, crest = attrs
    return f"{body.title()}_{wing.title()}_Winged_{beak.title()}_Billed" + ("_Crested" if crest == "crest" else "")


def generate_cub_tree(root: str | os.PathLike, *, num_classes: int = 8, images_per_class: int = 4,
                      num_test_classes: int | None = None, image_size: int = 64, seed: int = 0) -> Path:
    """Write ``CUB_200_2011/`` and ``cvpr2016_cub/`` under `root` (see the module docstring); returns root.

    num_test_classes: default a quarter of the classes (CUB: 50 of 200), at least 1.
    """
    combos = list(itertools.product(BIRD_COLORS, BIRD_COLORS, BEAKS, CRESTS))
    num_test = max(1, round(num_classes / 4)) if num_test_classes is None else num_test_classes
    _check_args(num_classes, images_per_class, num_test, len(combos), image_size)
    root = Path(root).expanduser()
    _prepare(root, ["CUB_200_2011", "cvpr2016_cub"])
    cub, captions = root / "CUB_200_2011", root / "cvpr2016_cub"
    picked = random.Random(f"{seed}:classes").sample(combos, num_classes)
    names = [f"{i + 1:03d}.{_bird_name(a)}" for i, a in enumerate(picked)]
    classes_txt, images_txt, labels_txt = [], [], []
    for i, (name, attrs) in enumerate(zip(names, picked)):
        (cub / "images" / name).mkdir(parents=True)
        (captions / "text_c10" / name).mkdir(parents=True)
        classes_txt.append(f"{i + 1} {name}\n")
        body, wing, beak, crest = attrs
        words = {"body": body, "wing": wing, "beak": beak,
                 "crest_phrase": "with a crest on its head" if crest == "crest" else "with a smooth round head"}
        for k in range(images_per_class):
            rng = random.Random(f"{seed}:cub:{name}:{k}")
            stem = f"{_bird_name(attrs)}_{k + 1:04d}_{rng.randint(100000, 999999)}"
            _draw_bird(attrs, image_size, rng).save(cub / "images" / name / f"{stem}.jpg", quality=90)
            (captions / "text_c10" / name / f"{stem}.txt").write_text(
                "".join(f"{c}\n" for c in _captions(BIRD_TEMPLATES, words, rng)))
            images_txt.append(f"{len(images_txt) + 1} {name}/{stem}.jpg\n")
            labels_txt.append(f"{len(labels_txt) + 1} {i + 1}\n")
    (cub / "classes.txt").write_text("".join(classes_txt))
    (cub / "images.txt").write_text("".join(images_txt))
    (cub / "image_class_labels.txt").write_text("".join(labels_txt))
    _write_lists(captions, _split_classes(names, num_test, seed))
    return root


# ---------------------------------------------------------------- flowers


def _draw_flower(attrs: tuple[str, str, int, str], size: int, rng: random.Random) -> Image.Image:
    petal_c, centre_c, count, shape = attrs
    img = _background(size, rng, [(60, 120, 50), (90, 140, 60), (40, 90, 45), (120, 150, 90)])
    d = ImageDraw.Draw(img)
    for _ in range(3):  # leaves
        lx, ly, lr = rng.uniform(0, size), rng.uniform(0, size), size * rng.uniform(0.08, 0.16)
        d.ellipse([lx - lr, ly - lr / 2, lx + lr, ly + lr / 2], fill=_jitter((50, 110, 40), rng, 20))
    s = size * rng.uniform(0.75, 1.0)
    cx, cy = size * rng.uniform(0.4, 0.6), size * rng.uniform(0.4, 0.6)
    petal, rot = _jitter(COLORS[petal_c], rng), rng.uniform(0, 2 * math.pi)
    length, width = 0.36 * s, (0.17 if shape == "round" else 0.08) * s
    for p in range(count):
        a = rot + 2 * math.pi * p / count
        ux, uy, vx, vy = math.cos(a), math.sin(a), -math.sin(a), math.cos(a)
        if shape == "round":  # an ellipse from the centre outwards, as a polygon
            angles = [2 * math.pi * i / 16 for i in range(16)]
            pts = [(length * (1 + math.cos(b)) / 2, width * math.sin(b)) for b in angles]
        else:  # a pointed lens
            pts = [(0.0, 0.0), (0.5 * length, width), (length, 0.0), (0.5 * length, -width)]
        d.polygon([(cx + u * ux + w * vx, cy + u * uy + w * vy) for u, w in pts], fill=_jitter(petal, rng, 10))
    r = 0.1 * s
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(COLORS[centre_c], rng))
    return img


def generate_flowers_tree(root: str | os.PathLike, *, num_classes: int = 8, images_per_class: int = 4,
                          num_test_classes: int | None = None, image_size: int = 64, seed: int = 0) -> Path:
    """Write ``jpg/`` and ``cvpr2016_flowers/`` under `root` (see the module docstring); returns root.

    num_test_classes: default about a fifth of the classes (Flowers: 20 of 102), at least 1.
    """
    combos = list(itertools.product(PETAL_COLORS, CENTRE_COLORS, PETAL_COUNTS, PETAL_SHAPES))
    num_test = max(1, round(num_classes * 20 / 102)) if num_test_classes is None else num_test_classes
    _check_args(num_classes, images_per_class, num_test, len(combos), image_size)
    root = Path(root).expanduser()
    _prepare(root, ["jpg", "cvpr2016_flowers"])
    captions = root / "cvpr2016_flowers"
    picked = random.Random(f"{seed}:classes").sample(combos, num_classes)
    names = [f"class_{i + 1:05d}" for i in range(num_classes)]
    numbers = list(range(1, num_classes * images_per_class + 1))
    random.Random(f"{seed}:numbers").shuffle(numbers)  # picture numbers do not follow the classes
    for i, (name, attrs) in enumerate(zip(names, picked)):
        (captions / "text_c10" / name).mkdir(parents=True)
        color, centre, count, shape = attrs
        words = {"color": color, "centre": centre, "count": NUMBER_WORDS[count], "shape": shape}
        for k in range(images_per_class):
            stem = f"image_{numbers[i * images_per_class + k]:05d}"
            rng = random.Random(f"{seed}:flowers:{name}:{k}")
            _draw_flower(attrs, image_size, rng).save(root / "jpg" / f"{stem}.jpg", quality=90)
            (captions / "text_c10" / name / f"{stem}.txt").write_text(
                "".join(f"{c}\n" for c in _captions(FLOWER_TEMPLATES, words, rng)))
    _write_lists(captions, _split_classes(names, num_test, seed))
    return root


__all__ = ["generate_cub_tree", "generate_flowers_tree"]
