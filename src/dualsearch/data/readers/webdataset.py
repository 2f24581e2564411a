"""WebDataset tar shards: ``key.jpg|png|webp`` + ``key.txt`` (one caption a line)."""
from __future__ import annotations

import glob
import os
import tarfile
from collections import OrderedDict
from typing import Sequence

from ..records import ImageRef, SkipLog
from .base import CaptionDataset, Format, read_containers
from .folder import image_extensions


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


def scan_shard(shard: str, groups: OrderedDict, refs: dict, skipped: SkipLog) -> None:
    """Add the samples of one tar shard: images into ``refs`` and captions into ``groups``, both
    keyed ``<shard basename>/<key>``.

    Never raises for a bad shard: an unreadable, truncated or damaged shard (or member) is recorded
    in ``skipped`` and what was read before it is kept.
    """
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
                if "." + ext in image_extensions():
                    refs[key] = ImageRef(shard, member.name, member.offset_data, member.size)
                    groups.setdefault(key, [])
                elif ext in ("txt", "caption", "text"):
                    _add_caption(tar, member, shard, key, groups, skipped)
    except (OSError, tarfile.TarError) as e:
        skipped.add(shard, f"unreadable shard: {e}")


def _add_caption(tar: tarfile.TarFile, member: tarfile.TarInfo, shard: str, key: str, groups: OrderedDict,
                 skipped: SkipLog) -> None:
    f = tar.extractfile(member)
    data = f.read() if f else b""
    if len(data) != member.size:
        skipped.add(f"{shard}::{member.name}", "broken tar member: truncated caption")
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skipped.add(f"{shard}::{member.name}", "broken tar member: caption is not UTF-8")
        return
    groups.setdefault(key, []).extend(text.splitlines())


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
    """WebDataset tar shards: ``key.jpg|png|webp`` + ``key.txt`` (one caption a line).

    ``shards`` is anything :func:`expand_shards` takes. Raises :class:`DataError` if it names no
    shard; damaged shards are skipped and reported.
    """
    return read_containers(expand_shards(shards), scan_shard, str(shards), "WebDataset shards",
                           captions_per_image)


def _read(source, images=None, path_column=None, caption_column=None, captions_per_image=None) -> CaptionDataset:
    return read_webdataset(source, captions_per_image)


def _has_shards(folder: str) -> bool:
    return bool(glob.glob(os.path.join(folder, "*.tar")))


WEBDATASET = Format("webdataset", _read, suffixes=(".tar",), detect_folder=_has_shards, folder_priority=10,
                    name_match=lambda name: "{" in name,
                    help="WebDataset tar shards (a folder, glob or {000..009} pattern)")
