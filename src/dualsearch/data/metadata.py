"""Photo metadata read once at indexing time: date taken, size, format, camera, GPS position.

Read with Pillow's own EXIF support (``Image.getexif``, which covers JPEG, TIFF, WebP, PNG eXIf
chunks and, with pillow-heif registered, HEIC/HEIF): opening an image reads its header only, so
this costs about a millisecond per file (``bench/index_speed.py`` measures it against embedding).

Tags (EXIF 2.32, CIPA DC-008): DateTimeOriginal (0x9003) with OffsetTimeOriginal (0x9011) in the
Exif IFD (0x8769), else DateTime (0x0132) in IFD0; Make (0x010F), Model (0x0110); GPS IFD
(0x8825) latitude/longitude as degrees-minutes-seconds rationals with N/S, E/W references. A
photo without a usable EXIF date is dated by its file's modification time (local time of this
machine), and ``date_source`` says which one it is.
"""
from __future__ import annotations

import io
import logging
import math
import os
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Optional

from PIL import Image, UnidentifiedImageError

from .images import is_raw_name, raw_available

log = logging.getLogger(__name__)

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
DATETIME_ORIGINAL, OFFSET_TIME_ORIGINAL, DATETIME = 0x9003, 0x9011, 0x0132
MAKE, MODEL = 0x010F, 0x0110
METADATA_VERSION = 1  # bump when a new field is read: rows with an older version are read again

_EXIF_DATE = re.compile(r"^\s*(\d{4})[:\-](\d{2})[:\-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_OFFSET = re.compile(r"^\s*([+-])(\d{2}):?(\d{2})\s*$")


@dataclass
class PhotoMetadata:
    """One image's catalog fields. ``taken`` is ISO 8601 local time ``YYYY-MM-DDTHH:MM:SS`` (as
    the camera's clock said it; ``taken_offset`` ``+HH:MM`` when the camera recorded its UTC
    offset), ``date_source`` ``"exif"`` or ``"mtime"``; ``width``/``height`` in pixels (after
    the EXIF orientation is *not* applied: stored as encoded); ``format`` Pillow's format name
    (``JPEG``, ``PNG``, ``HEIF``, ...); ``lat``/``lon`` in decimal degrees (WGS 84) or None."""

    taken: Optional[str] = None
    taken_offset: Optional[str] = None
    date_source: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    format: Optional[str] = None
    camera_make: Optional[str] = None
    camera_model: Optional[str] = None
    lat: Optional[float] = None
    lon: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def parse_exif_date(value) -> str | None:
    """``"2023:07:14 18:03:22"`` -> ``"2023-07-14T18:03:22"``; None for a blank or impossible
    date (cameras write ``"0000:00:00 00:00:00"`` when their clock was never set)."""
    m = _EXIF_DATE.match(_text(value) or "")
    if not m:
        return None
    try:
        return datetime(*map(int, m.groups())).isoformat()
    except ValueError:
        return None


def parse_offset(value) -> str | None:
    """``"+02:00"`` (OffsetTimeOriginal) -> ``"+02:00"``; None when absent or malformed."""
    m = _OFFSET.match(_text(value) or "")
    if not m or int(m.group(2)) > 14 or int(m.group(3)) >= 60:
        return None
    return f"{m.group(1)}{m.group(2)}:{m.group(3)}"


def _degrees(dms, ref) -> float | None:
    """EXIF GPS (degrees, minutes, seconds) rationals and an N/S/E/W reference -> signed degrees."""
    try:
        d, m, s = (float(x) for x in dms)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = d + m / 60 + s / 3600
    if not math.isfinite(value):
        return None
    return -value if (_text(ref) or "").upper() in ("S", "W") else value


def _gps(exif) -> tuple[float | None, float | None]:
    try:
        gps = exif.get_ifd(GPS_IFD)
    except Exception:  # a damaged GPS IFD is no position, not a skipped photo
        return None, None
    lat, lon = _degrees(gps.get(2), gps.get(1)), _degrees(gps.get(4), gps.get(3))
    if lat is None or lon is None or abs(lat) > 90 or abs(lon) > 180 or (lat == 0 and lon == 0):
        return None, None
    return round(lat, 7), round(lon, 7)


def _exif_fields(img: Image.Image, meta: PhotoMetadata) -> None:
    exif = img.getexif()
    sub = exif.get_ifd(EXIF_IFD)
    meta.taken = parse_exif_date(sub.get(DATETIME_ORIGINAL)) or parse_exif_date(exif.get(DATETIME))
    if meta.taken:
        meta.date_source = "exif"
        meta.taken_offset = parse_offset(sub.get(OFFSET_TIME_ORIGINAL))
    meta.camera_make, meta.camera_model = _text(exif.get(MAKE)), _text(exif.get(MODEL))
    meta.lat, meta.lon = _gps(exif)


def _raw_fields(path: str, meta: PhotoMetadata) -> None:
    """A camera RAW's format (its extension: ``DNG``, ``NEF``, ...) and sensor size (LibRaw);
    its EXIF is read by Pillow where the RAW is TIFF-based (DNG, NEF, CR2, ARW, ...)."""
    meta.format = os.path.splitext(path)[1].lstrip(".").upper()
    if not raw_available():
        return
    import rawpy

    try:
        with rawpy.imread(path) as raw:
            meta.width, meta.height = int(raw.sizes.width), int(raw.sizes.height)
    except (rawpy.LibRawError, OSError) as e:
        log.debug("%s: no RAW sizes (%s)", path, e)


def read_metadata(source: str | bytes, mtime_ns: int | None = None) -> PhotoMetadata:
    """The metadata of one image file (a path) or of its bytes. Reads the header only (no pixel
    decoding). ``mtime_ns`` (the file's modification time in ns; stat'ed for a path when None)
    dates a photo without an EXIF date. Never raises for a damaged or missing file: what could
    be read is returned (possibly nothing but the mtime date)."""
    meta = PhotoMetadata()
    if isinstance(source, str) and is_raw_name(source):
        _raw_fields(source, meta)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if meta.format is None:  # a TIFF-based RAW opens as its first IFD: keep LibRaw's figures
                meta.width, meta.height, meta.format = img.width, img.height, img.format
            try:
                _exif_fields(img, meta)
            except Exception as e:  # damaged EXIF: size and format are still good
                log.debug("%s: unreadable EXIF (%s)", "bytes" if isinstance(source, bytes) else source, e)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        log.debug("%s: no metadata (%s)", "bytes" if isinstance(source, bytes) else source, e)
    if meta.taken is None:
        if mtime_ns is None and isinstance(source, str):
            try:
                mtime_ns = os.stat(source).st_mtime_ns
            except OSError:
                mtime_ns = None
        if mtime_ns:
            meta.taken = datetime.fromtimestamp(mtime_ns / 1e9).replace(microsecond=0).isoformat()
            meta.date_source = "mtime"
    return meta
