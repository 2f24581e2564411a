"""Index folder layout and manifest, and the model-folder facts an index needs (no torch import)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST_FILE = "manifest.json"
ANN_FILE = "vectors.faiss"
TEXT_ENCODER_DIR = "text_encoder"
MANIFEST_VERSION = 1
MODEL_FILES = ("config.json", "model.safetensors")


class IndexError_(ValueError):
    """An index folder that cannot be used as asked (name avoids the builtin)."""


def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise IndexError_(f"{path}: damaged manifest ({e})") from e


def write_manifest(folder: Path, doc: dict) -> None:
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_FILE)


def model_content_hash(folder: str | os.PathLike) -> str:
    """A short hash of a model folder's config and weights (what an index records)."""
    h = hashlib.sha256()
    for name in MODEL_FILES:
        with open(Path(folder) / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
