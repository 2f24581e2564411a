"""Tower features and embeddings of image-caption records, through the feature cache.

Frozen towers' features are computed once per item and cached (:mod:`.cache`); a trainable tower
is run every time. :func:`embed_records` gives the unit embeddings evaluation and the demo use.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.records import ImageCaption, ImageRef, SkipLog
from ..errors import Interrupted
from ..logs import progress, say
from ..model.prior import PriorHead, class_prompts
from .backends import image_forward, text_forward
from .cache import FeatureCache, default_cache_dir, image_key, open_caches, text_key
from .loader import image_loader

log = logging.getLogger(__name__)


def _fill_from_cache(cache: FeatureCache | None, keys: Sequence[str], feats: np.ndarray, n: int) -> list[int]:
    """Copy cached rows into ``feats``; return the indices still to compute."""
    if cache is None:
        return list(range(n))
    found = cache.get_many(keys)
    todo = []
    for i, k in enumerate(keys):
        if k in found:
            feats[i] = found[k]
        else:
            todo.append(i)
    return todo


@torch.inference_mode()
def compute_image_features(tower, refs: Sequence[ImageRef], cache: FeatureCache | None = None,
                           batch_size: int = 64, num_workers: int | None = None, device: str = "cpu",
                           skipped: SkipLog | None = None, desc: str = "image features", engine: str = "auto",
                           cache_root: str | os.PathLike | None = None,
                           show_progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Image tower features for ``refs`` -> (features ``[N, F]`` float32, ok mask ``[N]`` bool).

    Bad images get a zero row, ``ok=False`` and an entry in ``skipped``. ONNX exports go under
    ``cache_root`` (default :func:`default_cache_dir`). Progress: :func:`dualsearch.logs.progress`
    (``show_progress=False``: none). Ctrl-C raises :class:`~dualsearch.errors.Interrupted`; every
    batch already computed stays in ``cache``."""
    feats = np.zeros((len(refs), tower.output_dim), dtype=np.float32)
    keys = [image_key(r) for r in refs] if cache else []
    todo = _fill_from_cache(cache, keys, feats, len(refs))
    ok = np.ones(len(refs), dtype=bool)
    ok[todo] = False
    desc = _with_cached(desc, len(refs) - len(todo), "images", not todo and show_progress)
    if not todo:
        return feats, ok
    forward, used = image_forward(tower, tower.fingerprint(), tower.image_size, cache_root or default_cache_dir(),
                                  engine, device)
    fill_images(forward, tower, refs, todo, keys, cache, feats, ok, skipped, desc, batch_size, num_workers,
                show_progress)
    log.debug("%s: %d images (%s)", desc, len(todo), used)
    return feats, ok


def fill_images(forward, tower, refs: Sequence[ImageRef], todo: list[int], keys: Sequence[str],
                cache: FeatureCache | None, out: np.ndarray, ok: np.ndarray, skipped: SkipLog | None, desc: str,
                batch_size: int, num_workers: int | None, show_progress: bool) -> None:
    """Decode the images ``refs[todo]`` in batches (the tower's preprocessing), run ``forward``
    (pixels ``[B, 3, S, S]`` -> rows ``[B, F]`` numpy) and store its rows in ``out`` (and
    ``cache`` under ``keys``), marking them in ``ok``; bad images go to ``skipped``. Ctrl-C raises
    :class:`~dualsearch.errors.Interrupted` (batches already computed stay cached)."""
    done = 0
    try:
        with progress(len(todo), desc, "img", "images", enabled=show_progress) as bar:
            for idx, pixels, bad in image_loader([refs[i] for i in todo], tower, batch_size, num_workers):
                for j, reason in bad:
                    if skipped is not None:
                        skipped.add(refs[todo[j]].name, reason)
                if pixels is not None:
                    got = forward(pixels)
                    rows = [todo[j] for j in idx]
                    if cache:
                        cache.put_many([(keys[r], got[n]) for n, r in enumerate(rows)])
                    out[rows], ok[rows] = got, True
                done += len(idx) + len(bad)
                bar.update(len(idx) + len(bad))
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise _stopped(desc, done, len(todo), "images", cache is not None) from None


