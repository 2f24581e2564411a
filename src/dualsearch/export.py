"""Interoperability: ONNX encoders, and embeddings in clip-retrieval's layout.

``export_onnx_model(MODEL, OUT)`` writes
  OUT/image_encoder.onnx   pixels [B,3,S,S] -> unit embeddings [B,D]   (tower + head + L2 norm)
  OUT/text_encoder.onnx    token tensors [B,T] -> unit embeddings [B,D]
  OUT/tokenizer files, OUT/export.json (preprocessing and input names)
and :class:`OnnxDualEncoder` embeds with ONNX Runtime from that folder alone (no torch model).

Embeddings: ``OUT/img_emb/img_emb_0.npy`` (float32 [N, D]) + ``OUT/metadata/metadata_0.parquet``
(``image_path``), as clip-retrieval writes them; or one Parquet file with a vector column.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)


def _text_meta(model, names: list[str]) -> dict:
    tok = model.text_tower.tokenizer
    return {"inputs": names, "max_length": model.text_tower.max_length, "siglip": model.text_tower.siglip,
            "pad_id": tok.pad_token_id or 0}


def export_text_encoder(model, out: str | os.PathLike, extra: dict | None = None) -> Path:
    """text_encoder.onnx (tokens -> unit embeddings), tokenizer files and export.json in ``out``,
    written to a temp folder and renamed into place."""
    import shutil

    out = Path(out)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from .engine import NormalizedTextEncoder, export_text_onnx

    names = export_text_onnx(NormalizedTextEncoder(model), model.text_tower.tokenize, tmp / "text_encoder.onnx")
    model.text_tower.tokenizer.save_pretrained(tmp)
    (tmp / "export.json").write_text(json.dumps({"format_version": 1, "embed_dim": model.config.embed_dim,
                                                 "text": _text_meta(model, names), **(extra or {})}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def export_onnx_model(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    from .engine import NormalizedImageEncoder, export_onnx
    from .index.manifest import model_content_hash
    from .model.dual_encoder import DualEncoder

    model = DualEncoder.load(model_dir)
    out = Path(out)
    prep = model.image_tower.preprocessor()
    export_text_encoder(model, out, extra={
        "image": {"size": prep.size, "mean": list(prep.mean), "std": list(prep.std), "resize": prep.resize},
        "source_model": str(Path(model_dir).resolve()), "model_hash": model_content_hash(model_dir)})
    export_onnx(NormalizedImageEncoder(model), out / "image_encoder.onnx", model.image_tower.image_size)
    return out


class OnnxDualEncoder:
    """Embeds texts and images with ONNX Runtime from an exported folder (no torch model)."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        from .model.towers import ImagePreprocessor
        from .onnx_text import OnnxTextEncoder
        from .runtime import ort_session

        folder = Path(folder)
        self.text = OnnxTextEncoder(folder, threads)
        self.meta = self.text.meta
        self.image_session = ort_session(folder / "image_encoder.onnx", threads or torch.get_num_threads())
        im = self.meta["image"]
        self.preprocess = ImagePreprocessor(im["size"], tuple(im["mean"]), tuple(im["std"]), im["resize"])

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.text.embed(texts)

    def embed_images(self, images: Sequence) -> np.ndarray:
        """PIL images -> unit embeddings."""
        pixels = np.stack([self.preprocess(img).numpy() for img in images])
        return self.image_session.run(None, {"pixels": pixels})[0]


# ----------------------------------------------------------------------------- embeddings in and out
def read_embeddings(source: str | os.PathLike, path_column: str = "image_path",
                    vector_column: str = "embedding") -> tuple[list[str], np.ndarray]:
    """clip-retrieval's layout (a folder with ``img_emb/*.npy`` + ``metadata/*.parquet``, matched by
    sorted order), or one Parquet file with a path column and a vector column."""
    import pyarrow.parquet as pq

    source = Path(source)
    if source.is_file():
        table = pq.read_table(source)
        for col in (path_column, vector_column):
            if col not in table.column_names:
                raise ValueError(f"{source}: no column {col!r} (columns: {', '.join(table.column_names)})")
        paths = [str(p) for p in table.column(path_column).to_pylist()]
        vectors = np.asarray(table.column(vector_column).to_pylist(), dtype=np.float32)
        return paths, vectors
    npys = sorted((source / "img_emb").glob("*.npy"))
    metas = sorted((source / "metadata").glob("*.parquet"))
    if not npys or len(npys) != len(metas):
        raise ValueError(f"{source}: expected img_emb/*.npy and as many metadata/*.parquet files "
                         f"(found {len(npys)} and {len(metas)})")
    paths, parts = [], []
    for npy, meta in zip(npys, metas):
        vec = np.load(npy, allow_pickle=False)
        table = pq.read_table(meta, columns=[path_column])
        if len(table) != len(vec):
            raise ValueError(f"{meta}: {len(table)} rows for {len(vec)} vectors in {npy}")
        paths += [str(p) for p in table.column(path_column).to_pylist()]
        parts.append(vec.astype(np.float32))
    return paths, np.concatenate(parts)


def write_embeddings(index_dir: str | os.PathLike, out: str | os.PathLike) -> int:
    """An index's vectors and paths, in clip-retrieval's layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .index.build import read_manifest
    from .index.catalog import Catalog

    manifest = read_manifest(index_dir)
    if manifest is None:
        raise ValueError(f"{index_dir}: not a dualsearch index (no manifest.json)")
    cat = Catalog(index_dir)
    ids, vecs = cat.vectors(int(manifest["dim"]))
    paths = cat.paths_for(ids)
    cat.close()
    out = Path(out)
    (out / "img_emb").mkdir(parents=True, exist_ok=True)
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    np.save(out / "img_emb" / "img_emb_0.npy", vecs.astype(np.float32))
    pq.write_table(pa.table({"image_path": [paths[int(i)] for i in ids]}), out / "metadata" / "metadata_0.parquet")
    (out / "model.json").write_text(json.dumps(manifest["model"], indent=2))
    return len(ids)
