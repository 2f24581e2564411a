"""A plain folder of images with optional same-name ``.txt`` captions, and the one place that
lists image files below a folder (:func:`walk_images`), for reading data and for indexing alike.

What counts as an image is what this Pillow can open (:func:`image_extensions`: every extension
registered by a plugin that decodes, plus HEIF/AVIF when a plugin for them is installed), matched
case-insensitively. A folder that cannot be read is reported, never taken as empty; symlinked
folders are followed once (a link back into a folder already walked is reported and skipped);
the walk is iterative, so no tree is too deep for it.
"""
from __future__ import annotations

import fnmatch
import functools
import os
import stat
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ...storage import os_reason
from ..images import HEIF_EXTENSIONS, RAW_EXTENSIONS, register_plugins
from ..records import ImageRef, SkipLog
from .base import CaptionDataset, DataError, Format, finish

# Pillow registers these but cannot decode them here (stubs without a handler, video, Windows-only).
_NOT_DECODED = {"BUFR", "GRIB", "HDF5", "MPEG", "WMF"}


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (".jpg", ".avif", ...) of every format this Pillow opens and decodes."""
    from PIL import Image, ImageFile

    register_plugins()
    Image.init()
    def stub(factory) -> bool:
        return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)

    decodable = {fmt for fmt, (factory, _) in Image.OPEN.items() if fmt not in _NOT_DECODED and not stub(factory)}
    exts = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in decodable}
    # multi-picture JPEGs open through the JPEG plugin; HEIF is listed even without its plugin, so that
    # phone photos are skipped with a reason naming the extra instead of vanishing; camera RAW likewise
    return frozenset(exts | {".mpo", *HEIF_EXTENSIONS, *RAW_EXTENSIONS})


def is_image_name(name: str) -> bool:
    """Whether a file name has an extension :func:`image_extensions` lists (any case)."""
    return os.path.splitext(name)[1].lower() in image_extensions()


@dataclass
class Listing:
    """What :func:`walk_images` found below a root."""

    files: list[str] = field(default_factory=list)  # absolute image paths, sorted
    ignored: Counter = field(default_factory=Counter)  # extension (or "no extension") -> non-image files
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason): contents unknown
    loops: list[str] = field(default_factory=list)  # symlinked folders leading back into the walk

    def notes(self) -> list[str]:
        """Short phrases for a summary line: ignored files by extension, unreadable folders, loops."""
        out = []
        if self.ignored:
            counts = sorted(self.ignored.items(), key=lambda kv: (-kv[1], kv[0]))
            out.append("ignored: " + ", ".join(f"{n} {ext}" for ext, n in counts))
        if self.unreadable:
            out.append(f"{len(self.unreadable)} unreadable folder(s), e.g. {self.unreadable[0][0]} "
                       f"({self.unreadable[0][1]}); their images are kept as they were")
        if self.loops:
            out.append(f"{len(self.loops)} symlinked folder(s) skipped as loops, e.g. {self.loops[0]}")
        return out


def _check_root(root: str) -> None:
    try:
        st = os.stat(root)
    except OSError as e:
        raise DataError(f"{root}: {os_reason(e)}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{root}: not a folder")


def excluded(path: str, exclude: Sequence[str]) -> bool:
    """Whether ``path`` (relative to a walk's root, or as listed) or its file name matches a glob
    of ``--exclude``."""
    return any(fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(os.path.basename(path), pat) for pat in exclude)


def walk_images(root: str | os.PathLike, exclude: Sequence[str] = ()) -> Listing:
    """Every image file below ``root`` (see the module docstring), hidden files and folders and
    those whose relative path or name matches a glob in ``exclude`` left out. Real folders are
    walked before symlinked ones, so a file reachable both ways keeps its real path. Raises
    :class:`DataError` when ``root`` itself is missing, unreadable or not a folder."""
    root = os.path.abspath(os.fspath(root))
    _check_root(root)
    out, seen, stack, links = Listing(), set(), [root], []
    while stack or links:
        folder = stack.pop() if stack else links.pop()
        try:
            st = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            out.unreadable.append((folder, os_reason(e)))
            continue
        if (st.st_dev, st.st_ino) in seen:
            out.loops.append(folder)  # only a symlink can lead back to a folder already walked
            continue
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            rel = os.path.relpath(entry.path, root).replace(os.sep, "/")
            if not entry.name.startswith(".") and not excluded(rel, exclude):
                _visit(entry, out, stack, links)
    out.files.sort()
    return out


def _visit(entry: os.DirEntry, out: Listing, stack: list, links: list) -> None:
    try:
        is_dir = entry.is_dir()  # follows symlinks
    except OSError:
        is_dir = False
    if is_dir:
        (links if entry.is_symlink() else stack).append(entry.path)
    elif is_image_name(entry.name) and _regular_or_dangling(entry):
        out.files.append(entry.path)  # a dangling link too: the runner records why it cannot be read
    elif is_image_name(entry.name):
        out.ignored["not a regular file"] += 1  # a FIFO named x.jpg would block a reader forever
    else:
        out.ignored[os.path.splitext(entry.name)[1].lower() or "no extension"] += 1


def _regular_or_dangling(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file() or (entry.is_symlink() and not os.path.exists(entry.path))
    except OSError:
        return True  # cannot tell: the runner records why it cannot be read


def list_images(root: str | os.PathLike, exclude: Sequence[str] = ()) -> list[Path]:
    """The image files of :func:`walk_images` as paths (sorted). Raises :class:`DataError`."""
    return [Path(p) for p in walk_images(root, exclude).files]


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
