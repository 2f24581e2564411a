"""Logging set-up shared by the command line, training and the benchmarks."""
from __future__ import annotations

import logging
import os
import sys
import warnings

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


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Our messages to stderr at INFO (DEBUG with ``verbose``, WARNING with ``quiet``); other
    libraries at WARNING unless ``verbose``."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
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
