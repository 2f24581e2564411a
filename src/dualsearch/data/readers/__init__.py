"""Readers for image-caption collections, one module per format, all behind :func:`read_dataset`.

Each format module defines a :class:`~.base.Format`; :data:`REGISTRY` (name -> Format, in the
order of :data:`FORMATS`) is the one place that feeds format detection, :func:`read_dataset`'s
dispatch and the command line's ``--format`` choices (:data:`FORMATS`).

Every reader yields :class:`ImageCaption` records grouped by image, in the order images first
appear in the source. Records whose image is missing or whose captions are all empty are left
out and reported through a :class:`SkipLog`; they never stop the read.
"""
from __future__ import annotations

import os
from collections import OrderedDict

from ...storage import os_reason
from .base import CaptionDataset, DataError, Format
from .coco import COCO, read_coco
from .folder import FOLDER, list_images, read_folder
from .hf import HF, read_hf
from .table import CSV, IMAGEFOLDER, JSONL, TSV, read_imagefolder, read_table
from .tfrecord import TFRECORD, read_tfrecords
from .webdataset import WEBDATASET, expand_shards, read_webdataset


def _build_registry(*formats: Format) -> "OrderedDict[str, Format]":
    registry: OrderedDict[str, Format] = OrderedDict()
    claimed: dict[str, str] = {}
    for f in formats:
        if f.name in registry or f.name == "auto":
            raise ValueError(f"format {f.name!r} registered twice")
        for suffix in f.suffixes:
            if suffix in claimed:
                raise ValueError(f"suffix {suffix!r} claimed by both {claimed[suffix]!r} and {f.name!r}")
            claimed[suffix] = f.name
        registry[f.name] = f
    return registry


REGISTRY: "OrderedDict[str, Format]" = _build_registry(COCO, CSV, TSV, JSONL, WEBDATASET, FOLDER, TFRECORD, HF,
                                                       IMAGEFOLDER)
FORMATS: tuple[str, ...] = ("auto", *REGISTRY)


def detect_format(source: str | os.PathLike) -> str:
    """The registered format name of ``source``.

    A folder goes to the first format (lowest ``folder_priority``) whose ``detect_folder`` accepts
    it; a file name to the format claiming its suffix, else to one whose ``name_match`` accepts it.
    Raises :class:`DataError` if no format claims the name.
    """
    s = str(source)
    if os.path.isdir(s):
        for f in sorted((f for f in REGISTRY.values() if f.detect_folder), key=lambda f: f.folder_priority):
            if f.detect_folder(s):
                return f.name
    else:
        low = s.lower()
        for f in REGISTRY.values():
            if f.suffixes and low.endswith(f.suffixes):
                return f.name
        for f in REGISTRY.values():
            if f.name_match and f.name_match(s):
                return f.name
    raise DataError(f"{source}: cannot tell the data format from the name; pass --format "
                    f"({', '.join(FORMATS[1:])})")


def read_dataset(source: str | os.PathLike, images: str | os.PathLike | None = None, fmt: str = "auto",
                 path_column: str | None = None, caption_column: str | None = None,
                 captions_per_image: int | None = None) -> CaptionDataset:
    """Read any supported image-caption source (see :data:`FORMATS`; ``auto``: :func:`detect_format`).

    ``images`` is the image folder tables and COCO files resolve paths against; ``path_column`` /
    ``caption_column`` name table (or Parquet image/caption) columns. Raises :class:`DataError` for
    an unknown format, a missing source or one that cannot be read at all.
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not any(ch in str(source) for ch in "*?{"):
        try:
            os.stat(source)
        except OSError as e:  # "permission denied" is not "no such file"
            raise DataError(f"{source}: {os_reason(e)}") from e
    if fmt == "auto":
        fmt = detect_format(source)
    return REGISTRY[fmt].read(source, images, path_column=path_column, caption_column=caption_column,
                              captions_per_image=captions_per_image)


__all__ = ["CaptionDataset", "DataError", "FORMATS", "Format", "REGISTRY", "detect_format", "expand_shards",
           "list_images", "read_coco", "read_dataset", "read_folder", "read_hf", "read_imagefolder", "read_table",
           "read_tfrecords", "read_webdataset"]
