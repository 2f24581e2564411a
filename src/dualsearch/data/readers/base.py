"""What every reader shares: the error type, the dataset, the record-building helpers and
:class:`Format`, the description each format module registers.

Every reader yields :class:`ImageCaption` records grouped by image, in the order images first
appear in the source. Records whose image is missing or whose captions are all empty are left
out and reported through a :class:`SkipLog`; they never stop the read.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from ...errors import DualsearchError
from ..records import ImageCaption, ImageRef, SkipLog, normalize_caption

log = logging.getLogger("dualsearch.data.readers")

PATH_COLUMNS = ("filepath", "image", "image_path", "path", "file_name", "filename", "file", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "sentence", "txt")
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "picture")


class DataError(DualsearchError):
    """A data source that cannot be read at all (as opposed to single bad records)."""


@dataclass
class CaptionDataset:
    """Records read from one source plus what was left out of it."""

    records: list[ImageCaption]
    skipped: SkipLog = field(default_factory=SkipLog)
    source: str = ""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_captions(self) -> int:
        return sum(len(r.captions) for r in self.records)


Reader = Callable[..., CaptionDataset]


@dataclass(frozen=True)
class Format:
    """One registered data format.

    ``read(source, images=None, path_column=None, caption_column=None, captions_per_image=None)``
    reads it (arguments a format has no use for are ignored). ``suffixes`` (lower case, with the
    dot) identify a file of this format by name; ``detect_folder(path) -> bool`` says whether a
    folder holds it (folders are tried in ascending ``folder_priority``); ``name_match(path) ->
    bool`` is an extra test on a name no suffix claims (e.g. a brace pattern).
    """

    name: str
    read: Reader
    suffixes: tuple[str, ...] = ()
    detect_folder: Optional[Callable[[str], bool]] = None
    help: str = ""
    folder_priority: int = 50
    name_match: Optional[Callable[[str], bool]] = None


def clean_captions(captions: Iterable[object]) -> tuple[str, ...]:
    """Normalized, non-empty captions; ``None`` and NaN cells are dropped."""
    out = []
    for c in captions:
        if c is None or (isinstance(c, float) and np.isnan(c)):
            continue
        text = normalize_caption(str(c))
        if text:
            out.append(text)
    return tuple(out)


def finish(groups: "OrderedDict[str, list]", refs: dict[str, ImageRef | None], skipped: SkipLog,
           source: str, captions_per_image: int | None) -> CaptionDataset:
    """Turn grouped raw captions into records, skipping missing images and empty caption lists.

    ``groups`` maps an image key to its raw captions, ``refs`` the same key to its image (``None``
    or absent: missing). Keeps at most ``captions_per_image`` captions per image, reports
    ``skipped`` in the log and returns the dataset.
    """
    records = []
    for key, raw in groups.items():
        ref = refs.get(key)
        if ref is None:
            skipped.add(key, "missing image")
            continue
        caps = clean_captions(raw)
        if not caps:
            skipped.add(key, "no non-empty caption")
            continue
        if captions_per_image:
            caps = caps[:captions_per_image]
        records.append(ImageCaption(ref, caps))
    ds = CaptionDataset(records, skipped, source)
    skipped.report(source)
    log.info("%s: %d images, %d captions", source, len(ds), ds.num_captions)
    return ds


def file_ref(path: Path) -> ImageRef | None:
    """An :class:`ImageRef` to ``path`` if it is a file, else ``None`` (missing image)."""
    return ImageRef(str(path)) if path.is_file() else None


def pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str,
                source: Path) -> str:
    """``wanted`` if given, else the first of ``candidates`` found among ``columns``.

    Raises :class:`DataError` if ``wanted`` is not a column or no candidate is.
    """
    if wanted:
        if wanted not in columns:
            raise DataError(f"{source}: no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise DataError(f"{source}: cannot find a {what} column among {', '.join(columns)}; "
                    f"name it with --{what}-column")


def read_containers(files: Sequence[str], scan: Callable[[str, OrderedDict, dict, SkipLog], None], source: str,
                    what: str, captions_per_image: int | None) -> CaptionDataset:
    """Records from container files (tar shards, TFRecords) that ``scan`` adds into shared groups.

    Raises :class:`DataError` if ``files`` is empty.
    """
    if not files:
        raise DataError(f"{source}: no {what} found")
    skipped = SkipLog()
    groups: OrderedDict[str, list] = OrderedDict()
    refs: dict[str, ImageRef] = {}
    for f in files:
        scan(f, groups, refs, skipped)
    return finish(groups, refs, skipped, source, captions_per_image)
