"""Retrieval metrics from embedding matrices alone, computed in blocks.

``image_emb [N, D]`` and ``text_emb [M, D]`` are L2-normalised; ``text_image [M]`` gives the image
index of each caption. Ranks are 1-based; a tie counts in the query's favour (rank = 1 + number of
strictly better candidates). No step holds more than ``block_elems`` scores at once, so 100k
images by 500k captions never build the full matrix.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .data.readers import DataError

log = logging.getLogger(__name__)

KS = (1, 5, 10)


@dataclass
class RetrievalMetrics:
    text_to_image: dict
    image_to_text: dict
    top_k_accuracy: dict
    images: int
    queries: int

    def as_dict(self) -> dict:
        return {"text_to_image": self.text_to_image, "image_to_text": self.image_to_text,
                "top_k_accuracy": self.top_k_accuracy, "images": self.images, "queries": self.queries}

    def table(self) -> str:
        t, i = self.text_to_image, self.image_to_text
        rows = [f"{'direction':<15} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'median rank':>12}",
                f"{'text->image':<15} {t['R@1']:7.2f} {t['R@5']:7.2f} {t['R@10']:7.2f} {t['median_rank']:12.1f}",
                f"{'image->text':<15} {i['R@1']:7.2f} {i['R@5']:7.2f} {i['R@10']:7.2f} {i['median_rank']:12.1f}",
                f"top-{self.top_k_accuracy['k']} accuracy (first caption per image): "
                f"{self.top_k_accuracy['value']:.2f} %",
                f"{self.images} images, {self.queries} captions"]
        return "\n".join(rows)


def _rows_per_block(n_cols: int, block_elems: int) -> int:
    return max(1, block_elems // max(1, n_cols))


def text_to_image_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                        block_elems: int = 1 << 24, image_bias: np.ndarray | None = None) -> np.ndarray:
    """Rank of each caption's own image among all images. ``[M]``. ``image_bias [N]``: added to
    every score of its image (a retrieval-time correction such as QB-Norm's per-image offset)."""
    img = torch.from_numpy(np.ascontiguousarray(image_emb, dtype=np.float32))
    bias = None if image_bias is None else torch.from_numpy(np.asarray(image_bias, np.float32))
    gt = torch.from_numpy(np.asarray(text_image, dtype=np.int64))
    ranks = np.empty(len(text_emb), dtype=np.int64)
    step = _rows_per_block(len(img), block_elems)
    for s in range(0, len(text_emb), step):
        q = torch.from_numpy(np.ascontiguousarray(text_emb[s:s + step], dtype=np.float32))
        scores = q @ img.T if bias is None else q @ img.T + bias
        true = scores.gather(1, gt[s:s + step, None])
        ranks[s:s + step] = ((scores > true).sum(1) + 1).numpy()
    return ranks


def image_to_text_ranks(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray,
                        block_elems: int = 1 << 24) -> np.ndarray:
    """Rank of the best-ranked own caption of each image among all captions. ``[N]``"""
    txt = torch.from_numpy(np.ascontiguousarray(text_emb, dtype=np.float32))
    owner = torch.from_numpy(np.asarray(text_image, dtype=np.int64))
    ranks = np.empty(len(image_emb), dtype=np.int64)
    step = _rows_per_block(len(txt), block_elems)
    for s in range(0, len(image_emb), step):
        q = torch.from_numpy(np.ascontiguousarray(image_emb[s:s + step], dtype=np.float32))
        scores = q @ txt.T  # [b, M]
        own = owner[None, :] == torch.arange(s, s + len(q))[:, None]
        best_own = scores.masked_fill(~own, float("-inf")).max(1, keepdim=True).values
        ranks[s:s + step] = ((scores > best_own).sum(1) + 1).numpy()
    return ranks


def recall_summary(ranks: np.ndarray) -> dict:
    out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in KS}
    out["median_rank"] = float(np.median(ranks))
    return out


def retrieval_metrics(image_emb: np.ndarray, text_emb: np.ndarray, text_image: np.ndarray, k: int = 100,
                      block_elems: int = 1 << 24, image_bias: np.ndarray | None = None) -> RetrievalMetrics:
    """COCO-style Recall@1/5/10 and median rank both ways, and the reference's top-k accuracy
    (the first caption of each image as the query, a hit when the image is in the top ``k``).
    ``image_bias [N]``: a per-image score offset for the text->image direction (and top-k
    accuracy), e.g. :func:`dualsearch.index.qbnorm.offsets`; image->text is unchanged."""
    text_image = np.asarray(text_image)
    if len(image_emb) == 0 or len(text_emb) == 0:
        raise DataError("retrieval metrics need at least one image and one caption")
    t2i = text_to_image_ranks(image_emb, text_emb, text_image, block_elems, image_bias)
    i2t = image_to_text_ranks(image_emb, text_emb, text_image, block_elems)
    _, first = np.unique(text_image, return_index=True)  # first caption of each image
    top_k = float(100.0 * np.mean(t2i[first] <= k))
    return RetrievalMetrics(recall_summary(t2i), recall_summary(i2t), {"k": k, "value": top_k},
                            images=len(image_emb), queries=len(text_emb))
