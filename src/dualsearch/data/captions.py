"""Readers for image-caption collections, all behind :func:`read_dataset`.

Every reader yields :class:`ImageCaption` records grouped by image, in the order images first
appear in the source. Records whose image is missing or whose captions are all empty are left
out and reported through a :class:`SkipLog`; they never stop the read.
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .records import ImageCaption, ImageRef, SkipLog, normalize_caption

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
PATH_COLUMNS = ("filepath", "image", "image_path", "path", "file_name", "filename", "file", "img")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "sentence", "txt")
FORMATS = ("auto", "coco", "csv", "tsv", "jsonl", "webdataset", "folder", "tfrecord", "hf", "imagefolder")
IMAGE_COLUMNS = ("image", "img", "jpg", "png", "picture")


class DataError(ValueError):
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


def _clean_captions(captions: Iterable[object]) -> tuple[str, ...]:
    out = []
    for c in captions:
        if c is None or (isinstance(c, float) and np.isnan(c)):
            continue
        text = normalize_caption(str(c))
        if text:
            out.append(text)
    return tuple(out)


def _finish(groups: "OrderedDict[str, list]", refs: dict[str, ImageRef | None], skipped: SkipLog,
            source: str, captions_per_image: int | None) -> CaptionDataset:
    """Turn grouped raw captions into records, skipping missing images and empty caption lists."""
    records = []
    for key, raw in groups.items():
        ref = refs.get(key)
        if ref is None:
            skipped.add(key, "missing image")
            continue
        caps = _clean_captions(raw)
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


def _file_ref(path: Path) -> ImageRef | None:
    return ImageRef(str(path)) if path.is_file() else None


def read_coco(captions_json: str | os.PathLike, image_root: str | os.PathLike,
              captions_per_image: int | None = None) -> CaptionDataset:
    """MS-COCO captions JSON (``images[].{id,file_name}``, ``annotations[].{image_id,caption}``)."""
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
    refs = {name: _file_ref(root / name) for name in groups}
    return _finish(groups, refs, skipped, str(captions_json), captions_per_image)


def _pick_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str,
                 source: Path) -> str:
    if wanted:
        if wanted not in columns:
            raise DataError(f"{source}: no {what} column {wanted!r} (columns: {', '.join(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise DataError(f"{source}: cannot find a {what} column among {', '.join(columns)}; "
                    f"name it with --{what}-column")


def _table_rows(path: Path, fmt: str) -> tuple[list[str], Iterable[dict]]:
    if fmt == "jsonl":
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
        columns = list(OrderedDict.fromkeys(k for r in rows for k in r))
        return columns, rows
    delimiter = "\t" if fmt == "tsv" else ","
    f = path.open(encoding="utf-8", newline="")
    reader = csv.DictReader(f, delimiter=delimiter)
    columns = list(reader.fieldnames or [])
    rows = list(reader)
    f.close()
    return columns, rows


def read_table(path: str | os.PathLike, image_root: str | os.PathLike | None = None, fmt: str = "auto",
               path_column: str | None = None, caption_column: str | None = None,
               captions_per_image: int | None = None) -> CaptionDataset:
    """CSV / TSV / JSONL with a path column and a caption column; several rows per image allowed.

    Relative paths resolve against ``image_root`` (default: the table's folder). A JSONL caption
    cell may hold a list of captions.
    """
    path = Path(path)
    if fmt == "auto":
        fmt = {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(path.suffix.lower(), "csv")
    try:
        columns, rows = _table_rows(path, fmt)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    pcol = _pick_column(columns, path_column, PATH_COLUMNS, "path", path)
    ccol = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", path)
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
    refs = {name: _file_ref(root / name) for name in groups}
    return _finish(groups, refs, skipped, str(path), captions_per_image)


def expand_shards(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard list from a folder, a glob, a brace pattern (``shard-{000..009}.tar``) or a list."""
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in expand_shards(item)]
    spec = str(spec)
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    import braceexpand  # installed with webdataset

    out = []
    for part in braceexpand.braceexpand(spec):
        out.extend(sorted(glob.glob(part)) if any(ch in part for ch in "*?[") else [part])
    return out


