"""Encoders run from an ONNX export folder with ONNX Runtime and the ``tokenizers`` library alone
(torch-free): ``dualsearch search`` and ``serve`` answer text queries with the text encoder an
index holds, so that a query never imports torch or transformers.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.images import ImagePreprocessor
from .runtime import file_sha256, ort_session

log = logging.getLogger(__name__)


class OnnxTextEncoder:
    """``embed(texts) -> [N, D]`` unit vectors, from a folder with text_encoder.onnx, tokenizer.json
    and export.json (:func:`dualsearch.encode.export.export_text_encoder`)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.meta = json.loads((folder / "export.json").read_text())
        text = self.meta["text"]
        self.inputs = list(text["inputs"])
        self.max_length = int(text["max_length"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        pad_id = int(text.get("pad_id") or 0)
        if text.get("siglip"):
            self.tokenizer.enable_padding(length=self.max_length, pad_id=pad_id)
        else:
            self.tokenizer.enable_padding(pad_id=pad_id)
        self.session = ort_session(folder / "text_encoder.onnx", threads)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> float32 unit embeddings ``[N, D]``; longer texts are truncated (logged)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        over = [t for t, e in zip(texts, encodings) if e.overflowing]
        if over:
            log.warning("%d text(s) longer than the text tower's %d tokens were truncated, e.g. %r", len(over),
                        self.max_length, over[0][:80])
        arrays = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings],
                  "token_type_ids": [e.type_ids for e in encodings]}
        feed = {name: np.asarray(arrays[name], dtype=np.int64) for name in self.inputs}
        return self.session.run(None, feed)[0]


def load_text_encoder(folder: str | os.PathLike, model_hash: str) -> OnnxTextEncoder | None:
    """The encoder in ``folder`` if it was exported from the model with ``model_hash``; None when
    there is none, it belongs to another model, or it does not load (then torch answers)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "export.json").read_text())
        if meta.get("model_hash") != model_hash or not (folder / "tokenizer.json").is_file():
            return None
        return OnnxTextEncoder(folder)
    except (OSError, ValueError, ImportError) as e:
        log.debug("no ONNX text encoder in %s (%s)", folder, e)
        return None
    except Exception as e:  # onnxruntime raises its own error types for damaged files
        log.warning("%s: cannot load the ONNX text encoder (%s); using torch", folder, e)
        return None


class OnnxDualEncoder:
    """Embeds texts and images with ONNX Runtime from an export folder (no torch model)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        folder = Path(folder)
        self.text = OnnxTextEncoder(folder, threads)
        self.meta = self.text.meta
        self.image_session = ort_session(folder / "image_encoder.onnx", threads)
        im = self.meta["image"]
        self.preprocess = ImagePreprocessor(im["size"], tuple(im["mean"]), tuple(im["std"]), im["resize"])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Strings -> unit embeddings ``[N, D]``."""
        return self.text.embed(texts)

    def embed_images(self, images: Sequence) -> np.ndarray:
        """RGB PIL images -> unit embeddings ``[N, D]``."""
        pixels = np.stack([self.preprocess.array(img) for img in images])
        return self.image_session.run(None, {"pixels": pixels})[0]


def text_export_dir(cache_root: str | os.PathLike, model_hash: str) -> Path:
    """Where the verified text-encoder export of the model with ``model_hash`` is cached."""
    return Path(cache_root) / "onnx" / f"text-encoder-{model_hash}"


def verified_text_export(folder: str | os.PathLike, model_hash: str) -> bool:
    """Whether ``folder`` holds a text-encoder export of the model with ``model_hash`` that was
    checked against torch (:func:`export_verified_text_encoder`) and is unchanged since (torch-free)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "export.json").read_text())
        return (meta.get("model_hash") == model_hash and "max_diff" in meta and (folder / "tokenizer.json").is_file()
                and meta.get("sha256") == file_sha256(folder / "text_encoder.onnx"))
    except (OSError, ValueError, AttributeError):
        return False


PROBE = ["a red circle", "two small blue stars above a large green square on a pink background", "x"]


def export_verified_text_encoder(model, folder: str | os.PathLike, model_hash: str, atol: float = 1e-3) -> bool:
    """Export ``model``'s text encoder into ``folder`` (:func:`dualsearch.encode.export.export_text_encoder`,
    torch) and keep it only if it matches torch within ``atol`` on a few probes; the check is
    recorded in export.json (``max_diff``, ``sha256``). -> whether it was kept (else a warning says
    why and search will use torch). Raises ``StorageError`` when the folder cannot be written."""
    from ..storage import StorageError, write_text
    from .export import export_text_encoder

    folder = Path(folder)
    try:
        export_text_encoder(model, folder, extra={"model_hash": model_hash})
        diff = float(np.abs(OnnxTextEncoder(folder).embed(PROBE) - model.embed_texts(PROBE)).max())
    except StorageError:
        raise  # a full disk is the run's failure, not the exporter's
    except Exception as e:  # an exotic tower the exporter cannot trace: torch answers queries
        log.warning("could not export the text encoder to ONNX (%s); search will use torch", e)
        shutil.rmtree(folder, ignore_errors=True)
        return False
    if diff > atol:
        log.warning("the ONNX text encoder differs from torch by %.2g; search will use torch", diff)
        shutil.rmtree(folder, ignore_errors=True)
        return False
    meta = json.loads((folder / "export.json").read_text())
    meta.update(max_diff=diff, sha256=file_sha256(folder / "text_encoder.onnx"))
    write_text(folder / "export.json", json.dumps(meta, indent=2))
    return True


def install_text_encoder(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the export folder ``src`` to ``dst`` atomically (files get the umask's permissions).
    Raises ``StorageError``."""
    from ..storage import atomic_path

    with atomic_path(dst, is_dir=True) as tmp:
        shutil.copytree(src, tmp, copy_function=shutil.copyfile, dirs_exist_ok=True)
