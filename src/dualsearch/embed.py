"""Embed an image-caption data set with a dual encoder (tower features cached where frozen)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data.records import ImageCaption, SkipLog
from .model.dual_encoder import DualEncoder
from .train.features import compute_image_features, compute_text_features, flatten_captions, open_caches

log = logging.getLogger(__name__)


@dataclass
class EmbeddedSet:
    """Normalised embeddings of the images that decoded, and of all their captions."""

    records: list[ImageCaption]
    image_emb: np.ndarray  # [N, D]
    text_emb: np.ndarray  # [M, D]
    text_image: np.ndarray  # [M] image index of each caption
    skipped: SkipLog


@torch.inference_mode()
def apply_head(head: torch.nn.Module, feats: np.ndarray, device: str = "cpu", batch: int = 8192) -> np.ndarray:
    """Head over tower features, L2-normalised. ``[N, F] -> [N, D]``"""
    head.eval()
    if len(feats) == 0:
        with torch.inference_mode():
            dim = head(torch.zeros(1, feats.shape[1], device=device)).shape[1]
        return np.zeros((0, dim), np.float32)
    out = []
    for s in range(0, len(feats), batch):
        x = torch.from_numpy(feats[s:s + batch]).to(device)
        out.append(F.normalize(head(x).float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


def tower_features(model: DualEncoder, records: Sequence[ImageCaption], cache_dir: str | os.PathLike | None,
                   device: str = "cpu", num_workers: int | None = None, batch_size: int = 64,
                   images: bool = True, texts: bool = True):
    """-> (kept records, image features, caption features, caption owners, skipped); a side not
    asked for (``images=False`` or ``texts=False``) is None (and images are then not decoded)."""
    img_cache, txt_cache = open_caches(model, cache_dir)
    skipped = SkipLog()
    kept, img_f = list(records), None
    if images:
        feats, ok = compute_image_features(model.image_tower, [r.image for r in records], img_cache,
                                           batch_size=batch_size, num_workers=num_workers, device=device,
                                           skipped=skipped)
        kept, img_f = [r for r, good in zip(records, ok) if good], feats[ok]
    captions, owner = flatten_captions(kept)
    text_f = compute_text_features(model.text_tower, captions, txt_cache, device=device) if texts else None
    for c in (img_cache, txt_cache):
        if c:
            c.close()
    skipped.report("images")
    return kept, img_f, text_f, owner, skipped


def embed_records(model: DualEncoder, records: Sequence[ImageCaption], cache_dir: str | os.PathLike | None,
                  device: str = "cpu", num_workers: int | None = None) -> EmbeddedSet:
    kept, img_f, txt_f, owner, skipped = tower_features(model, records, cache_dir, device, num_workers)
    model.to(device)
    return EmbeddedSet(kept, apply_head(model.image_head, img_f, device), apply_head(model.text_head, txt_f, device),
                       owner, skipped)
