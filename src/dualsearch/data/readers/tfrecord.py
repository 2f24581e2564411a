"""The reference's TFRecord shards, read without TensorFlow.

Each record is framed as: uint64 length (little-endian), uint32 masked CRC32C of those 8 bytes,
``length`` bytes of data, uint32 masked CRC32C of the data. The data is a ``tf.train.Example``
protobuf; the reference stores one record per caption, with features ``caption`` (bytes) and
``raw_image`` (JPEG bytes), 2,000 images per file. Records of the same image (identical bytes) are
grouped into one :class:`ImageCaption`; the image is read back later straight from the file
(offset + size), so nothing is held in memory.

A record whose data CRC fails is skipped and reported; a broken length field ends the read of that
file (the framing cannot be trusted after it), keeping what was read before.
"""
from __future__ import annotations

import glob
import hashlib
import os
import struct
from collections import OrderedDict
from typing import Iterator

from ..records import ImageRef, SkipLog
from .base import CaptionDataset, Format, read_containers

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C TFRecord framing uses (``google_crc32c`` must be installed)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def frame(data: bytes) -> bytes:
    """One TFRecord frame around ``data`` (used by tests and by anyone writing shards)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def iter_records(path: str, skipped: SkipLog) -> Iterator[tuple[int, bytes]]:
    """(absolute offset of the data, data) for each record with a valid CRC.

    Never raises for bad framing: a record with a bad data CRC is skipped, a broken header ends the
    file; both are recorded in ``skipped``. Raises :class:`OSError` if the file cannot be opened.
    """
    with open(path, "rb") as f:
        index = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                skipped.add(f"{path}#{index}", "broken tfrecord: truncated header; read up to here")
                return
            length, length_crc = struct.unpack("<QI", head)
            if masked_crc32c(head[:8]) != length_crc:
                skipped.add(f"{path}#{index}", "broken tfrecord: bad length CRC; read up to here")
                return
            offset = f.tell()
            data = f.read(length)
            tail = f.read(4)
            if len(data) < length or len(tail) < 4:
                skipped.add(f"{path}#{index}", "broken tfrecord: truncated record; read up to here")
                return
            if masked_crc32c(data) != struct.unpack("<I", tail)[0]:
                skipped.add(f"{path}#{index}", "corrupt record: bad data CRC")
            else:
                yield offset, data
            index += 1


# ----------------------------------------------------------------------------- protobuf wire format
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end or the varint value) of a message slice."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("field runs past its message")
            yield field, wire, pos, pos + n
            pos += n
        elif wire == 0:
            v, pos = _varint(buf, pos)
            yield field, wire, v, v
        elif wire == 5:
            yield field, wire, pos, pos + 4
            pos += 4
        elif wire == 1:
            yield field, wire, pos, pos + 8
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wire}")


def parse_example_bytes(buf: bytes) -> dict[str, list[tuple[int, int]]]:
    """The bytes features of a ``tf.train.Example``: name -> [(start, end) of each value in ``buf``].

    Example{features=1: Features{feature=1: map<string, Feature>}}; Feature{bytes_list=1:
    BytesList{value=1: repeated bytes}} (float and int64 lists are ignored). Raises
    :class:`ValueError` (or :class:`UnicodeDecodeError` for a key) on a malformed message."""
    out: dict[str, list[tuple[int, int]]] = {}
    for f1, w1, s1, e1 in _fields(buf, 0, len(buf)):
        if f1 != 1 or w1 != 2:
            continue
        for f2, w2, s2, e2 in _fields(buf, s1, e1):  # Features
            if f2 != 1 or w2 != 2:
                continue
            key, value = None, None
            for f3, w3, s3, e3 in _fields(buf, s2, e2):  # map entry
                if f3 == 1 and w3 == 2:
                    key = buf[s3:e3].decode("utf-8")
                elif f3 == 2 and w3 == 2:
                    value = (s3, e3)
            if key is None or value is None:
                continue
            spans = []
            for f4, w4, s4, e4 in _fields(buf, *value):  # Feature
                if f4 == 1 and w4 == 2:  # bytes_list
                    spans += [(s5, e5) for f5, w5, s5, e5 in _fields(buf, s4, e4) if f5 == 1 and w5 == 2]
            out[key] = spans
    return out


def scan_tfrecord(path: str, groups: OrderedDict, refs: dict, skipped: SkipLog, caption_key: str = "caption",
                  image_key: str = "raw_image") -> None:
    """Add the records of one file: captions grouped under the sha1 of their image bytes.

    Never raises for a bad file: unreadable files and corrupt records are recorded in ``skipped``.
    """
    try:
        for n, (offset, data) in enumerate(iter_records(path, skipped)):
            try:
                feats = parse_example_bytes(data)
            except (ValueError, UnicodeDecodeError) as e:
                skipped.add(f"{path}@{offset}", f"corrupt record: not a tf.train.Example ({e})")
                continue
            if not feats.get(image_key):
                skipped.add(f"{path}@{offset}", f"record without {image_key!r}")
                continue
            s, e = feats[image_key][0]
            key = hashlib.sha1(data[s:e]).hexdigest()
            if key not in refs:
                refs[key] = ImageRef(path, member=f"record {n}", offset=offset + s, size=e - s)
            groups.setdefault(key, []).extend(data[a:b].decode("utf-8", "replace")
                                              for a, b in feats.get(caption_key, []))
    except OSError as e:
        skipped.add(path, f"unreadable file: {e.strerror or e}")


def expand_tfrecords(spec: str | os.PathLike) -> list[str]:
    """TFRecord files from a folder (``*.tfrecord``, ``*.tfrec``), a glob or one path."""
    spec = str(spec)
    if os.path.isdir(spec):
        return sorted(p for p in glob.glob(os.path.join(spec, "*")) if p.endswith((".tfrecord", ".tfrec")))
    return sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]


def read_tfrecords(source: str | os.PathLike, captions_per_image: int | None = None) -> CaptionDataset:
    """The reference's TFRecord shards (a file, a folder or a glob; see the module docstring).

    Raises :class:`DataError` if ``source`` names no file; bad records are skipped and reported.
    """
    return read_containers(expand_tfrecords(source), scan_tfrecord, str(source), "TFRecord files",
                           captions_per_image)


def _read(source, images=None, path_column=None, caption_column=None, captions_per_image=None) -> CaptionDataset:
    return read_tfrecords(source, captions_per_image)


def _has_tfrecords(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "*.tfrecord")) or glob.glob(os.path.join(folder, "*.tfrec")))


TFRECORD = Format("tfrecord", _read, suffixes=(".tfrecord", ".tfrec"), detect_folder=_has_tfrecords,
                  folder_priority=20, help="TFRecord shards of tf.train.Example (caption, raw_image)")
