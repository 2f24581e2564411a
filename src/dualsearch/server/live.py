"""The index a server answers from, swapped for a newer build between requests (no restart).

``dualsearch index`` (or ``index --watch``) writes a new ANN index and then its manifest, each
atomically (renamed into place). :class:`LiveSearcher` notices a new manifest (its inode, size
and mtime) at most once per ``check_every`` seconds, opens the new build beside the old one and
swaps the reference: a request already running keeps the searcher it started with, the next one
gets the new build. A build that cannot be opened (caught mid-write, damaged) is logged and the
old one keeps answering. Vector ids are never reused, so cached thumbnails stay valid.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from ..errors import DualsearchError
from ..index.manifest import MANIFEST_FILE
from ..search import Searcher

log = logging.getLogger(__name__)


def _signature(folder) -> tuple | None:
    try:
        st = os.stat(os.path.join(folder, MANIFEST_FILE))
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class LiveSearcher:
    """``live()`` -> the current :class:`Searcher`; ``reload=False`` always returns the one given."""

    def __init__(self, searcher: Searcher, reload: bool = False, check_every: float = 1.0):
        self.searcher = searcher
        self.reload = reload
        self.check_every = check_every
        self.signature = _signature(searcher.folder)
        self.checked = time.monotonic()
        self.generation = 0  # swaps so far
        self.lock = threading.Lock()

    def __call__(self) -> Searcher:
        if self.reload and time.monotonic() - self.checked >= self.check_every:
            self._maybe_swap()
        return self.searcher

    def _maybe_swap(self) -> None:
        if not self.lock.acquire(blocking=False):  # another request is checking: use the current one
            return
        try:
            self.checked = time.monotonic()
            sig = _signature(self.searcher.folder)
            if sig is None or sig == self.signature:
                return
            try:
                new = Searcher.open(self.searcher.folder, self.searcher.model_path)
            except DualsearchError as e:
                log.warning("a newer index in %s cannot be opened yet (%s); still serving the previous one",
                            self.searcher.folder, e)
                return
            self.searcher, self.signature = new, sig
            self.generation += 1
            log.info("serving the newer index in %s (%d images)", new.folder, len(new))
        finally:
            self.lock.release()
