"""ONNX export of a dual encoder's image and text encoders.

``export_onnx_model(MODEL, OUT)`` writes
  OUT/image_encoder.onnx   pixels [B,3,S,S] -> unit embeddings [B,D]   (tower + head + L2 norm)
  OUT/text_encoder.onnx    token tensors [B,T] -> unit embeddings [B,D]
  OUT/tokenizer files, OUT/export.json (preprocessing, input names, the model's content hash)
and :class:`dualsearch.encode.onnx_encoders.OnnxDualEncoder` embeds from that folder alone.
Every file is written under a temporary name and renamed into place.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..storage import atomic_path
from .modules import NormalizedImageEncoder, NormalizedTextEncoder, TokenInputs

EXPORT_FORMAT = 1
OPSET = 17


def export_image_onnx(module: nn.Module, path: Path, image_size: int) -> None:
    """Export ``module`` (pixels ``[B,3,S,S]`` -> ``[B,D]``) with a dynamic batch axis, atomically."""
    dummy = torch.zeros(2, 3, image_size, image_size)
    module = module.eval().cpu()
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (dummy,), str(tmp), input_names=["pixels"], output_names=["embedding"],
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=OPSET,
                          dynamo=False)


def export_text_onnx(module: nn.Module, tokenize: Callable, path: Path) -> list[str]:
    """Export ``module`` (token dict -> ``[B, D]``) with the token inputs ``tokenize`` produces,
    dynamic batch and sequence axes, atomically. Returns the input names."""
    sample = tokenize(["a small red circle above two blue stars", "a picture"])
    names = list(sample)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["embedding"] = {0: "batch"}
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # the wrapper is put in eval mode too: export restores its mode onto the module afterwards
        torch.onnx.export(TokenInputs(module, names).eval(), tuple(sample[n] for n in names), str(tmp),
                          input_names=names, output_names=["embedding"], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)
    return names


def _text_meta(model, names: list[str]) -> dict:
    tok = model.text_tower.tokenizer
    return {"inputs": names, "max_length": model.text_tower.max_length, "siglip": model.text_tower.siglip,
            "pad_id": tok.pad_token_id or 0}


def export_text_encoder(model, out: str | os.PathLike, extra: dict | None = None) -> Path:
    """``text_encoder.onnx`` (tokens -> unit embeddings), tokenizer files and ``export.json`` of a
    :class:`~dualsearch.model.dual_encoder.DualEncoder` in ``out``, written to a temporary folder
    and renamed into place (an existing ``out`` is replaced). ``extra`` goes into export.json."""
    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        names = export_text_onnx(NormalizedTextEncoder(model), model.text_tower.tokenize, tmp / "text_encoder.onnx")
        model.text_tower.tokenizer.save_pretrained(tmp)
        meta = {"format_version": EXPORT_FORMAT, "embed_dim": model.config.embed_dim,
                "text": _text_meta(model, names), **(extra or {})}
        (tmp / "export.json").write_text(json.dumps(meta, indent=2))
    return out


def export_onnx_model(model_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Both encoders of the model folder ``model_dir`` into ``out`` (see the module docstring).
    Raises :class:`~dualsearch.model.folder.ModelError` for a folder that does not load."""
    from ..model.dual_encoder import DualEncoder
    from ..model.folder import model_content_hash

    model = DualEncoder.load(model_dir)
    out = Path(out)
    prep = model.image_tower.preprocessor()
    export_text_encoder(model, out, extra={
        "image": {"size": prep.size, "mean": list(prep.mean), "std": list(prep.std), "resize": prep.resize},
        "source_model": str(Path(model_dir).resolve()), "model_hash": model_content_hash(model_dir)})
    export_image_onnx(NormalizedImageEncoder(model), out / "image_encoder.onnx", model.image_tower.image_size)
    return out
