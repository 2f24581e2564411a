"""Model folder facts that need no torch: file names, the config document, the content hash.

Searching, Spark executors and index bookkeeping read these without loading the model.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import DualsearchError
from ..storage import write_bytes

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


QUERY_BANK_FILE = "query_bank.txt"
QUERY_BANK_LIMIT = 4096  # captions: the hubness statistics cost N x this x D multiply-adds at indexing


def query_bank_captions(captions: list[str], limit: int = QUERY_BANK_LIMIT) -> list[str]:
    """Up to ``limit`` distinct captions (whitespace collapsed, empty ones dropped), spread evenly
    over ``captions``: the query bank a model trained on them carries."""
    seen = list(dict.fromkeys(" ".join(c.split()) for c in captions if c and c.strip()))
    step = max(1.0, len(seen) / limit)
    return [seen[int(i * step)] for i in range(min(limit, len(seen)))]


def write_query_bank(folder: str | os.PathLike, captions: list[str], limit: int = QUERY_BANK_LIMIT) -> dict:
    """Write the model's query bank (:func:`query_bank_captions`, one per line), the queries an
    index's hubness correction normalises by (QB-Norm, Bogolin et al., CVPR 2022;
    :mod:`dualsearch.index.qbnorm`). -> the config entry (``file``, ``count``, ``sha256``: 16 hex
    digits of the file)."""
    bank = query_bank_captions(captions, limit)
    data = "".join(c + "\n" for c in bank).encode("utf-8")
    write_bytes(Path(folder) / QUERY_BANK_FILE, data)
    return {"file": QUERY_BANK_FILE, "count": len(bank), "sha256": hashlib.sha256(data).hexdigest()[:16]}


def read_query_bank(folder: str | os.PathLike, entry: dict | None) -> list[str] | None:
    """The query bank a model's config ``entry`` (``query_bank``) names, or None when the model has
    none. Raises :class:`ModelError` when the file is missing or does not match its recorded hash."""
    if not entry:
        return None
    name = entry.get("file", QUERY_BANK_FILE) if isinstance(entry, dict) else None
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ModelError(f"{Path(folder) / CONFIG_FILE}: damaged query_bank entry (a file name inside the model "
                         f"folder is expected, got {entry!r:.80})")
    path = Path(folder) / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(f"{path}: the model's query bank cannot be read ({e.strerror or e})") from e
    if hashlib.sha256(data).hexdigest()[:16] != entry.get("sha256"):
        raise ModelError(f"{path}: the query bank does not match the model's config (changed after training)")
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: the query bank is not UTF-8 text ({e.reason} at byte {e.start})") from e
