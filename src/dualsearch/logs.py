"""Logging set-up shared by the command line, training and the benchmarks, and the one progress
style of every long step (:func:`progress`)."""
from __future__ import annotations

import logging
import os
import sys
import time
import warnings

_state = {"quiet": False}  # ``setup_logging(quiet=True)`` (``-q``): no progress bars or lines either

NOISY = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "transformers", "faiss", "py4j")


def quiet_libraries() -> None:
    """Lightning, transformers, FAISS and py4j talk a lot at INFO; keep their warnings only.
    Call again after importing Lightning: it sets its own loggers to INFO on import."""
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Our messages to stderr at INFO (DEBUG with ``verbose``, WARNING with ``quiet``); other
    libraries at WARNING unless ``verbose``."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    _state["quiet"] = quiet
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not verbose:
        quiet_libraries()
        silence_progress_bars()


def silence_progress_bars() -> None:
    """Hugging Face's per-file "Loading weights" bars (transformers, huggingface_hub): shown with -v only."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def format_rate(count: float, seconds: float, unit: str) -> str:
    """``"32.5 img/s"``: three significant figures below 1,000, whole numbers (with commas) above."""
    rate = count / seconds if seconds > 0 else 0.0
    return f"{rate:,.0f} {unit}/s" if rate >= 100 else f"{rate:.3g} {unit}/s"


def progress_line(desc: str, count: int, noun: str, seconds: float, unit: str) -> str:
    """The one line a finished step prints: ``indexing: 400 images in 12.3 s (32.5 img/s)``."""
    noun = noun[:-1] if count == 1 and noun.endswith("s") else noun  # "1 image", "2 images"
    return f"{desc}: {count:,} {noun} in {seconds:.1f} s ({format_rate(count, seconds, unit)})"


def say(line: str) -> None:
    """Print one progress line to stderr (not under ``-q``)."""
    if not _state["quiet"]:
        print(line, file=sys.stderr, flush=True)


def _columns() -> int:
    """stderr's terminal width; 0 where the terminal does not say (tqdm would then draw nothing:
    it takes 0 rows for a screen too small)."""
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def on_terminal() -> bool:
    """Whether stderr is a terminal (bars are drawn there; logs get one line per step)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class StepSummary:
    """What :func:`progress` returns off a terminal: the ``update()`` / context-manager API of a
    tqdm bar, drawing nothing, and one summary line to stderr when closed after success (none when
    the step was interrupted or failed: the error line says what happened)."""

    def __init__(self, total: int | None, desc: str, unit: str, noun: str, enabled: bool = True):
        self.total, self.desc, self.unit, self.noun, self.enabled = total, desc, unit, noun, enabled
        self.n = 0
        self.t0 = time.perf_counter()
        self.closed = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more items done."""
        self.n += n

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Accepted for tqdm compatibility; nothing is drawn."""

    def close(self) -> None:
        """Print the summary line (once)."""
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            say(progress_line(self.desc, self.n, self.noun, time.perf_counter() - self.t0, self.unit))

    def __enter__(self) -> StepSummary:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        self.closed = True


def progress(total: int | None, desc: str, unit: str = "img", noun: str = "images", enabled: bool = True):
    """The progress of one long step. On a terminal (stderr is a tty): a tqdm bar on stderr with
    items per second; elsewhere (a log, a pipe): a :class:`StepSummary` that prints one line at
    the end, e.g. ``image features: 1,000 images in 8.1 s (123 img/s)``. ``enabled=False`` (or
    ``-q``) shows nothing. Use it as a context manager and call ``update(n)``."""
    enabled = enabled and not _state["quiet"]
    if enabled and on_terminal():
        from tqdm import tqdm

        fixed = {} if _columns() else {"ncols": 80, "nrows": 24}
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, **fixed)
    return StepSummary(total, desc, unit, noun, enabled)
