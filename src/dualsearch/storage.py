"""The one way dualsearch writes files: atomically, with the umask's permissions, one-line errors.

Every file is written under a unique temporary name in its destination folder and renamed into
place (``os.replace``), so a reader never sees half a file and a crash leaves no partial one; on
any error the temporary file or folder is removed. Files get the permissions a plain ``open``
would give (``0o666`` less the umask; ``tempfile`` alone would give ``0o600``). A full disk, a
read-only volume or a permission refusal becomes a :class:`StorageError` naming the path.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import DualsearchError

_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.ENOENT: "no such file or folder", errno.ENOTDIR: "not a folder",
            errno.ELOOP: "too many levels of symbolic links"}


class StorageError(DualsearchError):
    """A file that could not be written (full disk, read-only volume, no permission)."""


def umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def os_reason(e: OSError) -> str:
    """A short reason for an ``OSError`` that keeps "permission denied" apart from "no such file"
    and a full disk apart from a read-only one."""
    return _REASONS.get(e.errno, e.strerror or str(e))


def storage_error(e: OSError, path: str | os.PathLike) -> StorageError:
    """A one-line :class:`StorageError` for an ``OSError`` met while writing ``path``."""
    return StorageError(f"{os_reason(e)} while writing {path}")


@contextmanager
def atomic_path(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """A unique temporary path (a file, or an empty folder with ``is_dir``) beside ``path``; on
    success it replaces ``path`` (a folder replaces a folder), on any error it is removed.
    Raises :class:`StorageError` for ``OSError``s."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
        yield tmp
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~umask())
        if is_dir and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise storage_error(e, path) from e
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True) if is_dir else tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    write_bytes(path, text.encode("utf-8"))
