"""Hugging Face datasets stored locally as Parquet or Arrow files."""
from __future__ import annotations

import glob
import hashlib
import os
from collections import OrderedDict
from pathlib import Path

from ..records import ImageRef, SkipLog
from .base import CAPTION_COLUMNS, IMAGE_COLUMNS, CaptionDataset, DataError, Format, file_ref, finish, pick_column


def hf_files(source: str) -> list[str]:
    """``source`` itself if it is a file, else every ``*.parquet`` / ``*.arrow`` below it (sorted)."""
    if os.path.isfile(source):
        return [source]
    found = [p for ext in ("parquet", "arrow") for p in glob.glob(os.path.join(source, "**", f"*.{ext}"),
                                                                  recursive=True)]
    return sorted(found)


def _arrow_table(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.read_table(path)
    with open(path, "rb") as f:  # datasets' save_to_disk writes the Arrow stream format
        try:
            return pa.ipc.open_stream(f).read_all()
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_file(f).read_all()


def read_hf(source: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None,
            captions_per_image: int | None = None) -> CaptionDataset:
    """A Hugging Face dataset stored locally as Parquet or Arrow files: an image column (``{bytes,
    path}`` structs as ``datasets.Image`` stores them, raw bytes, or paths) and one or more caption
    columns (``--caption-column a,b``; a cell may hold a list). Image bytes are kept in memory.

    Raises :class:`DataError` if there is no Parquet/Arrow file or a column cannot be found; an
    unreadable file is skipped and reported."""
    files = hf_files(str(source))
    if not files:
        raise DataError(f"{source}: no Parquet or Arrow files found")
    skipped = SkipLog()
    groups: OrderedDict[str, list] = OrderedDict()
    refs: dict[str, ImageRef | None] = {}
    for path in files:
        try:
            table = _arrow_table(path)
        except Exception as e:  # pyarrow raises several error types for damaged files
            skipped.add(path, f"unreadable file: {e}")
            continue
        columns = table.column_names
        icol = pick_column(columns, image_column, IMAGE_COLUMNS, "path", Path(path))
        ccols = ([c.strip() for c in caption_column.split(",")] if caption_column
                 else [pick_column(columns, None, CAPTION_COLUMNS, "caption", Path(path))])
        for c in ccols:
            pick_column(columns, c, (), "caption", Path(path))
        images = table.column(icol).to_pylist()
        caps = [table.column(c).to_pylist() for c in ccols]
        for i, cell in enumerate(images):
            key, ref = _hf_image(cell, path, i)
            if key is None:
                skipped.add(f"{path}::row {i}", "no image in the row")
                continue
            refs.setdefault(key, ref)
            for col in caps:
                v = col[i]
                groups.setdefault(key, []).extend(v if isinstance(v, list) else [v])
    return finish(groups, refs, skipped, str(source), captions_per_image)


def _hf_image(cell, path: str, row: int) -> tuple[str | None, ImageRef | None]:
    if isinstance(cell, dict):
        data, rel = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, (bytes, bytearray)):
        data, rel = bytes(cell), None
    else:
        data, rel = None, cell
    if data:
        return hashlib.sha1(data).hexdigest(), ImageRef(path, member=f"row {row}", data=bytes(data))
    if rel:
        full = rel if os.path.isabs(rel) else os.path.join(os.path.dirname(path), rel)
        return full, file_ref(Path(full))
    return None, None


def _read(source, images=None, path_column=None, caption_column=None, captions_per_image=None) -> CaptionDataset:
    return read_hf(source, path_column, caption_column, captions_per_image)


def _has_hf_files(folder: str) -> bool:
    return bool(hf_files(folder))


HF = Format("hf", _read, suffixes=(".parquet", ".arrow"), detect_folder=_has_hf_files, folder_priority=40,
            help="Hugging Face dataset as local Parquet/Arrow files (--path-column names the image column)")
