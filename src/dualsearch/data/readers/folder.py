"""A plain folder of images with optional same-name ``.txt`` captions."""
from __future__ import annotations

import fnmatch
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from ..records import ImageRef, SkipLog
from .base import CaptionDataset, DataError, Format, finish

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def list_images(root: str | os.PathLike, exclude: Sequence[str] = ()) -> list[Path]:
    """All image files below ``root`` (recursively, sorted), skipping hidden files and folders and
    those whose relative path or name matches a glob in ``exclude``.

    Raises :class:`DataError` if ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith(".") or not fn.lower().endswith(IMAGE_EXTENSIONS):
                continue
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if any(fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(fn, pat) for pat in exclude):
                continue
            out.append(p)
    return out


def read_folder(root: str | os.PathLike, captions_per_image: int | None = None) -> CaptionDataset:
    """A folder of images with optional same-name ``.txt`` captions (one a line).

    Images without captions are skipped and reported. Raises :class:`DataError` if ``root`` is not
    a folder.
    """
    groups: OrderedDict[str, list] = OrderedDict()
    refs = {}
    for p in list_images(root):
        txt = p.with_suffix(".txt")
        key = str(p)
        groups[key] = txt.read_text(encoding="utf-8", errors="replace").splitlines() if txt.is_file() else []
        refs[key] = ImageRef(key)
    return finish(groups, refs, SkipLog(), str(root), captions_per_image)


def _read(source, images=None, path_column=None, caption_column=None, captions_per_image=None) -> CaptionDataset:
    return read_folder(source, captions_per_image)


FOLDER = Format("folder", _read, detect_folder=os.path.isdir, folder_priority=99,
                help="folder of images with same-name .txt captions (the fallback for folders)")
