"""Generated captioned scenes ("shapes"): demo, test and benchmark data in MS-COCO format.

Each scene holds 1 to 4 objects (shape, colour, size, position) on a coloured background. Each
image gets 5 different captions built from varied phrasings that mention attributes, counts and
spatial relations, so that good retrieval needs more than a single word.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from ..errors import UsageError
from ..storage import write_text

log = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220), "yellow": (240, 210, 20),
    "purple": (140, 40, 170), "orange": (245, 130, 20), "black": (20, 20, 20), "white": (250, 250, 250),
}
BACKGROUNDS = {
    "gray": (128, 128, 128), "beige": (225, 210, 175), "dark": (45, 45, 60), "pale blue": (175, 205, 235),
    "pale green": (185, 225, 180), "pink": (240, 190, 200),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon")
PLURAL = {s: s + "s" for s in SHAPES}
SIZES = {"small": 0.075, "": 0.11, "large": 0.15}  # radius as a fraction of the image side
NUMBER = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str


# ----------------------------------------------------------------------------- scenes
def random_scene(rng: np.random.Generator) -> Scene:
    """1 to 4 objects in 1 or 2 kinds (a kind = shape + colour), in distinct cells of a 3x3 grid."""
    n = int(rng.choice([1, 2, 3, 4], p=[0.25, 0.35, 0.25, 0.15]))
    kinds_n = 1 if n == 1 else int(rng.choice([1, 2], p=[0.35, 0.65]))
    background = str(rng.choice(list(BACKGROUNDS)))
    allowed = [c for c in COLOURS if not (background == "dark" and c == "black")]
    kinds = []
    while len(kinds) < kinds_n:
        k = (str(rng.choice(SHAPES)), str(rng.choice(allowed)))
        if k not in kinds:
            kinds.append(k)
    counts = [n] if kinds_n == 1 else [int(c) for c in _split_count(n, rng)]
    cells = rng.permutation(9)[:n]
    objs, i = [], 0
    for (shape, colour), count in zip(kinds, counts):
        size = str(rng.choice(list(SIZES)))  # one size per kind so "two small red circles" is true
        for _ in range(count):
            cx, cy = cells[i] % 3, cells[i] // 3
            i += 1
            jitter = rng.uniform(-0.04, 0.04, size=2)
            objs.append(Obj(shape, colour, size, (cx + 0.5) / 3 + jitter[0], (cy + 0.5) / 3 + jitter[1]))
    return Scene(tuple(objs), background)


def _split_count(n: int, rng: np.random.Generator) -> tuple[int, int]:
    a = int(rng.integers(1, n))
    return a, n - a


# ----------------------------------------------------------------------------- drawing
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        k = r * 0.85
        pts = [(-k, -k), (k, -k), (k, k), (-k, k)]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in [-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)]]
    elif shape == "diamond":
        pts = [(0, -r), (r * 0.7, 0), (0, r), (-r * 0.7, 0)]
    elif shape == "hexagon":
        pts = [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    else:
        raise ValueError(shape)
    return [(cx + x, cy + y) for x, y in pts]


@functools.lru_cache(maxsize=4)
def _noise_tile(width: int, height: int) -> np.ndarray:
    """A fixed grain texture (twice the image size); each image takes a random window of it."""
    return np.random.default_rng(12345).normal(0, 6, size=(2 * height, 2 * width, 1)).astype(np.float32)


def render(scene: Scene, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene; a little background noise and shading keep the images from being trivial."""
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    shade = np.linspace(-12, 12, height, dtype=np.float32)[:, None, None] * rng.choice([-1, 1])
    tile = _noise_tile(width, height)
    dy, dx = int(rng.integers(0, height)), int(rng.integers(0, width))
    noise = tile[dy:dy + height, dx:dx + width]
    arr = np.clip(bg[None, None, :] + shade + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    for o in scene.objects:
        r = SIZES[o.size] * side
        cx, cy = o.x * width, o.y * height
        fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[o.colour])
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill)
    return img


# ----------------------------------------------------------------------------- captions
def _groups(scene: Scene) -> list[list[Obj]]:
    groups: dict[tuple[str, str], list[Obj]] = {}
    for o in scene.objects:
        groups.setdefault((o.shape, o.colour), []).append(o)
    return list(groups.values())


def _np(group: list[Obj], rng: np.random.Generator, with_size: bool = True, article: str = "a") -> str:
    """Noun phrase: "a small red circle", "two blue stars"."""
    o, n = group[0], len(group)
    size = f"{o.size} " if (with_size and o.size) else ""
    if n == 1:
        art = article if not (article == "a" and (size or o.colour)[0] in "aeiou") else "an"
        return f"{art} {size}{o.colour} {o.shape}"
    return f"{NUMBER[n]} {size}{o.colour} {PLURAL[o.shape]}"


def _where(o: Obj) -> str:
    col = ["left", "", "right"][min(2, int(o.x * 3))]
    row = ["top", "", "bottom"][min(2, int(o.y * 3))]
    if not col and not row:
        return "in the center"
    if col and row:
        return f"in the {row} {col} corner"
    if row:
        return f"at the {row}"
    return f"on the {col}"


