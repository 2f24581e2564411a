"""Deterministic train / validation / test splits of image-caption records."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import UsageError
from .records import ImageCaption


def split_records(records: Sequence[ImageCaption], fractions: dict[str, float], seed: int = 0
                  ) -> dict[str, list[ImageCaption]]:
    """Deterministic split by image: sizes follow ``fractions`` exactly (rounded), the assignment
    depends only on the seed and the set of image names, never on input order, and no image's
    captions straddle two splits.

    Returns split name -> records, in the order of ``fractions``. Raises :class:`UsageError` if
    the fractions are negative or sum to zero or less.
    """
    total = sum(fractions.values())
    if total <= 0 or any(v < 0 for v in fractions.values()):
        raise UsageError(f"bad split fractions {fractions}")
    by_name = {r.name: r for r in records}
    names = sorted(by_name)
    order = np.random.default_rng(seed).permutation(len(names))
    out, start, acc = {}, 0, 0.0
    for i, (split, frac) in enumerate(fractions.items()):
        acc += frac / total
        end = len(names) if i == len(fractions) - 1 else int(round(acc * len(names)))
        chosen = sorted(order[start:end])
        out[split] = [by_name[names[j]] for j in chosen]
        start = end
    return out
