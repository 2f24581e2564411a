"""Turn a pretrained Hugging Face CLIP-family model into a dualsearch model folder.

Any ``*Model`` with ``get_image_features`` and ``get_text_features`` (CLIP, SigLIP, SigLIP 2, ...)
is already a dual encoder: its towers end in their projections, so the folder uses identity heads
and keeps the model's own temperature (and SigLIP's bias). The Hugging Face files are copied into
``MODEL/hf`` so the folder works offline and can be moved.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from ..config import ModelConfig
from ..storage import atomic_path
from .dual_encoder import DualEncoder
from .folder import ModelError
from .towers import TowerError, build_image_tower, build_text_tower

log = logging.getLogger(__name__)

HF_SUBDIR = "hf"


def _copy_hf(name: str, dest: Path) -> None:
    """Save model, tokenizer and image processor (from a hub id or a local folder) into ``dest``."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {name!r} ({str(e).splitlines()[0]}); without internet give a local "
                         f"folder made with save_pretrained") from e
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ModelError(f"{name!r} ({type(model).__name__}) has no get_image_features/get_text_features: "
                         f"not a CLIP-like dual encoder")
    with atomic_path(dest, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(name).save_pretrained(tmp)
        try:
            AutoImageProcessor.from_pretrained(name).save_pretrained(tmp)
        except (OSError, ValueError):
            log.warning("%s: no image processor found; the image tower will use 224 px and ImageNet statistics",
                        name)


def import_hf(source: str, out: str | os.PathLike) -> DualEncoder:
    """``source``: ``hf:<id or path>`` (or the bare id/path). Returns the saved model."""
    name = source[3:] if source.startswith("hf:") else source
    out = Path(out)
    hf_dir = out / HF_SUBDIR
    _copy_hf(name, hf_dir)  # nothing is created before the model loaded (a failed import leaves no folder)
    spec = f"hf:{hf_dir.resolve()}"
    try:
        image_tower, text_tower = build_image_tower(spec), build_text_tower(spec, max_length=1024)
    except TowerError as e:
        raise ModelError(str(e)) from e
    from transformers import AutoModel

    source_model = AutoModel.from_pretrained(hf_dir)
    scale = float(source_model.logit_scale.detach()) if hasattr(source_model, "logit_scale") else math.log(1 / 0.07)
    bias = getattr(source_model, "logit_bias", None)
    cfg = ModelConfig(image_tower=f"hf:./{HF_SUBDIR}", text_tower=f"hf:./{HF_SUBDIR}", head="identity",
                      embed_dim=image_tower.output_dim, max_text_length=text_tower.max_length,
                      loss="siglip" if bias is not None else "clip", temperature=math.exp(-scale),
                      learn_temperature=True)
    model = DualEncoder(cfg, image_tower=image_tower, text_tower=text_tower, folder=out)
    with torch.no_grad():
        model.logit_scale.fill_(scale)
        if bias is not None:
            model.logit_bias.fill_(float(bias.detach().reshape(-1)[0]))
    model.save(out, extra={"imported_from": source})
    model.folder = out
    log.info("imported %s (%s, dim %d) into %s", source, type(source_model).__name__, cfg.embed_dim, out)
    return model
