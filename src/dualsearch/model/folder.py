"""Model folder facts that need no torch: file names, the config document, the content hash.

Searching, Spark executors and index bookkeeping read these without loading the model.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import DualsearchError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class ModelError(DualsearchError):
    """A model folder that cannot be loaded."""


def read_model_config(folder: str | os.PathLike) -> dict:
    """The parsed ``config.json`` of a model folder. Raises :class:`ModelError` when it is missing,
    damaged or of a format this version does not read."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{folder}: not a dualsearch model folder (no {CONFIG_FILE})")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelError(f"{path}: damaged config ({e})") from e
    if doc.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: model format {doc.get('format_version')} is not supported "
                         f"(this dualsearch reads {FORMAT_VERSION})")
    return doc


def model_content_hash(folder: str | os.PathLike) -> str:
    """16 hex digits of SHA-256 over a model folder's config and weights (what an index records
    to tell its model apart). Raises ``OSError`` when a file cannot be read."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        with open(Path(folder) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