def _centre(group: list[Obj]) -> tuple[float, float]:
    return float(np.mean([o.x for o in group])), float(np.mean([o.y for o in group]))


def _relation(a: list[Obj], b: list[Obj], rng: np.random.Generator) -> str:
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    pa, pb = _np(a, rng), _np(b, rng)
    if abs(ax - bx) >= abs(ay - by):
        left, right = (pa, pb) if ax < bx else (pb, pa)
        return str(rng.choice([f"{left} on the left and {right} on the right",
                               f"{left} to the left of {right}", f"{right} to the right of {left}"]))
    top, bottom = (pa, pb) if ay < by else (pb, pa)
    return str(rng.choice([f"{top} above {bottom}", f"{bottom} below {top}", f"{top} over {bottom}"]))


def _scene_phrase(scene: Scene, rng: np.random.Generator) -> str:
    groups = _groups(scene)
    if len(groups) == 1:
        g = groups[0]
        phrase = _np(g, rng)
        return f"{phrase} {_where(g[0])}" if len(g) == 1 and rng.random() < 0.6 else phrase
    if rng.random() < 0.7:
        return _relation(groups[0], groups[1], rng)
    return f"{_np(groups[0], rng)} and {_np(groups[1], rng)}"


def _background_phrase(scene: Scene) -> str:
    return f"on a {scene.background} background"


TEMPLATES = (
    lambda s, rng: _scene_phrase(s, rng),
    lambda s, rng: f"{_scene_phrase(s, rng)} {_background_phrase(s)}",
    lambda s, rng: f"a picture of {_scene_phrase(s, rng)}",
    lambda s, rng: f"an image showing {_scene_phrase(s, rng)} {_background_phrase(s)}",
    lambda s, rng: _count_phrase(s),
    lambda s, rng: f"{_scene_phrase(s, rng)}, drawn {_background_phrase(s)}",
    lambda s, rng: f"there {'is' if len(s.objects) == 1 else 'are'} {_list_phrase(s, rng)} here",
    lambda s, rng: f"a {s.background} scene with {_list_phrase(s, rng, with_size=False)}",
)


def _list_phrase(scene: Scene, rng: np.random.Generator, with_size: bool = True) -> str:
    return " and ".join(_np(g, rng, with_size) for g in _groups(scene))


def _count_phrase(scene: Scene) -> str:
    n = len(scene.objects)
    kinds = _groups(scene)
    noun = "shape" if n == 1 else "shapes"
    if len(kinds) == 1:
        return f"{NUMBER[n]} {kinds[0][0].colour} {noun} on a {scene.background} background"
    what = " and ".join(f"{NUMBER[len(g)]} {g[0].colour}" for g in kinds)
    return f"{NUMBER[n]} {noun}, {what}, on a {scene.background} background"


def captions_for(scene: Scene, rng: np.random.Generator, n: int = 5) -> list[str]:
    """``n`` distinct captions for one scene."""
    out: list[str] = []
    order = rng.permutation(len(TEMPLATES))
    tries = 0
    while len(out) < n and tries < 50:
        t = TEMPLATES[order[tries % len(order)]]
        tries += 1
        c = t(scene, rng)
        if c not in out:
            out.append(c)
    return out


# ----------------------------------------------------------------------------- data set
def parse_size(size: str | int) -> tuple[int, int]:
    """``224`` or ``"640x480"`` -> (width, height)."""
    if isinstance(size, int):
        return size, size
    w, _, h = str(size).lower().partition("x")
    try:
        width, height = int(w), int(h or w)
    except ValueError:
        raise UsageError(f"bad image size {size!r}: use PX or WxH") from None
    if width < 16 or height < 16:
        raise UsageError(f"bad image size {size!r}: at least 16 pixels a side")
    return width, height


def generate_shapes(out: str | os.PathLike, images: int, seed: int = 0, size: str | int = 224,
                    quality: int = 90, progress: bool = True) -> Path:
    """Write ``images`` JPEGs under ``out/images`` and ``out/captions.json`` (MS-COCO format).

    Returns the captions file. The same seed gives byte-identical output.
    """
    if images < 1:
        raise UsageError("--images must be at least 1")
    width, height = parse_size(size)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    doc: dict = {"info": {"description": f"dualsearch shapes, seed {seed}"}, "images": [], "annotations": []}
    ann_id = 0
    for i in tqdm(range(images), desc="shapes", unit="img", disable=not progress):
        scene = random_scene(rng)
        file_name = f"images/shapes_{seed:04d}_{i:07d}.jpg"
        render(scene, width, height, rng).save(out / file_name, quality=quality)
        doc["images"].append({"id": i, "file_name": file_name, "width": width, "height": height})
        for cap in captions_for(scene, rng):
            doc["annotations"].append({"id": ann_id, "image_id": i, "caption": cap})
            ann_id += 1
    captions = out / "captions.json"
    write_text(captions, json.dumps(doc))
    log.info("wrote %d images and %d captions to %s", images, ann_id, out)
    return captions
