"""Decoding images for batches: a torch ``DataLoader`` over image references whose workers decode
and preprocess; an image that cannot be used becomes a reason, never an exception."""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import ImageLoadError, load_image
from ..data.records import ImageRef


def default_workers() -> int:
    """Decoding worker processes: one core left for the encoder, at most 4."""
    return min(4, max(1, (os.cpu_count() or 2) - 1))


class ImageFileDataset(Dataset):
    """Decodes and preprocesses images; item ``i`` is ``(i, pixels [3,S,S], None)`` or, for a bad
    image, ``(i, None, reason)``."""

    def __init__(self, refs: Sequence[ImageRef | str], preprocess: Callable, target_size: int,
                 max_pixels: int | None = None):
        self.refs = list(refs)
        self.preprocess = preprocess
        self.target_size = target_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        kwargs = {"max_pixels": self.max_pixels} if self.max_pixels else {}
        try:
            img = load_image(self.refs[i], target_size=self.target_size, **kwargs)
            return i, self.preprocess(img), None
        except ImageLoadError as e:
            return i, None, e.reason


def collate_images(batch):
    """-> (indices of good images, pixels ``[B,3,S,S]`` or None, ``[(index, reason)]`` of bad ones)."""
    good = [(i, x) for i, x, _ in batch if x is not None]
    bad = [(i, r) for i, x, r in batch if x is None]
    if not good:
        return [], None, bad
    return [i for i, _ in good], torch.stack([x for _, x in good]), bad


def image_loader(refs: Sequence, tower, batch_size: int = 64, num_workers: int | None = None,
                 max_pixels: int | None = None) -> DataLoader:
    """Batches of :func:`collate_images` over ``refs``, preprocessed for ``tower`` (an image tower:
    ``preprocessor()`` and ``image_size``), decoded in ``num_workers`` processes."""
    workers = default_workers() if num_workers is None else num_workers
    ds = ImageFileDataset(refs, tower.preprocessor(), tower.image_size, max_pixels)
    return DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_images,
                      persistent_workers=False, prefetch_factor=4 if workers else None)
