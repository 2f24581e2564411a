"""Tables of (image path, caption) rows: CSV, TSV, JSON Lines, and Hugging Face ``imagefolder``
(``metadata.jsonl`` / ``metadata.csv`` next to the images)."""
from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

from ..records import SkipLog
from .base import CAPTION_COLUMNS, PATH_COLUMNS, CaptionDataset, DataError, Format, file_ref, finish, pick_column


def _jsonl_rows(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:  # -sig: a byte-order mark (spreadsheets, Notepad) is not data
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object with path and caption fields, "
                                f"got {type(row).__name__}")
            rows.append({str(k).strip(): v for k, v in row.items()})
    return rows


def _table_rows(path: Path, fmt: str) -> tuple[list[str], Iterable[dict]]:
    """(column names, rows as dicts) of a CSV / TSV / JSONL file, read as UTF-8 with or without a
    byte-order mark; names are stripped of surrounding whitespace."""
    if fmt == "jsonl":
        rows = _jsonl_rows(path)
        return list(OrderedDict.fromkeys(k for r in rows for k in r)), rows
    delimiter = "\t" if fmt == "tsv" else ","
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        columns = [str(c).strip() for c in (reader.fieldnames or [])]
        reader.fieldnames = columns
        rows = list(reader)
    return columns, rows


def read_table(path: str | os.PathLike, image_root: str | os.PathLike | None = None, fmt: str = "auto",
               path_column: str | None = None, caption_column: str | None = None,
               captions_per_image: int | None = None) -> CaptionDataset:
    """CSV / TSV / JSONL with a path column and a caption column; several rows per image allowed.

    Relative paths resolve against ``image_root`` (default: the table's folder). A JSONL caption
    cell may hold a list of captions. ``fmt`` is ``csv``, ``tsv``, ``jsonl`` or ``auto`` (by
    suffix). Raises :class:`DataError` if the file cannot be read or a column cannot be found.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix.lower(), "csv")
    try:
        columns, rows = _table_rows(path, fmt)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    pcol = pick_column(columns, path_column, PATH_COLUMNS, "path", path)
    ccol = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", path)
    root = Path(image_root) if image_root else path.parent
    skipped = SkipLog()
    groups: OrderedDict[str, list] = OrderedDict()
    for i, row in enumerate(rows):
        name = row.get(pcol)
        if not name:
            skipped.add(f"row {i + 1}", "empty path")
            continue
        cell = row.get(ccol)
        groups.setdefault(str(name), []).extend(cell if isinstance(cell, list) else [cell])
    refs = {name: file_ref(root / name) for name in groups}
    return finish(groups, refs, skipped, str(path), captions_per_image)


def read_imagefolder(source: str | os.PathLike, path_column: str | None = None, caption_column: str | None = None,
                     captions_per_image: int | None = None) -> CaptionDataset:
    """A Hugging Face ``imagefolder``: ``metadata.jsonl`` (or ``metadata.csv``) next to the images,
    with a ``file_name`` column unless ``path_column`` says otherwise. Raises :class:`DataError`
    as :func:`read_table` does."""
    meta = Path(source) / "metadata.jsonl"
    meta = meta if meta.is_file() else Path(source) / "metadata.csv"
    return read_table(meta, source, "auto", path_column or "file_name", caption_column, captions_per_image)


def _has_metadata(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in ("metadata.jsonl", "metadata.csv"))


def _table_format(fmt: str, suffix: str, text: str) -> Format:
    def read(source, images=None, path_column=None, caption_column=None, captions_per_image=None) -> CaptionDataset:
        return read_table(source, images, fmt, path_column, caption_column, captions_per_image)

    return Format(fmt, read, suffixes=(suffix,), help=text)


def _read_imagefolder(source, images=None, path_column=None, caption_column=None,
                      captions_per_image=None) -> CaptionDataset:
    return read_imagefolder(source, path_column, caption_column, captions_per_image)


CSV = _table_format("csv", ".csv", "CSV table with a path and a caption column")
TSV = _table_format("tsv", ".tsv", "tab-separated table with a path and a caption column")
JSONL = _table_format("jsonl", ".jsonl", "JSON Lines with a path and a caption (or caption list) field")
IMAGEFOLDER = Format("imagefolder", _read_imagefolder, detect_folder=_has_metadata, folder_priority=30,
                     help="Hugging Face imagefolder: metadata.jsonl/csv next to the images")