def _wds_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    directory, base = os.path.split(member_name)
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _scan_shard(shard: str, groups: OrderedDict, refs: dict, skipped: SkipLog) -> None:
    try:
        file_size = os.path.getsize(shard)
        with tarfile.open(shard, "r:") as tar:
            while True:
                try:
                    member = tar.next()
                except tarfile.TarError as e:
                    skipped.add(shard, f"broken tar: {e}; read up to here")
                    break
                if member is None:
                    _check_tail(shard, tar.offset, file_size, skipped)
                    break
                if not member.isfile():
                    continue
                key, ext = _wds_key(member.name)
                key = f"{os.path.basename(shard)}/{key}"
                if member.offset_data + member.size > file_size:
                    skipped.add(f"{shard}::{member.name}", "broken tar member: truncated")
                    break
                if "." + ext in IMAGE_EXTENSIONS:
                    refs[key] = ImageRef(shard, member.name, member.offset_data, member.size)
                    groups.setdefault(key, [])
                elif ext in ("txt", "caption", "text"):
                    f = tar.extractfile(member)
                    data = f.read() if f else b""
                    if len(data) != member.size:
                        skipped.add(f"{shard}::{member.name}", "broken tar member: truncated caption")
                        continue
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        skipped.add(f"{shard}::{member.name}", "broken tar member: caption is not UTF-8")
                        continue
                    groups.setdefault(key, []).extend(text.splitlines())
    except (OSError, tarfile.TarError) as e:
        skipped.add(shard, f"unreadable shard: {e}")


def _check_tail(shard: str, offset: int, file_size: int, skipped: SkipLog) -> None:
    """tarfile stops quietly at a cut-off header; anything but zero padding after the last
    member means the shard was truncated or damaged there."""
    if offset >= file_size:
        return
    with open(shard, "rb") as f:
        f.seek(offset)
        if f.read(1 << 20).strip(b"\0"):
            skipped.add(shard, f"broken tar: damaged or truncated after byte {offset}; read up to here")


def read_webdataset(shards: str | os.PathLike | Sequence[str],
                    captions_per_image: int | None = None) -> CaptionDataset:
    """WebDataset tar shards: ``key.jpg|png|webp`` + ``key.txt`` (one caption a line)."""
    return _read_containers(expand_shards(shards), _scan_shard, str(shards), "WebDataset shards",
                            captions_per_image)


def _read_containers(files: Sequence[str], scan, source: str, what: str,
                     captions_per_image: int | None) -> CaptionDataset:
    """Records from container files (tar shards, TFRecords) that ``scan`` adds into shared groups."""
    if not files:
        raise DataError(f"{source}: no {what} found")
    skipped = SkipLog()
    groups: OrderedDict[str, list] = OrderedDict()
    refs: dict[str, ImageRef] = {}
    for f in files:
        scan(f, groups, refs, skipped)
    return _finish(groups, refs, skipped, source, captions_per_image)


def list_images(root: str | os.PathLike, exclude: Sequence[str] = ()) -> list[Path]:
    """All image files below ``root`` (recursively, sorted), skipping hidden files and folders."""
    import fnmatch

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
    """A folder of images with optional same-name ``.txt`` captions (one a line)."""
    groups: OrderedDict[str, list] = OrderedDict()
    refs = {}
    for p in list_images(root):
        txt = p.with_suffix(".txt")
        key = str(p)
        groups[key] = txt.read_text(encoding="utf-8", errors="replace").splitlines() if txt.is_file() else []
        refs[key] = ImageRef(key)
    return _finish(groups, refs, SkipLog(), str(root), captions_per_image)


def read_tfrecords(source: str | os.PathLike, captions_per_image: int | None = None) -> CaptionDataset:
    """The reference's TFRecord shards (see :mod:`dualsearch.data.tfrecord`)."""
    from .tfrecord import expand_tfrecords, scan_tfrecord

    return _read_containers(expand_tfrecords(source), scan_tfrecord, str(source), "TFRecord files",
                            captions_per_image)


