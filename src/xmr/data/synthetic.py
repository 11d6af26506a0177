"""Procedural pedestrian images with partial captions, written in the real CUHK-PEDES layout.

``num_ids`` identities, each a unique combination of visible attributes (slim "female" / broad "male" body,
hair colour and length, upper garment type / colour / pattern, lower garment type and colour (none under a
dress), shoe colour, bag type and colour, cap and its colour, glasses), come in families whose members each
differ from an earlier one in exactly ONE attribute, so retrieval must attend to all of them. Each identity
gets ``images_per_id`` PIL-drawn images (front / back / side view, jittered pose and scale, varied
backgrounds and lighting, sometimes blur or noise), each image ``captions_per_image`` captions from varied
templates naming a random 60-100% of the attributes (sometimes the view) in random order.

Layout: ``<root>/CUHK-PEDES/imgs/synth/<split>/p<id:05d>_<k:02d>.jpg``; ``reid_raw.json`` (a list of
{"split", "captions", "file_path", "processed_tokens", "id"}, ids 1-based, splits = contiguous id ranges);
``synthetic_attributes.json`` (ground truth per id); ``demo_manifest.json`` (parameters, digests; last).
Deterministic: every identity and image draws from its own ``random.Random`` seeded by a string derived from
``seed``, so the same seed and parameters give a byte-identical ``reid_raw.json`` and identical images.
Chance Rank-1 on the test split is about (#images of the query's id) / (#gallery images) = 1 / test ids.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

VERSION = 1
COLORS = {"red": (200, 35, 35), "blue": (35, 75, 205), "green": (35, 145, 60), "yellow": (240, 210, 40),
          "black": (28, 28, 32), "white": (240, 240, 236), "gray": (128, 128, 134), "pink": (245, 140, 190),
          "purple": (125, 50, 165), "orange": (245, 130, 25), "brown": (115, 70, 35)}
HAIR_COLORS = {"black": (22, 20, 20), "brown": (100, 60, 30), "blonde": (232, 198, 108),
               "gray": (168, 168, 168), "red": (170, 55, 22)}
SKIN = [(242, 208, 182), (226, 182, 146), (196, 146, 106), (150, 102, 72), (108, 72, 52)]
HAIR_LENGTHS, PATTERNS, HATS = ("short", "long", "ponytail"), ("plain", "striped"), ("none", "cap")
UPPER_TYPES = ("t-shirt", "jacket", "coat", "hoodie", "shirt", "dress")
LOWER_TYPES = ("trousers", "shorts", "skirt", "jeans")
SHOE_COLORS = ("black", "white", "brown", "gray", "red", "blue")
BAGS = ("none", "backpack", "shoulder bag", "handbag")
VIEWS, BACKGROUNDS = ("front", "back", "side"), ("street", "grass", "indoor", "blocks")
MARKER, MANIFEST = ".xmr-synthetic", "demo_manifest.json"
# Caption nouns; a colour word always comes right before the noun (or before "striped"/"plain" + noun).
UPPER_NOUNS = {"t-shirt": ["t-shirt", "short-sleeved t-shirt", "tee"], "jacket": ["jacket", "zip-up jacket"],
               "coat": ["coat", "long coat", "overcoat"], "hoodie": ["hoodie", "hooded sweatshirt"],
               "shirt": ["shirt", "button-up shirt", "long-sleeved shirt"],
               "dress": ["dress", "knee-length dress"]}
LOWER_NOUNS = {"trousers": ["trousers", "pants", "slacks"], "jeans": ["jeans"], "shorts": ["shorts"],
               "skirt": ["skirt"]}
BAG_NOUNS = {"backpack": ["backpack", "rucksack"], "shoulder bag": ["shoulder bag", "crossbody bag"],
             "handbag": ["handbag", "purse"]}
SHOE_NOUNS = ["shoes", "sneakers", "boots"]


@dataclass(frozen=True)
class Identity:
    """Described attributes of one synthetic person (``skin`` and ``height`` are never described)."""

    gender: str  # "female" (slim body) or "male" (broad body)
    hair_color: str
    hair_length: str
    upper_type: str
    upper_color: str
    upper_pattern: str
    lower_type: str | None  # None under a dress
    lower_color: str | None
    shoes_color: str
    bag: str
    bag_color: str | None  # None when bag == "none"
    hat: str
    hat_color: str | None  # None when hat == "none"
    glasses: bool
    skin: int = 0
    height: float = 1.0


ATTRIBUTES = tuple(f.name for f in fields(Identity))[:14]
_DOMAINS: dict[str, tuple] = dict(zip(ATTRIBUTES, (("female", "male"), tuple(HAIR_COLORS), HAIR_LENGTHS,
    UPPER_TYPES, tuple(COLORS), PATTERNS, (*LOWER_TYPES, None), (*COLORS, None), SHOE_COLORS, BAGS,
    (*COLORS, None), HATS, (*COLORS, None), (False, True))))


def attributes(identity: Identity) -> tuple:
    """The described attributes as a tuple (the key that must be unique per identity)."""
    return tuple(getattr(identity, a) for a in ATTRIBUTES)


def _random_identity(rng: random.Random) -> Identity:
    female = rng.random() < 0.5
    upper = rng.choices(UPPER_TYPES, weights=(3, 3, 2, 2, 3, 2 if female else 0))[0]
    lower = None if upper == "dress" else rng.choices(LOWER_TYPES, weights=(3, 2, 2 if female else 0, 3))[0]
    bag, hat = rng.choices(BAGS, weights=(3, 3, 2, 2))[0], rng.choices(HATS, weights=(3, 1))[0]
    hair = rng.choices(HAIR_LENGTHS, weights=(1, 2, 2) if female else (6, 1, 0.3))[0]
    c = [rng.choice(list(COLORS)) for _ in range(4)]
    return Identity("female" if female else "male", rng.choice(list(HAIR_COLORS)), hair, upper, c[0],
                    rng.choices(PATTERNS, weights=(3, 1))[0], lower, lower and c[1], rng.choice(SHOE_COLORS),
                    bag, None if bag == "none" else c[2], hat, None if hat == "none" else c[3],
                    rng.random() < 0.25, rng.randrange(len(SKIN)), rng.uniform(0.94, 1.04))


def _mutate(base: Identity, rng: random.Random) -> Identity | None:
    """Change exactly one described attribute of `base` (None when the result would be inconsistent)."""
    name = rng.choice(ATTRIBUTES)
    value = rng.choice([v for v in _DOMAINS[name] if v != getattr(base, name)])
    i = replace(base, **{name: value}, skin=rng.randrange(len(SKIN)), height=rng.uniform(0.94, 1.04))
    ok = ((i.upper_type == "dress") == (i.lower_type is None) == (i.lower_color is None)
          and (i.bag == "none") == (i.bag_color is None) and (i.hat == "none") == (i.hat_color is None))
    return i if ok else None


def sample_identities(num_ids: int, rng: random.Random) -> list[Identity]:
    """`num_ids` unique identities in families of 1-6, each member one attribute away from an earlier one."""
    out: list[Identity] = []
    seen: set[tuple] = set()
    while len(out) < num_ids:
        family, size = [_random_identity(rng)], rng.randint(2, 6) if rng.random() < 0.85 else 1
        for _ in range(60):
            if len(family) >= size:
                break
            child = _mutate(rng.choice(family), rng)
            if child is not None and all(attributes(child) != attributes(m) for m in family):
                family.append(child)
        for m in family:  # drop members repeating an earlier identity
            if attributes(m) not in seen:
                seen.add(attributes(m))
                out.append(m)
    out = out[:num_ids]
    if len({attributes(i) for i in out}) != len(out):
        raise AssertionError("synthetic identities are not unique")
    return out


# ----------------------------------------------------------------------------------------------- drawing
def _mix(a: tuple, b: tuple, t: float) -> tuple:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def _dark(c: tuple, t: float = 0.35) -> tuple:
    return _mix(c, (0, 0, 0), t) if sum(c) > 120 else (80, 80, 90)


class _Painter:
    """Draws one person in person units: x to the person's right (mirrored by `flip`), y down from the top
    of the head (feet at 170); holds the body half-widths, the jittered colours and the pose."""

    def __init__(self, img: Image.Image, ident: Identity, view: str, rng: random.Random) -> None:
        H, W = img.height, img.width
        h = min(H * 0.84 * ident.height * rng.uniform(0.93, 1.04), H * 0.95)
        self.d, self.u, self.flip = ImageDraw.Draw(img), h / 170, rng.choice((-1, 1))
        self.cx, self.top = W * (0.5 + rng.uniform(-0.06, 0.06)), H * (0.975 + rng.uniform(-0.03, 0.015)) - h
        self.ident, self.view, self.side = ident, view, view == "side"
        dims = [15.0, 12.5, 12.5, 6.5] if ident.gender == "male" else [12.0, 9.5, 12.0, 5.2]
        factors = (0.55, 0.62, 0.62, 1.0) if self.side else (1, 1, 1, 1)
        self.sh, self.wa, self.hip, self.arm = (d * k for d, k in zip(dims, factors))  # shoulder, waist, ...
        worn = ("upper", "lower", "shoes", "bag", "hat")
        base = {k: COLORS.get(getattr(ident, f"{k}_color") or "") for k in worn}
        base.update(skin=SKIN[ident.skin], hair=HAIR_COLORS[ident.hair_color])
        jit = {k: [rng.randint(-10, 10) for _ in range(3)] for k in base}  # the same draws for any identity
        self.pal = {k: c and tuple(min(255, max(0, v + j)) for v, j in zip(c, jit[k]))
                    for k, c in base.items()}
        self.swing = rng.uniform(-5, 5)
        self.stride = rng.uniform(2.5, 7) if self.side else rng.uniform(0, 1.2)

    def p(self, x: float, y: float) -> tuple[float, float]:
        return self.cx + self.flip * x * self.u, self.top + y * self.u

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        (a, b), (c, e) = self.p(x0, y0), self.p(x1, y1)
        return [min(a, c), min(b, e), max(a, c), max(b, e)]

    def poly(self, pts: list, fill: tuple) -> None:
        self.d.polygon([self.p(x, y) for x, y in pts], fill=fill)

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: tuple) -> None:
        self.d.rectangle(self.box(x0, y0, x1, y1), fill=fill)

    def ell(self, x0: float, y0: float, x1: float, y1: float, fill: tuple) -> None:
        self.d.ellipse(self.box(x0, y0, x1, y1), fill=fill)

    def line(self, pts: list, fill: tuple, w: float) -> None:
        self.d.line([self.p(x, y) for x, y in pts], fill=fill, width=max(1, round(w * self.u)))

    def limb(self, top: tuple, bottom: tuple, y0: float, y1: float, fill: tuple, shrink: float = 1.0) -> None:
        """Part [y0, y1] of a tapered limb from `top` (x, y, width) to `bottom` (x, y, width)."""
        pts = []
        for y, sgn in ((y0, -1), (y0, 1), (y1, 1), (y1, -1)):
            t = (y - top[1]) / (bottom[1] - top[1])
            x, w = top[0] + (bottom[0] - top[0]) * t, top[2] + (bottom[2] - top[2]) * t
            pts.append((x + sgn * w * shrink / 2, y))
        self.poly(pts, fill)

    def draw(self) -> None:
        if self.side:
            self.bag(behind=True)
        self.legs()
        self.upper()
        if self.view == "back":
            self.bag(behind=True)
        self.arms()
        self.head()
        self.bag(behind=False)

    def legs(self) -> None:
        lt, col, hip = self.ident.lower_type, self.pal["lower"], self.hip
        cut = {"trousers": 162, "jeans": 162, "shorts": 116}.get(lt or "", 0)
        for sgn in (-1, 1):
            xt = sgn * (1.5 if self.side else hip * 0.5)
            top = (xt, 88, 8 if self.side else hip - 0.5)
            bot = (xt * 0.9 + sgn * self.stride, 162, 6.5 if self.side else 7)
            self.limb(top, bot, 88, 162, self.pal["skin"])
            if cut:
                self.limb(top, bot, 88, cut, col)
            if lt == "jeans":  # faded front and rolled-up cuffs
                self.limb(top, bot, 96, 150, _mix(col, (255, 255, 255), 0.3), 0.3)
                self.limb(top, bot, 155, 162, _mix(col, (255, 255, 255), 0.45))
            self.ell(bot[0] - 4.5, 159, bot[0] + (7 if self.side else 4.5), 168, self.pal["shoes"])
        if cut:
            self.rect(-hip, 86, hip, 97, col)
        if lt == "trousers":  # belt
            self.rect(-hip, 86, hip, 89, _mix(col, (0, 0, 0), 0.55))
        if lt == "skirt":
            self.poly([(-hip - 0.5, 84), (hip + 0.5, 84), (hip + 6, 122), (-hip - 6, 122)], col)

    def upper(self) -> None:
        """Torso garment with the details that tell the types apart (neckline, collar, buttons, ...)."""
        t, col, sh, wa = self.ident.upper_type, self.pal["upper"], self.sh, self.wa
        dark, contrast = _dark(col, 0.38), (40, 40, 48) if sum(col) > 420 else (236, 236, 232)
        hem, flare = {"coat": (124, 4.5), "dress": (124, 7)}.get(t, (92, 0.5))
        hem_w = self.hip + flare
        if t == "hoodie" and self.view != "front":  # the hood
            self.ell(-sh - 7, 15, -sh + 3, 38, dark) if self.side else self.ell(-8, 17, 8, 40, dark)

        def hw(y: float) -> float:  # half-width of the garment at height y
            return sh + (wa - sh) * (y - 28) / 50 if y <= 78 else wa + (hem_w - wa) * (y - 78) / (hem - 78)

        right = [(sh - 2.5, 24), (sh, 28), (hw(78), 78), (hw(hem), hem)]
        self.poly(right + [(-x, y) for x, y in reversed(right)], col)
        if self.ident.upper_pattern == "striped":
            for y in range(33, hem - 3, 7):
                self.poly([(-hw(y), y), (hw(y), y), (hw(y + 3), y + 3), (-hw(y + 3), y + 3)], contrast)
        if self.view != "front":
            return
        if t in ("t-shirt", "dress"):
            self.ell(-3.5, 22, 3.5, 29, self.pal["skin"])
        if t == "dress":
            self.rect(-wa, 77, wa, 80, dark)
        for s in (-1, 1):
            if t == "shirt":
                self.poly([(s * 4.5, 24), (0, 31), (s, 24)], _mix(col, (255, 255, 255), 0.4))
            elif t == "jacket":
                self.rect(0, 26, s * 2.8, hem, contrast)
                self.poly([(s * 2.8, 26), (s * 7, 26), (s * 2.8, 44)], dark)
            elif t == "hoodie":
                self.line([(s * 2, 29), (s * 2, 43)], (235, 235, 235), 0.7)
            elif t == "coat":
                self.poly([(s, 26), (s * 7, 26), (s, 48)], dark)
                for y in (52, 66, 80, 94):
                    self.ell(s * 1.8, y - 1.1, s * 4, y + 1.1, dark)
        if t == "shirt":
            for y in range(36, 90, 9):
                self.ell(-0.9, y - 0.9, 0.9, y + 0.9, dark)
        elif t == "hoodie":
            self.ell(-7.5, 19, 7.5, 31, dark)
            self.poly([(-8, 66), (8, 66), (10, 84), (-10, 84)], dark)

    def arms(self) -> None:
        end = {"t-shirt": 46, "dress": 37}.get(self.ident.upper_type, 86)  # where the sleeve ends
        sleeve, skin, arm = _mix(self.pal["upper"], (0, 0, 0), 0.08), self.pal["skin"], self.arm
        x0 = self.sh + arm / 2 - 2
        arms = [(1, 0, self.swing)] if self.side else [(s, s * x0, s * 1.5) for s in (-1, 1)]
        for sgn, x0, dx in arms:
            top, bot = (x0, 27, arm), (x0 + dx, 88, arm * 0.8)
            self.limb(top, bot, 27, 88, skin)
            self.limb(top, bot, 27, end, sleeve)
            if not self.side:  # a darker seam between sleeve and torso
                seam = [(x0 - sgn * arm / 2, 34), (x0 + dx * (end - 27) / 61 - sgn * arm * 0.4, end)]
                self.line(seam, _mix(sleeve, (0, 0, 0), 0.4), 0.6)
            self.ell(x0 + dx - 3.1, 86, x0 + dx + 3.1, 93, skin)

    def head(self) -> None:
        hl, view, side = self.ident.hair_length, self.view, self.side
        hair, skin = self.pal["hair"], self.pal["skin"]
        self.rect(-2.6, 16, 2.6, 27, skin)
        if hl == "long" and view != "back":
            self.poly([(-7.5, 5), (1, 5), (-1, 40), (-10, 40)] if side else
                      [(-8, 6), (8, 6), (9.5, 42), (-9.5, 42)], hair)
        elif hl == "ponytail" and view != "back":
            self.ell(-14, 6, -5, 27, hair) if side else self.ell(5, 6, 11, 23, hair)
        self.ell(-7, 3, 7, 21, skin)
        if view == "back":
            self.ell(-7.4, 2.4, 7.4, 19.8, hair)
            if hl == "long":
                self.poly([(-7.5, 10), (7.5, 10), (9.5, 44), (-9.5, 44)], hair)
            elif hl == "ponytail":
                self.ell(-2.8, 8, 2.8, 35, hair)
        else:
            self.d.chord(self.box(-7.7, 1.8, 7.7, 18), 180, 360, fill=hair)
            for x in (3.5,) if side else (-2.7, 2.7):  # eyes
                self.ell(x - 0.9, 10.2, x + 0.9, 12.1, (30, 25, 25))
            if side:
                self.ell(-7.4, 2.4, 0.5, 19.5, hair)
                self.poly([(6.6, 11), (8.8, 14.6), (6.6, 15.2)], skin)
            else:
                self.line([(-1.8, 16.4), (1.8, 16.4)], (150, 60, 60), 0.6)
        if self.ident.hat == "cap":
            self.d.chord(self.box(-8, 0.2, 8, 17.5), 180, 360, fill=self.pal["hat"])
            x0, x1, y1 = {"front": (-8.6, 8.6, 10.2), "side": (3, 13.5, 10.2)}.get(view, (-8, 8, 9.4))
            self.rect(x0, 7.4, x1, y1, _dark(self.pal["hat"], 0.3))  # the brim
        if self.ident.glasses and view != "back":
            for x0, x1 in [(1.4, 6.4)] if side else [(-6.2, -0.9), (0.9, 6.2)]:
                self.rect(x0, 9.0, x1, 13.4, (22, 22, 26))
                self.rect(x0 + 0.8, 9.8, x1 - 0.8, 12.6, (70, 78, 92))
            self.line([(1.4, 10.5), (-4, 11)] if side else [(-1, 10.6), (1, 10.6)], (22, 22, 26), 0.8)

    def bag(self, behind: bool) -> None:
        """The pack of a backpack (`behind`: before the body is drawn) or straps / shoulder bag / handbag."""
        bag, col, sh = self.ident.bag, self.pal["bag"], self.sh
        if col is None:
            return
        if behind and bag == "backpack":
            x0, x1 = (-sh - 10, -sh + 2) if self.side else (-10, 10)
            self.d.rounded_rectangle(self.box(x0, 30, x1, 76), radius=3 * self.u, fill=col)
            if not self.side:
                self.rect(-7, 58, 7, 73, _dark(col, 0.3))
        elif behind:
            return
        elif bag == "backpack" and self.view != "back":
            for s in (0,) if self.side else (-1, 1):
                pts = [(-1, 24), (1.5, 64)] if self.side else [(s * (sh - 5), 24), (s * (sh - 6), 64)]
                self.line(pts, col, 2.6 if self.side else 3.0)
        elif bag == "shoulder bag":
            x = 1.0 if self.side else sh + 3
            self.line([(-1 if self.side else 3 - sh, 25), (x, 80)], col, 1.7)
            self.rect(x - 5, 78, x + 5, 97, col)
            self.rect(x - 5, 78, x + 5, 84, _dark(col, 0.3))
        elif bag == "handbag":
            hx = self.swing if self.side else sh + self.arm / 2 - 0.5
            self.line([(hx - 2.5, 95), (hx, 89), (hx + 2.5, 95)], _dark(col, 0.3), 0.9)
            self.rect(hx - 4.5, 94, hx + 4.5, 106, col)


def _background(w: int, h: int, rng: random.Random) -> Image.Image:
    kind, img = rng.choice(BACKGROUNDS), Image.new("RGB", (w, h))
    d, hz = ImageDraw.Draw(img), int(h * rng.uniform(0.45, 0.7))

    def j(c: tuple, s: int) -> tuple:
        return tuple(max(0, min(255, v + rng.randint(-s, s))) for v in c)

    if kind == "blocks":
        bs, base = max(2, w // rng.choice((3, 4, 6, 8))), j((135, 130, 125), 40)
        for y in range(0, h, bs):
            for x in range(0, w, bs):
                d.rectangle([x, y, x + bs, y + bs], fill=j(base, 45))
        return img
    upper, ground, thing = {"street": ((165, 155, 148), (122, 122, 126), (90, 100, 120)),
                            "grass": ((150, 175, 205), (80, 138, 62), (55, 100, 55)),
                            "indoor": ((224, 214, 194), (150, 112, 82), (170, 140, 110))}[kind]
    d.rectangle([0, 0, w, hz], fill=j(upper, 30))
    d.rectangle([0, hz, w, h], fill=j(ground, 20))
    for _ in range(rng.randint(2, 6)):  # windows, trees or doors
        x, y = rng.uniform(-0.2, 1) * w, rng.uniform(0.02, 0.6) * hz
        box = [x, y, x + rng.uniform(0.15, 0.4) * w, y + rng.uniform(0.1, 0.3) * hz]
        (d.ellipse if kind == "grass" else d.rectangle)(box, fill=j(thing, 20))
    step = max(2, h // rng.randint(8, 14))
    for y in range(hz + step, h, step):  # paving / tiles / grass texture
        d.line([0, y, w, y], fill=j(_mix(ground, (0, 0, 0), 0.15), 8), width=max(1, h // 200))
    return img


def render_person(identity: Identity, view: str, rng: random.Random,
                  size: tuple[int, int] = (192, 64)) -> Image.Image:
    """Draw one image (height, width = `size`) of `identity` seen from `view` ("front", "back", "side")."""
    if view not in VIEWS:
        raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
    H, W = size
    ss = max(1, min(4, round(384 / H)))  # supersample, then box-downscale: cheap anti-aliasing
    img = _background(W * ss, H * ss, rng)
    _Painter(img, identity, view, rng).draw()
    img = img.resize((W, H), Image.Resampling.BOX) if ss > 1 else img
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.75, 1.2))  # lighting, then sometimes blur,
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.8, 1.15))  # a colour cast or sensor noise
    r, tint = rng.random(), rng.random() < 0.4
    if r < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * H / 192))
    if tint or r > 0.8:
        arr = np.asarray(img, dtype=np.float32)
        arr = arr * np.array([rng.uniform(0.93, 1.07) for _ in range(3)], np.float32) if tint else arr
        if r > 0.8:
            arr = arr + np.random.default_rng(rng.getrandbits(32)).normal(0, rng.uniform(3, 9), arr.shape)
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))
    return img


# ---------------------------------------------------------------------------------------------- captions
_SUBJECTS = {"female": ["woman", "lady", "girl", "young woman"], "male": ["man", "guy", "young man", "boy"],
             None: ["person", "pedestrian", "individual"]}
_VIEW_PHRASES = {"front": ["facing the camera", "walking towards the camera", "seen from the front"],
                 "back": ["walking away from the camera", "seen from behind", "facing away from the camera"],
                 "side": ["seen from the side", "walking sideways", "shown in profile"]}


def _art(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _wear_phrase(i: Identity, keys: list[str], rng: random.Random) -> str:
    """The worn items among `keys` in random order, e.g. "a long red coat, black jeans and white shoes"."""
    out = []
    if "upper" in keys:
        *adj, noun = rng.choice(UPPER_NOUNS[i.upper_type]).split()
        pat = i.upper_pattern if rng.random() < (0.85 if i.upper_pattern == "striped" else 0.25) else ""
        words = [*adj, pat, i.upper_color] if rng.random() < 0.5 else [*adj, i.upper_color, pat]
        out.append(_art(" ".join(w for w in (*words, noun) if w)))
    if "lower" in keys and i.lower_type is not None:
        noun = rng.choice(LOWER_NOUNS[i.lower_type])
        out.append(("a " if noun == "skirt" else rng.choice(("", "a pair of "))) + f"{i.lower_color} {noun}")
    if "shoes" in keys:
        out.append(f"{i.shoes_color} {rng.choice(SHOE_NOUNS)}")
    if "hat" in keys and i.hat == "cap":
        out.append(_art(f"{i.hat_color} {rng.choice(('cap', 'baseball cap'))}"))
    if "glasses" in keys and i.glasses:
        out.append(rng.choice(("glasses", "a pair of glasses", "spectacles")))
    neg = ", without a hat" if "hat" in keys and i.hat == "none" else ""
    neg += ", without glasses" if "glasses" in keys and not i.glasses else ""
    rng.shuffle(out)
    if len(out) > 1:
        out[-2:] = [out[-2] + ("," if len(out) > 2 and rng.random() < 0.4 else "") + " and " + out[-1]]
    return ", ".join(out) + neg if out else ""


def _clauses(i: Identity, view: str, rng: random.Random) -> dict[str, str]:
    """Phrases for a random 60-100% (at least 3) of the attributes: gender (empty), hair, wear, bag, view."""
    keys = ["gender", "hair", "upper", "shoes", "bag", "view"] + (["lower"] if i.lower_type else [])
    keys += ["hat"] if i.hat != "none" or rng.random() < 0.2 else []
    keys += ["glasses"] if i.glasses or rng.random() < 0.15 else []
    keys = rng.sample(keys, min(len(keys), max(3, round(len(keys) * rng.uniform(0.6, 1.0)))))
    out = {"gender": ""} if "gender" in keys else {}
    poss = {"female": "her", "male": "his"}[i.gender] if out else "their"
    for k in keys:
        if k == "hair":
            mode = rng.choices(("both", "color", "length"), weights=(3, 1, 1))[0]
            col = i.hair_color + " " if mode != "length" else ""
            tails = [f"{col}hair in a ponytail", _art(col + "ponytail"), f"{col}hair tied back"]
            out[k] = rng.choice(tails) if i.hair_length == "ponytail" and mode != "color" else (
                (i.hair_length + " " if mode != "color" else "") + col + "hair")
        elif k == "bag" and i.bag == "none":
            out[k] = rng.choice(("not carrying anything", "carrying nothing", "with no bag"))
        elif k == "bag":
            where = {"backpack": f" on {poss} back", "shoulder bag": f" over {poss} shoulder"}
            verb = rng.choice(("carrying ", "with ", "holding " if i.bag == "handbag" else "carrying "))
            out[k] = verb + _art(f"{i.bag_color} {rng.choice(BAG_NOUNS[i.bag])}") + (
                where.get(i.bag, " in hand") if rng.random() < 0.3 else "")
        elif k == "view":
            out[k] = rng.choice(_VIEW_PHRASES[view]).replace("the camera", rng.choice(("the camera", "us")))
        elif "wear" not in out and k in ("upper", "lower", "shoes", "hat", "glasses"):
            out["wear"] = _wear_phrase(i, keys, rng)
    return out


def describe(identity: Identity, view: str, rng: random.Random) -> str:
    """One caption mentioning a random 60-100% of the attributes (and maybe the view), in random order."""
    parts = _clauses(identity, view, rng)
    gender = identity.gender if parts.pop("gender", None) is not None else None
    subject, parts = rng.choice(_SUBJECTS[gender]), {k: v for k, v in parts.items() if v}
    if rng.random() < 0.45 or len(parts) < 2:  # one sentence: "A woman with ..., wearing ..., carrying ..."
        lead = {"hair": ("with ", "who has "), "wear": ("wearing ", "dressed in ", "in ", "who is wearing "),
                "bag": ("",), "view": ("", "who is ")}
        pieces = [rng.choice(lead[k]) + v for k, v in parts.items()]
        rng.shuffle(pieces)
        start = rng.choice(("a", "a", "this", "the", "there is a"))
        start = start[:-1] + _art(subject) if start.endswith("a") else f"{start} {subject}"
        text = start + " " + ", ".join(pieces) + "."
    else:  # several sentences: "The man has short black hair. He is wearing ..."
        verbs = {"hair": ["has"], "wear": ["is wearing", "wears", "has on", "is dressed in"], "view": ["is"]}
        pron = {"female": "she", "male": "he"}.get(gender or "") or rng.choice(("the person", "this person"))
        sentences = [("has " + v[5:] if v.startswith("with ") else "is " + v) if k == "bag"
                     else rng.choice(verbs[k]) + " " + v for k, v in parts.items()]
        rng.shuffle(sentences)
        first = rng.choice(("the", "this", "a"))
        first = _art(subject) if first == "a" else f"{first} {subject}"
        text = " ".join(f"{first if n == 0 else pron} {x}." for n, x in enumerate(sentences))
    if rng.random() < 0.15:
        text = text.lower()
    else:
        text = re.sub(r"(^|[.!?] )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)
    text = text.replace("gray", "grey") if rng.random() < 0.2 else text
    return text.rstrip(".") if rng.random() < 0.12 else text


def tokenize(caption: str) -> list[str]:
    """Lower-cased word tokens (the ``processed_tokens`` of a caption)."""
    return re.findall(r"[a-z0-9]+(?:[-'][a-z0-9]+)*", caption.lower())


# -------------------------------------------------------------------------------------------- generation
def _write_dataset(out: Path, params: dict) -> None:
    """Generate everything into `out` (a fresh folder); the manifest is written last."""
    seed, size, (n_train, n_val, _) = params["seed"], tuple(params["image_size"]), params["split_ids"]
    out.mkdir(parents=True)
    (out / MARKER).write_text("generated by xmr.data.synthetic\n")
    idents = sample_identities(params["num_ids"], random.Random(f"xmr-synth/{seed}/identities"))
    records, digest, nbytes = [], hashlib.sha256(), 0
    for pid, ident in enumerate(idents, 1):
        split = "train" if pid <= n_train else "val" if pid <= n_train + n_val else "test"
        (out / "imgs" / "synth" / split).mkdir(parents=True, exist_ok=True)
        for k in range(params["images_per_id"]):
            rng = random.Random(f"xmr-synth/{seed}/image/{pid}/{k}")
            view, buf = rng.choices(VIEWS, weights=(4, 3, 3))[0], io.BytesIO()
            render_person(ident, view, rng, size).save(buf, "JPEG", quality=90)
            rel, data = f"synth/{split}/p{pid:05d}_{k:02d}.jpg", buf.getvalue()
            (out / "imgs" / rel).write_bytes(data)
            digest.update(rel.encode() + data)
            nbytes += len(data)
            crng, caps = random.Random(f"xmr-synth/{seed}/caption/{pid}/{k}"), []
            for _ in range(params["captions_per_image"]):  # the captions of one image should differ
                tries = (describe(ident, view, crng) for _ in range(6))
                caps.append(next((c for c in tries if c not in caps), None) or caps[0])
            records.append({"split": split, "captions": caps, "file_path": rel,
                            "processed_tokens": [tokenize(c) for c in caps], "id": pid})
    ann = json.dumps(records).encode()
    (out / "reid_raw.json").write_bytes(ann)
    attrs = json.dumps({pid: asdict(i) for pid, i in enumerate(idents, 1)})
    (out / "synthetic_attributes.json").write_text(attrs)
    manifest = {"generator": "xmr.data.synthetic", "version": VERSION, "params": params,
                "num_images": len(records), "annotation_sha256": hashlib.sha256(ann).hexdigest(),
                "images_sha256": digest.hexdigest(), "images_bytes": nbytes}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _is_complete(out: Path, params: dict) -> bool:
    """True when `out` holds a finished data set generated with `params` (cheap: no image decoding)."""
    try:
        man = json.loads((out / MANIFEST).read_text())
        ann = (out / "reid_raw.json").read_bytes()
        sizes = sum((out / "imgs" / r["file_path"]).stat().st_size for r in json.loads(ann))
        return (man.get("version"), man.get("params"), man["annotation_sha256"], man["images_bytes"]) == (
            VERSION, params, hashlib.sha256(ann).hexdigest(), sizes)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _clean_stale(root: Path) -> None:
    """Remove temporary folders left by killed generations (whose process is gone)."""
    for p in root.glob(".CUHK-PEDES.*-*"):
        try:
            pid = int(p.name.split(".")[-1].split("-")[1])
            if pid != os.getpid():
                os.kill(pid, 0)  # raises ProcessLookupError when that process is gone
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (IndexError, ValueError, OSError, OverflowError):
            continue


def generate_pedes_demo(root: str | os.PathLike, *, num_ids: int = 600, images_per_id: int = 4,
                        captions_per_image: int = 2, image_size: tuple[int, int] = (192, 64),
                        split_ids: tuple[int, int, int] | None = None, seed: int = 0,
                        overwrite: bool = False) -> Path:
    """Write (or reuse) a synthetic CUHK-PEDES data set under `root`; returns ``<root>/CUHK-PEDES``.

    `image_size` is (height, width); `split_ids` the train/val/test identity counts (default ~70/15/15%).
    A complete data set with the same parameters is reused unless `overwrite` (which also allows replacing
    a CUHK-PEDES folder this generator did not write). Written to a temporary folder, then renamed.
    """
    if min(num_ids, images_per_id, captions_per_image) < 1 or len(image_size) != 2 or min(image_size) < 16:
        raise ValueError("num_ids, images_per_id, captions_per_image must be >= 1, image_size (h, w) >= 16")
    n_eval = max(1, round(num_ids * 0.15))
    counts = [int(c) for c in split_ids or (num_ids - 2 * n_eval, n_eval, n_eval)]
    if len(counts) != 3 or sum(counts) != num_ids or min(counts) < 0 or min(counts[0], counts[2]) < 1:
        raise ValueError(f"split_ids must be 3 counts (train>=1, val>=0, test>=1) summing to {num_ids}")
    params = {"num_ids": int(num_ids), "images_per_id": int(images_per_id), "seed": int(seed),
              "captions_per_image": int(captions_per_image), "image_size": [int(v) for v in image_size],
              "split_ids": counts}
    root, out = Path(root), Path(root) / "CUHK-PEDES"
    if not overwrite and _is_complete(out, params):
        return out
    if out.exists() and not overwrite and not (out / MARKER).exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} was not written by xmr.data.synthetic; overwrite=True replaces it")
    _clean_stale(root)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, old = root / f".CUHK-PEDES.partial-{tag}", root / f".CUHK-PEDES.old-{tag}"
    try:
        _write_dataset(tmp, params)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except OSError:
        if not _is_complete(out, params):  # unless a concurrent generator just finished the same data set
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
