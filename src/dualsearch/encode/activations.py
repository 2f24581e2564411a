"""Cut-point activations of partly trainable towers (``last:N``), through the feature cache.

A tower that trains only its last ``N`` blocks needs the output of its frozen blocks (the
activations at the cut point ``K = len(blocks) - N``, :meth:`~dualsearch.model.towers.Tower.cut_point`)
only once: they are computed here in eval mode and stored as float16 in their own cache file
(:func:`~dualsearch.encode.cache.activation_cache`: the tower fingerprint plus the cut point), and
each training step runs only the blocks from ``K`` on (``forward_from``). Sizes per item, float16:
EfficientNet-Lite0 before its last block (``last:1``) ``[320, 7, 7]`` = 31,360 bytes per image,
before its last two (``last:2``) ``[192, 7, 7]`` = 18,816 bytes; a text tower ``[L, D]`` per caption
without its padding (MiniLM-L6: 768 bytes per token, about 12 KB for a 15-token caption). Training
holds them in memory: 10,000 images at ``last:1`` on EfficientNet-Lite0 take about 314 MB.
"""
from __future__ import annotations

import logging
import os
from typing import Sequence

import numpy as np
import torch

from ..data.records import ImageCaption, SkipLog
from ..model.towers import eval_mode
from .cache import activation_cache, image_key, text_key
from .features import _fill_from_cache, _with_cached, fill_images, fill_texts

log = logging.getLogger(__name__)

DTYPE = np.float16  # activations are large: half the bytes of float32, cosine >= 0.999 after the tower


def image_bytes(tower, cut: int) -> int:
    """Bytes of one image's cached activations at block ``cut`` (float16)."""
    return int(np.prod(tower.activation_shape(cut))) * np.dtype(DTYPE).itemsize


@torch.inference_mode()
def image_activations(tower, cut: int, records: Sequence[ImageCaption], cache_root: str | os.PathLike | None,
                      device: str = "cpu", num_workers: int | None = None, batch_size: int = 64,
                      show_progress: bool = True) -> tuple[list[ImageCaption], np.ndarray]:
    """Activations at block ``cut`` of the images of ``records`` -> (the records whose image decoded,
    float16 ``[N, *tower.activation_shape(cut)]``, e.g. ``[N, 320, 7, 7]``), cached under
    ``cache_root`` (None: not cached). Bad images are left out and reported in one warning; Ctrl-C
    raises :class:`~dualsearch.errors.Interrupted` (batches already computed stay cached)."""
    shape = tower.activation_shape(cut)
    refs = [r.image for r in records]
    acts = np.zeros((len(refs), int(np.prod(shape))), dtype=DTYPE)
    cache = activation_cache(cache_root, tower.fingerprint(), cut) if cache_root is not None else None
    keys = [image_key(r) for r in refs] if cache else []
    ok = np.ones(len(refs), dtype=bool)
    desc = f"image activations at block {cut}"
    try:
        todo = _fill_from_cache(cache, keys, acts, len(refs))
        ok[todo] = False
        desc = _with_cached(desc, len(refs) - len(todo), "images", not todo and show_progress)
        skipped = SkipLog()
        if todo:
            with eval_mode(tower, device):
                fill_images(lambda px: tower.forward_to(cut, px.to(device)).flatten(1).to("cpu", torch.float16).numpy(),
                            tower, refs, todo, keys, cache, acts, ok, skipped, desc, batch_size, num_workers,
                            show_progress)
        skipped.report("images")
    finally:
        if cache:
            cache.close()
    return [r for r, good in zip(records, ok) if good], acts[ok].reshape(-1, *shape)


@torch.inference_mode()
def text_activations(tower, cut: int, texts: Sequence[str], cache_root: str | os.PathLike | None,
                     device: str = "cpu", batch_size: int = 256, show_progress: bool = True) -> list[np.ndarray]:
    """Activations at layer ``cut`` of each text, without padding: float16 ``[L_i, D]`` (``L_i`` its
    tokens; the padding mask is rebuilt from the lengths), cached under ``cache_root`` (None: not
    cached). Batches are sorted by length; Ctrl-C as :func:`image_activations`."""
    width = tower.activation_shape(cut)[-1]
    cache = activation_cache(cache_root, tower.fingerprint(), cut) if cache_root is not None else None
    keys = [text_key(t) for t in texts] if cache else []
    found = cache.get_many(keys) if cache else {}
    out: list = [found[k].reshape(-1, width) if k in found else None for k in keys] or [None] * len(texts)
    todo = sorted((i for i, a in enumerate(out) if a is None), key=lambda i: len(texts[i]))
    desc = _with_cached(f"text activations at layer {cut}", len(texts) - len(todo), "texts",
                        not todo and show_progress)

    def step(rows: list[int]) -> list[np.ndarray]:
        tokens = {k: v.to(device) for k, v in tower.tokenize([texts[i] for i in rows]).items()}
        hidden, mask = tower.forward_to(cut, tokens)
        hidden, keep = hidden.to("cpu", torch.float16).numpy(), mask.bool().cpu().numpy()
        for n, r in enumerate(rows):
            out[r] = hidden[n][keep[n]]
        return [out[r] for r in rows]

    try:
        with eval_mode(tower, device):
            fill_texts(step, todo, keys, cache, desc, batch_size, show_progress)
    finally:
        if cache:
            cache.close()
    return out
