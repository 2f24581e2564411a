"""MS-COCO captions JSON."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

from ..records import SkipLog
from .base import CaptionDataset, DataError, Format, file_ref, finish


def read_coco(captions_json: str | os.PathLike, image_root: str | os.PathLike,
              captions_per_image: int | None = None) -> CaptionDataset:
    """MS-COCO captions JSON (``images[].{id,file_name}``, ``annotations[].{image_id,caption}``).

    ``file_name`` resolves against ``image_root``. Raises :class:`DataError` if the file cannot be
    read or lacks those keys; an annotation of an unknown image is skipped.
    """
    captions_json = Path(captions_json)
    try:
        doc = json.loads(captions_json.read_text(encoding="utf-8"))
        images = {img["id"]: img["file_name"] for img in doc["images"]}
        annotations = doc["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{captions_json}: not a readable COCO captions file ({e.__class__.__name__}: {e})") from e
    root = Path(image_root)
    skipped = SkipLog()
    groups: OrderedDict[str, list] = OrderedDict()
    for ann in annotations:
        image_id = ann.get("image_id")
        if image_id not in images:
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
