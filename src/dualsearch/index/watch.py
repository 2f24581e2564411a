"""A live index: re-run the incremental indexing run whenever the photo folder changes.

File-system events come from ``watchdog`` (inotify on Linux, FSEvents on macOS, polling where
neither works). Events are batched and debounced: a run starts once the folder has been quiet for
``debounce`` seconds (a copy of 500 photos is one run, not 500), and events that arrive during a
run trigger one more run after it. Each run is the normal incremental run (:mod:`.build`), so it
is exactly as crash-safe: a watcher killed at any point leaves a consistent index, and the next
run (watching or not) picks up what changed meanwhile.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from ..errors import DualsearchError

log = logging.getLogger(__name__)

IGNORED_EVENTS = ("opened", "closed_no_write")  # reads (inotify's IN_OPEN / IN_CLOSE_NOWRITE) change nothing


class ChangeTracker:
    """Records when the folder last changed (watchdog's handler protocol: ``dispatch(event)``),
    leaving out reads and anything below ``ignore`` (an index folder kept inside the photos)."""

    def __init__(self, ignore: str | None = None):
        self.ignore = os.path.abspath(ignore) + os.sep if ignore else None
        self.pending = threading.Event()
        self.last = 0.0

    def dispatch(self, event) -> None:
        if event.event_type in IGNORED_EVENTS:
            return
        paths = [os.fsdecode(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        if self.ignore and all(os.path.abspath(p).startswith(self.ignore) for p in paths):
            return
        self.last = time.monotonic()
        self.pending.set()

    def quiet_for(self, seconds: float) -> bool:
        return self.pending.is_set() and time.monotonic() - self.last >= seconds


def watch(folder: str | os.PathLike, run: Callable[[], object], debounce: float = 2.0,
          ignore: str | os.PathLike | None = None, stop: threading.Event | None = None,
          on_result: Callable[[object], None] = print, poll_interval: float = 0.2) -> None:
    """Call ``run()`` each time ``folder`` (recursively) has changed and then been quiet for
    ``debounce`` seconds, until ``stop`` is set or Ctrl-C. ``on_result`` gets what ``run``
    returned; a run that fails with a :class:`DualsearchError` (a file locked mid-copy, a full
    disk) is logged and the watcher keeps going. Raises ``OSError`` when the folder cannot be
    watched (gone, or the inotify watch limit reached: raise fs.inotify.max_user_watches)."""
    from watchdog.observers import Observer

    stop = stop or threading.Event()
    tracker = ChangeTracker(os.fspath(ignore) if ignore else None)
    observer = Observer()
    observer.schedule(tracker, os.fspath(folder), recursive=True)
    observer.start()
    log.info("watching %s for changes (debounce %.1f s; Ctrl-C stops)", folder, debounce)
    try:
        while not stop.is_set():
            if tracker.quiet_for(debounce):
                tracker.pending.clear()  # events during the run set it again: one more run after
                try:
                    on_result(run())
                except DualsearchError as e:
                    log.error("%s (still watching; the next change runs again)", e)
            stop.wait(poll_interval)
    finally:
        observer.stop()
        observer.join()