def _with_cached(desc: str, cached: int, noun: str, all_cached: bool) -> str:
    """The step's name with its cache hits, e.g. ``image features (900 cached)``; a step whose
    items were all cached says so in its one line now (there is nothing to time)."""
    if all_cached and cached:
        say(f"{desc}: all {cached:,} {noun} cached")
    return f"{desc} ({cached:,} cached)" if cached else desc


def _stopped(desc: str, done: int, total: int, noun: str, cached: bool) -> Interrupted:
    """The one line of a feature step stopped by Ctrl-C: what the cache kept."""
    if cached:
        return Interrupted(f"{desc} stopped after {done:,} of {total:,} {noun}; their features are cached: "
                           f"run the same command again to resume")
    return Interrupted(f"{desc} stopped after {done:,} of {total:,} {noun} (no feature cache: nothing was kept)")


@torch.inference_mode()
def compute_text_features(tower, texts: Sequence[str], cache: FeatureCache | None = None,
                          batch_size: int = 256, device: str = "cpu", desc: str = "text features",
                          engine: str = "auto", cache_root: str | os.PathLike | None = None,
                          show_progress: bool = True) -> np.ndarray:
    """Text tower features for ``texts`` -> ``[M, F]`` float32 (batches sorted by length); progress
    and Ctrl-C as :func:`compute_image_features`."""
    feats = np.zeros((len(texts), tower.output_dim), dtype=np.float32)
    keys = [text_key(t) for t in texts] if cache else []
    todo = _fill_from_cache(cache, keys, feats, len(texts))
    desc = _with_cached(desc, len(texts) - len(todo), "texts", not todo and show_progress)
    if not todo:
        return feats
    forward, used = text_forward(tower, tower.fingerprint(), cache_root or default_cache_dir(), engine, device)
    todo.sort(key=lambda i: len(texts[i]))  # short padding

    def step(rows: list[int]) -> np.ndarray:
        out = forward(tower.tokenize([texts[i] for i in rows]))
        feats[rows] = out
        return out

    fill_texts(step, todo, keys, cache, desc, batch_size, show_progress)
    log.debug("%s: %d texts (%s)", desc, len(todo), used)
    return feats


def fill_texts(step, todo: list[int], keys: Sequence[str], cache: FeatureCache | None, desc: str, batch_size: int,
               show_progress: bool) -> None:
    """Run ``step(rows)`` (it computes and stores the outputs of the texts ``rows`` and returns
    them, one per row) over ``todo`` in batches of ``batch_size``, caching each row's output under
    ``keys``; progress and Ctrl-C as :func:`fill_images`."""
    done = 0
    try:
        with progress(len(todo), desc, "text", "texts", enabled=show_progress) as bar:
            for s in range(0, len(todo), batch_size):
                rows = todo[s:s + batch_size]
                out = step(rows)
                if cache:
                    cache.put_many([(keys[r], out[n]) for n, r in enumerate(rows)])
                done += len(rows)
                bar.update(len(rows))
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise _stopped(desc, done, len(todo), "texts", cache is not None) from None


def flatten_captions(records: Sequence[ImageCaption]) -> tuple[list[str], np.ndarray]:
    """All captions, and for each the index of its image (``[M]`` int64)."""
    texts, owner = [], []
    for i, r in enumerate(records):
        texts.extend(r.captions)
        owner.extend([i] * len(r.captions))
    return texts, np.asarray(owner, dtype=np.int64)


@dataclass
class TowerFeatures:
    """What :func:`tower_features` computed: a side not asked for is None."""

    records: list[ImageCaption]  # the records whose image decoded (all of them when images were not asked for)
    image: np.ndarray | None  # [N, F_image]
    text: np.ndarray | None  # [M, F_text], every caption of ``records``
    text_image: np.ndarray  # [M] index into ``records`` of each caption's image
    skipped: SkipLog


