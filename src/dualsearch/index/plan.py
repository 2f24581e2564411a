"""The indexing plan, shared by both runners (as clip-retrieval's reader -> mapper -> writer):

1. **list** what a source names (:func:`list_inputs`): a folder of images, a folder or pattern of
   WebDataset shards, or a text file listing paths and URIs;
2. **diff** it against the catalog (:func:`diff`): files new or changed since they were cataloged,
   tar shards not ingested at their current size and mtime, catalog rows whose file is gone;
3. **cut** what is to embed into parts (:func:`make_parts`): ``shard_size`` files, or one tar shard,
   each named by a hash of what it holds and of the model, so that a re-run cuts the same parts.

The local runner (:mod:`.local`) embeds ``Plan.todo`` in one process; the Spark runner
(:mod:`.spark`) embeds the parts on executors. Both write into the catalog and end in
:func:`dualsearch.index.build.finish`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence
from urllib.parse import unquote, urlparse

from ..data.images import is_uri
from ..data.readers import DataError
from ..data.readers.folder import Listing, excluded, walk_images
from ..data.readers.webdataset import expand_shards
from ..errors import UsageError
from ..storage import os_reason
from .catalog import Catalog

SHARD_PREFIX = "part-"
TAR_META = "tar:"  # catalog meta key prefix: tar shard path -> "size:mtime_ns" once ingested
PART_META = "part:"  # catalog meta key prefix: shard name -> rows, once ingested


class Entry(NamedTuple):
    """A listed input: a path or URI with its size and mtime (URIs: 0, 0; a file that cannot be
    stat'ed: size -1, and the runner records why)."""

    path: str
    size: int
    mtime_ns: int


@dataclass
class Inputs:
    files: list[Entry]
    tars: list[Entry] = field(default_factory=list)  # WebDataset shards
    listing: Listing = field(default_factory=Listing)  # a folder's walk: ignored files, unreadable folders

    def __len__(self) -> int:
        return len(self.files) + len(self.tars)


def stat_entry(path: str) -> Entry:
    try:
        st = os.stat(path)
    except OSError:
        return Entry(path, -1, 0)  # gone or dangling: the runner records why
    return Entry(path, st.st_size, st.st_mtime_ns)


def _shards(src: str, exclude: Sequence[str]) -> list[str]:
    return [os.path.abspath(t) for t in expand_shards(src) if not excluded(t, exclude)]


def list_folder(src: str, exclude: Sequence[str] = ()) -> Inputs:
    """The images below a folder (:func:`~dualsearch.data.readers.folder.walk_images`)."""
    listing = walk_images(src, exclude)
    return Inputs([stat_entry(p) for p in listing.files], listing=listing)


def _list_shards(src: str, exclude: Sequence[str]) -> Inputs:
    tars = _shards(src, exclude)
    missing = [t for t in tars if not os.path.isfile(t)]
    if not tars or missing:
        raise DataError(f"{src}: no such WebDataset shard{': ' + missing[0] if missing else 's'}")
    return Inputs([], [stat_entry(t) for t in tars])


def _list_file(src: str, exclude: Sequence[str]) -> Inputs:
    base = os.path.dirname(os.path.abspath(src))
    try:
        lines = Path(src).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{src}: not a text file listing paths or URIs ({e.reason})") from e
    except OSError as e:
        raise DataError(f"{src}: {os_reason(e)}") from e
    files, seen = [], set()
    for line in lines:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("file://"):
            item = unquote(urlparse(item).path)
        if not is_uri(item):
            item = os.path.normpath(os.path.join(base, item))  # relative to the list file
        if item in seen or excluded(item, exclude):
            continue
        seen.add(item)
        files.append(Entry(item, 0, 0) if is_uri(item) else stat_entry(item))
    if not files:
        raise DataError(f"{src}: the list names no images")
    return Inputs(files)


def list_inputs(src: str, exclude: Sequence[str] = ()) -> Inputs:
    """What ``src`` names: a folder of images (or of ``.tar`` shards), WebDataset shards (a
    ``.tar`` file, a glob or a brace pattern), or a text file listing one path or URI a line
    (relative paths resolve against the list's folder). Raises :class:`DataError`."""
    if os.path.isdir(src):
        inputs = list_folder(src, exclude)
        if inputs.files:
            return inputs
        tars = _shards(src, exclude)
        if not tars:
            raise DataError(f"{src}: no images and no .tar shards in this folder")
        return Inputs([], [stat_entry(t) for t in tars])
    if src.endswith(".tar") or any(ch in src for ch in "*?[{"):
        return _list_shards(src, exclude)
    try:
        os.stat(src)
    except OSError as e:
        raise DataError(f"{src}: {os_reason(e)} (give a folder, WebDataset shards or a list file)") from e
    if not os.path.isfile(src):
        raise DataError(f"{src}: not a folder, a WebDataset shard or a list file")
    return _list_file(src, exclude)


@dataclass
class Plan:
    """What a run must do to bring the catalog in line with its inputs."""

    todo: list[Entry]  # files new or changed since cataloged (or that could not be stat'ed)
    tars: list[Entry]  # tar shards not ingested at their current size and mtime
    unchanged: int  # listed files the catalog holds as they are
    gone: list[str]  # catalog paths no longer listed
    stale_tar_keys: list[str]  # catalog meta keys of shards no longer listed


# skip reasons that say the file could not be reached, not that it is a bad image: such rows are
# retried by the next run (a share mounted late, a permission fixed, a server back up)
IO_SKIP_REASONS = ("cannot read file", "cannot fetch", "no longer in its shard", "unreadable shard")


def io_skip(reason: str | None) -> bool:
    """Whether a skip reason is I/O-class (:data:`IO_SKIP_REASONS`): retried on the next run."""
    return bool(reason) and reason.startswith(IO_SKIP_REASONS)


def diff(catalog: Catalog, inputs: Inputs) -> Plan:
    """Compare ``inputs`` with the catalog (size + mtime of files; of shards for their members).
    Files (and shards) skipped for an I/O-class reason (:func:`io_skip`) are planned again."""
    known = catalog.file_stats()
    retry = {s.path for s in catalog.skipped() if io_skip(s.reason)}
    todo = [f for f in inputs.files if f.size < 0 or f.path in retry or known.get(f.path) != (f.size, f.mtime_ns)]
    ingested = catalog.meta_with_prefix(TAR_META)
    retry_tars = {p.split("::", 1)[0] for p in retry}
    tars = [t for t in inputs.tars
            if t.path in retry_tars or ingested.get(TAR_META + t.path) != f"{t.size}:{t.mtime_ns}"]
    file_set, tar_set = {f.path for f in inputs.files}, {t.path for t in inputs.tars}
    unseen = tuple(folder.rstrip(os.sep) + os.sep for folder, _ in inputs.listing.unreadable)
    gone = [p for p in known if p not in file_set and p.split("::", 1)[0] not in tar_set
            and not p.startswith(unseen)]  # a folder that cannot be read is not a folder emptied
    stale = [k for k in ingested if k[len(TAR_META):] not in tar_set]
    return Plan(todo, tars, len(inputs.files) - len(todo), gone, stale)


@dataclass(frozen=True)
class Part:
    """One unit of embedding work (one Spark task, one Parquet shard)."""

    name: str
    kind: str  # "files" or "tar"
    items: tuple  # files: (Entry, ...); tar: (Entry of the shard,)

    @property
    def file(self) -> str:
        return f"{SHARD_PREFIX}{self.name}.parquet"


def _part_name(kind: str, items: Sequence, model_hash: str) -> str:
    return hashlib.sha1(json.dumps([kind, model_hash, [list(i) for i in items]]).encode()).hexdigest()[:20]


def make_parts(files: Sequence[Entry], tars: Sequence[Entry], shard_size: int, model_hash: str) -> list[Part]:
    """Sorted files cut into chunks of ``shard_size``; one part per tar shard. Raises
    :class:`~dualsearch.errors.UsageError` for ``shard_size < 1``."""
    if shard_size < 1:
        raise UsageError(f"--shard-size must be at least 1, got {shard_size}")
    files = sorted(Entry(*f) for f in files)
    parts = []
    for s in range(0, len(files), shard_size):
        chunk = tuple(files[s:s + shard_size])
        parts.append(Part(_part_name("files", chunk, model_hash), "files", chunk))
    for t in sorted(Entry(*t) for t in tars):
        parts.append(Part(_part_name("tar", [t], model_hash), "tar", (t,)))
    return parts
