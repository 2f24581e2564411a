"""Real image-caption sets from Debian packages, built once under bench-out/ as COCO captions JSON.

    make bench-data                     # apt-get install tuxpaint-stamps-default oxygen-icon-theme
    python bench/realdata.py            # builds both sets and prints their sizes

- ``tuxpaint``: Tux Paint's stamps (Debian ``tuxpaint-stamps-default``, /usr/share/tuxpaint/stamps):
  each stamp's ``.txt`` holds its description, the first line in English, then ``xx.utf8=``
  translations; the English line is the caption. PNG stamps (else SVG, rendered with CairoSVG)
  are flattened onto white.
- ``oxygen``: KDE's Oxygen icon theme (Debian ``oxygen-icon-theme``, /usr/share/icons/oxygen/base):
  the freedesktop.org icon names of the descriptive contexts (actions, categories, devices,
  emblems, emotes, places, status; not apps or file types, which name programs and formats), as
  words: ``drive-removable-media-usb`` -> "drive removable media usb". Largest size available.

Images are written 256x256 RGB (aspect kept, padded with white). The split (``splits``) is by
image and deterministic (:func:`dualsearch.data.split.split_records`, seed 0): 70 % train, 10 %
validation, 20 % held out. Open Clip Art and Noto emoji are kept out: they are unseen checks.
"""
from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from PIL import Image  # noqa: E402

from _common import BENCH_DIR  # noqa: E402
from dualsearch.data.readers import read_dataset  # noqa: E402
from dualsearch.data.split import split_records  # noqa: E402
from dualsearch.errors import DualsearchError  # noqa: E402
from dualsearch.storage import write_bytes, write_text  # noqa: E402

TUXPAINT = Path("/usr/share/tuxpaint/stamps")
OXYGEN = Path("/usr/share/icons/oxygen/base")
OXYGEN_CONTEXTS = ("actions", "categories", "devices", "emblems", "emotes", "places", "status")
SIDE = 256
SETS = ("tuxpaint", "oxygen")


class RealDataError(DualsearchError):
    """A real set's Debian package is not installed."""


def _on_white(img: Image.Image) -> Image.Image:
    """RGBA/P/L image -> RGB ``SIDE x SIDE`` on white, scaled to fit, aspect kept."""
    img = img.convert("RGBA")
    scale = SIDE / max(img.size)  # small icons are scaled up too
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)
    canvas = Image.new("RGB", (SIDE, SIDE), "white")
    canvas.paste(img, ((SIDE - img.width) // 2, (SIDE - img.height) // 2), img)
    return canvas


def _render(path: Path) -> Image.Image:
    if path.suffix == ".svg":
        import cairosvg

        # Debian's files, trusted: Illustrator's exports declare XML entities, refused unless unsafe
        png = cairosvg.svg2png(url=str(path), output_width=SIDE * 2, unsafe=True)
        return _on_white(Image.open(io.BytesIO(png)))
    with Image.open(path) as img:
        return _on_white(img)


def _english(txt: Path) -> str | None:
    """The first line of a Tux Paint description that is not a translation."""
    for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line and not re.match(r"^[a-zA-Z_@]+\.utf8=", line):
            return line
    return None


def tuxpaint_items() -> list[tuple[Path, str]]:
    """(image file, English description) of every stamp that has both."""
    items = []
    for txt in sorted(TUXPAINT.rglob("*.txt")):
        caption = _english(txt)
        image = next((p for p in (txt.with_suffix(".png"), txt.with_suffix(".svg")) if p.is_file()), None)
        if caption and image is not None:
            items.append((image, caption))
    return items


def _largest(name: str, context: str) -> Path | None:
    sizes = sorted((int(d.name.split("x")[0]), d) for d in OXYGEN.iterdir() if re.fullmatch(r"\d+x\d+", d.name))
    for _, d in reversed(sizes):
        p = d / context / f"{name}.png"
        if p.is_file():
            return p
    return None


def oxygen_items() -> list[tuple[Path, str]]:
    """(largest PNG, icon name as words) of each descriptive icon name (first context wins)."""
    seen, items = set(), []
    for context in OXYGEN_CONTEXTS:
        names = sorted({p.stem for p in OXYGEN.glob(f"*/{context}/*.png")})
        for name in names:
            words = [w for w in re.split(r"[-_ .]+", name.lower()) if w]
            if name in seen or not words or not all(w.isalpha() for w in words) or max(map(len, words)) < 3:
                continue
            seen.add(name)
            items.append((_largest(name, context), " ".join(words)))
    return items


def build(name: str) -> Path:
    """Build (once) the set ``name`` under ``bench-out/real-<name>/``; return its captions.json.
    Raises :class:`RealDataError` when its Debian package is missing (``make bench-data``)."""
    root = BENCH_DIR / f"real-{name}"
    captions = root / "captions.json"
    if captions.is_file():
        return captions
    source, items = (TUXPAINT, tuxpaint_items) if name == "tuxpaint" else (OXYGEN, oxygen_items)
    if not source.is_dir():
        raise RealDataError(f"{source} is missing: run `make bench-data` (apt-get install "
                            f"tuxpaint-stamps-default oxygen-icon-theme)")
    doc: dict = {"info": {"description": f"{name}, from {source}"}, "images": [], "annotations": []}
    for i, (path, caption) in enumerate(items()):
        file_name = f"images/{i:05d}.png"
        buf = io.BytesIO()
        _render(path).save(buf, format="PNG")
        write_bytes(root / file_name, buf.getvalue())
        doc["images"].append({"id": i, "file_name": file_name, "source": str(path.relative_to(source))})
        doc["annotations"].append({"id": i, "image_id": i, "caption": caption})
    write_text(captions, json.dumps(doc, indent=1))
    return captions


def splits(name: str) -> dict:
    """``{"train", "val", "test"}`` -> records of the set ``name`` (70/10/20 by image, seed 0)."""
    captions = build(name)
    ds = read_dataset(captions, captions.parent)
    return split_records(ds.records, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)


def main() -> None:
    for name in SETS:
        parts = splits(name)
        print(f"{name}: " + ", ".join(f"{k} {len(v)} images" for k, v in parts.items()))


if __name__ == "__main__":
    main()
