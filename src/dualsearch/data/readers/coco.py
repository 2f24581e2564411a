"""MS-COCO captions JSON."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

from ..records import SkipLog
from .base import CaptionDataset, DataError, Format, file_ref, finish


def _image_names(entries, skipped: SkipLog) -> dict:
    """image id -> file name; a repeated id keeps its first entry and reports the others as skipped
    ("duplicate image id"): the annotations cannot say which of the entries they mean."""
    images: dict = {}
    for img in entries:
        image_id, name = img["id"], str(img["file_name"])
        if image_id in images:
            skipped.add(f"image {image_id} ({name})", f"duplicate image id (kept {images[image_id]})")
            continue
        images[image_id] = name
    return images


def _known(image_id, images: dict) -> bool:
    try:
        return image_id in images
    except TypeError:  # an unhashable id (a list, an object) names no image
        return False


def read_coco(captions_json: str | os.PathLike, image_root: str | os.PathLike,
              captions_per_image: int | None = None) -> CaptionDataset:
    """MS-COCO captions JSON (``images[].{id,file_name}``, ``annotations[].{image_id,caption}``),
    UTF-8 with or without a byte-order mark.

    ``file_name`` resolves against ``image_root``. Raises :class:`DataError` if the file cannot be
    read or lacks those keys; an annotation of an unknown image is skipped, and so is an image entry
    repeating an earlier entry's id (the first is kept; both are reported in ``skipped``).
    """
    captions_json = Path(captions_json)
    skipped = SkipLog()
    try:
        doc = json.loads(captions_json.read_text(encoding="utf-8-sig"))
        images = _image_names(doc["images"], skipped)
        annotations = [a for a in doc["annotations"] if isinstance(a, dict)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{captions_json}: not a readable COCO captions file ({e.__class__.__name__}: {e})") from e
    root = Path(image_root)
    groups: OrderedDict[str, list] = OrderedDict()
    for ann in annotations:
        image_id = ann.get("image_id")
        if not _known(image_id, images):
            skipped.add(f"annotation {ann.get('id')}", f"unknown image_id {image_id}")
            continue
        groups.setdefault(images[image_id], []).append(ann.get("caption"))
    refs = {name: file_ref(root / name) for name in groups}
    return finish(groups, refs, skipped, str(captions_json), captions_per_image)


def _read(source, images=None, path_column=None, caption_column=None, captions_per_image=None) -> CaptionDataset:
    if images is None:
        raise DataError(f"{source}: a COCO captions file needs the image folder (--images)")
    return read_coco(source, images, captions_per_image)


COCO = Format("coco", _read, suffixes=(".json",), help="MS-COCO captions JSON; needs --images")