def _hf_files(source: str) -> list[str]:
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
    columns (``--caption-column a,b``; a cell may hold a list). Image bytes are kept in memory."""
    files = _hf_files(str(source))
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
        icol = _pick_column(columns, image_column, IMAGE_COLUMNS, "path", Path(path))
        ccols = ([c.strip() for c in caption_column.split(",")] if caption_column
                 else [_pick_column(columns, None, CAPTION_COLUMNS, "caption", Path(path))])
        for c in ccols:
            _pick_column(columns, c, (), "caption", Path(path))
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
    return _finish(groups, refs, skipped, str(source), captions_per_image)


def _hf_image(cell, path: str, row: int) -> tuple[str | None, ImageRef | None]:
    if isinstance(cell, dict):
        data, rel = cell.get("bytes"), cell.get("path")
    elif isinstance(cell, (bytes, bytearray)):
        data, rel = bytes(cell), None
    else:
        data, rel = None, cell
    if data:
        import hashlib

        return hashlib.sha1(data).hexdigest(), ImageRef(path, member=f"row {row}", data=bytes(data))
    if rel:
        full = rel if os.path.isabs(rel) else os.path.join(os.path.dirname(path), rel)
        return full, _file_ref(Path(full))
    return None, None


def detect_format(source: str | os.PathLike) -> str:
    s = str(source)
    if os.path.isdir(s):
        if glob.glob(os.path.join(s, "*.tar")):
            return "webdataset"
        if glob.glob(os.path.join(s, "*.tfrecord")) or glob.glob(os.path.join(s, "*.tfrec")):
            return "tfrecord"
        if os.path.isfile(os.path.join(s, "metadata.jsonl")) or os.path.isfile(os.path.join(s, "metadata.csv")):
            return "imagefolder"
        if _hf_files(s):
            return "hf"
        return "folder"
    low = s.lower()
    if low.endswith((".tfrecord", ".tfrec")):
        return "tfrecord"
    if low.endswith((".parquet", ".arrow")):
        return "hf"
    if low.endswith(".tar") or "{" in s:
        return "webdataset"
    if low.endswith(".json"):
        return "coco"
    if low.endswith(".jsonl"):
        return "jsonl"
    if low.endswith(".tsv"):
        return "tsv"
    if low.endswith(".csv"):
        return "csv"
    raise DataError(f"{source}: cannot tell the data format from the name; pass --format "
                    f"({', '.join(FORMATS[1:])})")


def read_dataset(source: str | os.PathLike, images: str | os.PathLike | None = None, fmt: str = "auto",
                 path_column: str | None = None, caption_column: str | None = None,
                 captions_per_image: int | None = None) -> CaptionDataset:
    """Read any supported image-caption source (see :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not any(ch in str(source) for ch in "*?{") and not os.path.exists(source):
        raise DataError(f"{source}: no such file or folder")
    if fmt == "auto":
        fmt = detect_format(source)
    if fmt == "coco":
        if images is None:
            raise DataError(f"{source}: a COCO captions file needs the image folder (--images)")
        return read_coco(source, images, captions_per_image)
    if fmt in ("csv", "tsv", "jsonl"):
        return read_table(source, images, fmt, path_column, caption_column, captions_per_image)
    if fmt == "webdataset":
        return read_webdataset(source, captions_per_image)
    if fmt == "tfrecord":
        return read_tfrecords(source, captions_per_image)
    if fmt == "imagefolder":  # a Hugging Face imagefolder: metadata.jsonl/csv next to the images
        meta = Path(source) / "metadata.jsonl"
        meta = meta if meta.is_file() else Path(source) / "metadata.csv"
        return read_table(meta, source, "auto", path_column or "file_name", caption_column, captions_per_image)
    if fmt == "hf":
        return read_hf(source, path_column, caption_column, captions_per_image)
    return read_folder(source, captions_per_image)


def split_records(records: Sequence[ImageCaption], fractions: dict[str, float], seed: int = 0
                  ) -> dict[str, list[ImageCaption]]:
    """Deterministic split by image: sizes follow ``fractions`` exactly (rounded), the assignment
    depends only on the seed and the set of image names, never on input order, and no image's
    captions straddle two splits."""
    total = sum(fractions.values())
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise ValueError(f"bad split fractions {fractions}")
    by_name = {r.name: r for r in records}
    names = sorted(by_name)
    order = np.random.default_rng(seed).permutation(len(names))
    out, start, acc = {}, 0, 0.0
    for i, (split, frac) in enumerate(fractions.items()):
        acc += frac / total
        end = len(names) if i == len(fractions) - 1 else int(round(acc * len(names)))
        chosen = sorted(order[start:end])
        out[split] = [by_name[names[j]] for j in chosen]
        start = end
    return out
