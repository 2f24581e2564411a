"""Index folder layout and manifest (no torch import).

INDEX/
  catalog.sqlite   files, statuses, vectors (source of truth; see :mod:`.catalog`)
  vectors.faiss    the ANN index built from the catalog (rebuilt when the catalog changed)
  manifest.json    model (path + content hash), dimension, metric, count, ANN kind and parameters
  text_encoder/    the model's text encoder as ONNX (queries without torch), when it exports
  embeddings/      Spark runs only: the Parquet shards the executors wrote
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import DualsearchError
from ..storage import write_text

MANIFEST_FILE = "manifest.json"
ANN_FILE = "vectors.faiss"
TEXT_ENCODER_DIR = "text_encoder"
MANIFEST_VERSION = 1


class IndexError_(DualsearchError):
    """An index folder that cannot be used as asked (name avoids the builtin)."""


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of an index folder, None when there is none; raises :class:`IndexError_`
    for a damaged one."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise IndexError_(f"{path}: damaged manifest ({e})") from e


def write_manifest(folder: Path, doc: dict) -> None:
    """Write the manifest atomically (:mod:`dualsearch.storage`)."""
    write_text(folder / MANIFEST_FILE, json.dumps(doc, indent=2, sort_keys=True))
