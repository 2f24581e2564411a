"""Thumbnails by image id: JPEGs cached under the index's ``thumbs/`` folder when it can be written,
made in memory every time when it cannot (a read-only index volume)."""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Callable

from ..data.images import fetch_uri, is_uri, load_image
from ..data.records import ImageRef
from ..storage import StorageError, write_bytes

log = logging.getLogger(__name__)

THUMB_SIZE = 256


def thumbnail_bytes(src: str | ImageRef, size: int = THUMB_SIZE) -> bytes:
    """A JPEG thumbnail (at most ``size`` on its long side) of a file, WebDataset member or URI."""
    img = load_image(fetch_uri(src) if isinstance(src, str) and is_uri(src) else src, target_size=size)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def make_thumbnail(src: str | ImageRef, out: Path, size: int = THUMB_SIZE) -> bytes:
    """A JPEG thumbnail written to ``out`` (atomically); returns its bytes."""
    data = thumbnail_bytes(src, size)
    write_bytes(out, data)
    return data


class Thumbnails:
    """Thumbnail bytes by id. ``folder`` is asked on each call (the cache folder); a folder that
    cannot be made or written is logged once, and thumbnails are then made in memory."""

    def __init__(self, folder: Callable[[], Path], size: int = THUMB_SIZE):
        self.folder = folder
        self.size = size
        self.warned = False

    def get(self, image_id: int, src: str | ImageRef) -> bytes:
        """The cached thumbnail of ``image_id`` (made from ``src`` and cached on first request)."""
        out = self.folder() / f"{image_id}.jpg"
        with contextlib.suppress(OSError):
            return out.read_bytes()
        data = thumbnail_bytes(src, self.size)
        try:
            write_bytes(out, data)  # atomic, unique temp name: concurrent requests for one id are fine
        except StorageError as e:
            if not self.warned:
                self.warned = True
                log.warning("thumbnail cache cannot be written (%s); making thumbnails in memory", e)
        return data
