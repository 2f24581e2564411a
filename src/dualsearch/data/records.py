"""The records every reader yields: one image with its captions."""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_WS = re.compile(r"\s+")


def read_regular_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file; a FIFO, socket or device is refused (``OSError``) instead of
    blocking forever or reading without end."""
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return f.read()


_ESCAPES = {i: f"\\x{i:02x}" for i in range(32)} | {127: "\\x7f", 9: "\\t", 10: "\\n", 13: "\\r"}


def display_name(name: str) -> str:
    """``name`` safe to show anywhere (terminals, JSON, plots): undecodable file-name bytes (lone
    surrogates) and control characters are backslash-escaped; everything else is kept."""
    return name.encode("utf-8", "backslashreplace").decode("utf-8").translate(_ESCAPES)


def normalize_caption(text: str) -> str:
    """Normalise a caption as the reference does: lower-case, whitespace folded, trailing period stripped."""
    text = _WS.sub(" ", text).strip().lower()
    while text.endswith("."):
        text = text[:-1].rstrip()
    return text


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes live: a file on disk, a member of a tar shard or TFRecord file, or
    bytes held in memory (a Parquet row).

    For a member, ``offset``/``size`` locate its bytes inside ``path`` so that it can be read back
    at random without scanning the container.
    """

    path: str
    member: str | None = None
    offset: int | None = None
    size: int | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)  # bytes held in memory (Parquet rows)

    @property
    def name(self) -> str:
        """A readable name for messages and catalogs."""
        return f"{self.path}::{self.member}" if self.member else self.path

    @property
    def suffix(self) -> str:
        return Path(self.member or self.path).suffix.lower()

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.member is None:
            return read_regular_file(self.path)
        with open(self.path, "rb") as f:
            f.seek(self.offset or 0)
            data = f.read(self.size or 0)
        if len(data) != (self.size or 0):
            raise OSError(f"{self.name}: member truncated ({len(data)} of {self.size} bytes)")
        return data

    def identity(self) -> tuple:
        """What changes when the image changes: used as a cache key."""
        if self.data is not None:
            return ("bytes", hashlib.sha1(self.data).hexdigest())
        st = os.stat(self.path)
        return (os.path.abspath(self.path), self.member, self.offset, self.size, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ImageCaption:
    """One image and all of its (normalised) captions."""

    image: ImageRef
    captions: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.image.name


@dataclass
class SkipLog:
    """Collects records left out of a data set, with their reasons, and reports them once."""

    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, reason: str) -> None:
        self.entries.append((name, reason))

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self, first: int = 5) -> str:
        if not self.entries:
            return "nothing skipped"
        counts = Counter(reason.split(":")[0] for _, reason in self.entries)
        kinds = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
        shown = "; ".join(f"{name} ({reason})" for name, reason in self.entries[:first])
        more = f"; and {len(self.entries) - first} more" if len(self.entries) > first else ""
        return f"skipped {len(self.entries)} ({kinds}); first: {shown}{more}"

    def report(self, what: str) -> None:
        if self.entries:
            log.warning("%s: %s", what, self.summary())
