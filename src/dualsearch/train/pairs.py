"""What training batches are made of: (image, caption) pairs from cached features or raw inputs."""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import TrainConfig
from ..data.images import ImageLoadError, load_image
from ..data.readers import DataError
from ..data.records import ImageCaption
from ..encode.features import tower_features
from ..encode.loader import default_workers

MIN_TRAIN_IMAGES = 2  # a contrastive batch needs a negative


class Pairs(Dataset):
    """(image item, caption item) pairs. Each side is either a cached tower feature (a tensor) or a
    raw input (preprocessed pixels; a caption string, tokenised by the collate), so that a frozen
    tower uses its cache even when the other tower trains.

    ``pairs="all"``: every (image, caption) pair once an epoch (the reference);
    ``pairs="sample"``: one item per image, its caption drawn at random each time (so a batch never
    holds the same image twice); ``fixed=True`` draws caption 0 (for validation)."""

    def __init__(self, records: Sequence[ImageCaption], pairs: str, image_feats: np.ndarray | None = None,
                 text_feats: np.ndarray | None = None, preprocess=None, target_size: int = 224,
                 fixed: bool = False, augment: bool = False):
        self.records = list(records)
        counts = np.array([len(r.captions) for r in self.records])
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.counts = counts
        self.owner = np.repeat(np.arange(len(self.records)), counts)
        self.pairs = pairs
        self.img = torch.from_numpy(image_feats) if image_feats is not None else None
        self.txt = torch.from_numpy(text_feats) if text_feats is not None else None
        self.preprocess = preprocess
        self.target_size = target_size
        self.fixed = fixed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.owner) if self.pairs == "all" else len(self.records)

    def __getitem__(self, k: int):
        if self.pairs == "all":
            i, c = int(self.owner[k]), k
        else:
            i = k
            c = int(self.starts[i]) + (0 if self.fixed else random.randrange(self.counts[i]))
        text = self.txt[c] if self.txt is not None else self.records[i].captions[c - self.starts[i]]
        if self.img is not None:
            return self.img[i], text
        try:
            img = load_image(self.records[i].image, target_size=self.target_size)
        except ImageLoadError:
            return None
        if self.augment:
            img = _augment(img)
        return self.preprocess(img), text


def _augment(img):
    """Light, caption-safe augmentation: random resized crop keeping most of the scene, colour jitter
    of brightness only (colour words in captions must stay true; no flips: captions say left/right)."""
    from PIL import ImageEnhance

    w, h = img.size
    s = random.uniform(0.85, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = random.randint(0, w - cw), random.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch))
    return ImageEnhance.Brightness(img).enhance(random.uniform(0.85, 1.15))


class PairCollate:
    """Stacks tensors, tokenises caption strings, drops images that failed to decode."""

    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, batch):
        batch = [b for b in batch if b is not None]
        if not batch:  # every image failed to decode: the step is skipped
            return None
        images = torch.stack([b[0] for b in batch])
        texts = [b[1] for b in batch]
        return images, (torch.stack(texts) if isinstance(texts[0], torch.Tensor) else self.tokenize(texts))


def build_loaders(model, tcfg: TrainConfig, train: Sequence[ImageCaption],
                  val: Sequence[ImageCaption], cached: tuple[bool, bool], cache_root, device: str,
                  num_workers: int | None, progress: bool = True):
    """(train, val or None) DataLoaders; a side whose tower is frozen (and, for images, not
    augmented) reads features computed once through the cache under ``cache_root`` (None: no
    cache), the other side reads raw inputs. Raises :class:`DataError` when fewer than
    ``MIN_TRAIN_IMAGES`` training images are left once unreadable ones are dropped. ``progress``:
    feature steps show their progress (:func:`dualsearch.logs.progress`)."""
    image_cached, text_cached = cached

    def dataset(records, fixed):
        img_f = txt_f = None
        if image_cached or text_cached:
            f = tower_features(model, records, cache_root, device, num_workers, images=image_cached,
                               texts=text_cached, show_progress=progress)
            records, img_f, txt_f = f.records, f.image, f.text
        return Pairs(records, tcfg.pairs, img_f, txt_f, model.image_tower.preprocessor(),
                     model.image_tower.image_size, fixed=fixed, augment=tcfg.augment and not fixed)

    train_ds = dataset(train, False)
    if len(train_ds.records) < MIN_TRAIN_IMAGES:
        raise DataError(f"{len(train_ds.records)} training images left after decoding; a contrastive batch "
                        f"needs at least {MIN_TRAIN_IMAGES}")
    val_ds = dataset(val, True) if val else None
    workers = 0 if image_cached else (default_workers() if num_workers is None else num_workers)
    # no persistent workers: a fresh iterator each epoch draws its seeds as the cached path's
    # does, so both paths see the same batches in every epoch
    kw = {"num_workers": workers, "collate_fn": PairCollate(model.text_tower.tokenize)}
    g = torch.Generator().manual_seed(tcfg.seed)
    train_dl = DataLoader(train_ds, batch_size=tcfg.batch_size, shuffle=True, drop_last=len(train_ds) > tcfg.batch_size,
                          generator=g, **kw)
    val_dl = DataLoader(val_ds, batch_size=tcfg.batch_size, shuffle=False, **kw) if val_ds is not None else None
    return train_dl, val_dl