def tower_features(model, records: Sequence[ImageCaption], cache_root: str | os.PathLike | None,
                   device: str = "cpu", num_workers: int | None = None, batch_size: int = 64,
                   images: bool = True, texts: bool = True, use_cache: bool = True,
                   show_progress: bool = True) -> TowerFeatures:
    """Both towers' features of ``records`` (frozen towers through the cache under ``cache_root``;
    no caching when ``use_cache`` is false or ``cache_root`` is None). Images are not decoded when
    ``images=False``. ``show_progress=False``: no progress bars or lines."""
    img_cache, txt_cache = open_caches(model, cache_root if use_cache else None)
    skipped = SkipLog()
    kept, img_f = list(records), None
    try:
        if images:
            feats, ok = compute_image_features(model.image_tower, [r.image for r in records], img_cache,
                                               batch_size=batch_size, num_workers=num_workers, device=device,
                                               skipped=skipped, cache_root=cache_root,
                                               show_progress=show_progress)
            kept, img_f = [r for r, good in zip(records, ok) if good], feats[ok]
        captions, owner = flatten_captions(kept)
        text_f = (compute_text_features(model.text_tower, captions, txt_cache, device=device, cache_root=cache_root,
                                        show_progress=show_progress) if texts else None)
    finally:
        for c in (img_cache, txt_cache):
            if c:
                c.close()
    skipped.report("images")
    return TowerFeatures(kept, img_f, text_f, owner, skipped)


def fill_image_prior(model, cache_root: str | os.PathLike | None, device: str = "cpu") -> None:
    """Fill a model's image prior (:class:`~dualsearch.model.prior.PriorHead`, built with
    ``fill_prior=False``): the tower's ImageNet classifier, and the text tower's features of the
    class prompts through the feature cache under ``cache_root`` (1,000 texts, computed once). A
    model without a prior is left as it is. Raises :class:`~dualsearch.model.towers.TowerError`
    for an image tower without an ImageNet classifier."""
    head = model.image_head
    if not isinstance(head, PriorHead):
        return
    weight, bias = model.image_tower.imagenet_classifier()
    img_cache, txt_cache = open_caches(model, cache_root)
    try:
        names = compute_text_features(model.text_tower, class_prompts(), txt_cache, device=device,
                                      desc="class names", cache_root=cache_root, show_progress=False)
    finally:
        for c in (img_cache, txt_cache):
            if c:
                c.close()
    head.fill(weight, bias, torch.from_numpy(names))


@torch.inference_mode()
def apply_head(head: torch.nn.Module, feats: np.ndarray, device: str = "cpu", batch: int = 8192) -> np.ndarray:
    """A projection head over tower features, L2-normalised: ``[N, F] -> [N, D]`` float32."""
    head.eval()
    if len(feats) == 0:
        dim = head(torch.zeros(1, feats.shape[1], device=device)).shape[1]
        return np.zeros((0, dim), np.float32)
    out = []
    for s in range(0, len(feats), batch):
        x = torch.from_numpy(feats[s:s + batch]).to(device)
        out.append(F.normalize(head(x).float(), dim=-1).cpu().numpy())
    return np.concatenate(out)


@dataclass
class EmbeddedSet:
    """Unit embeddings of the images that decoded, and of all their captions."""

    records: list[ImageCaption]
    image_emb: np.ndarray  # [N, D]
    text_emb: np.ndarray  # [M, D]
    text_image: np.ndarray  # [M] image index of each caption
    skipped: SkipLog


def embed_records(model, records: Sequence[ImageCaption], cache_root: str | os.PathLike | None,
                  device: str = "cpu", num_workers: int | None = None, show_progress: bool = True) -> EmbeddedSet:
    """Embed an image-caption set with a dual encoder (frozen tower features cached under
    ``cache_root``; None disables the cache)."""
    f = tower_features(model, records, cache_root, device, num_workers, show_progress=show_progress)
    model.to(device)
    return EmbeddedSet(f.records, apply_head(model.image_head, f.image, device),
                       apply_head(model.text_head, f.text, device), f.text_image, f.skipped)
