"""What training batches are made of: (image, caption) pairs from cached features, cached
activations at a tower's cut point, or raw inputs."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import TrainConfig
from ..data.images import ImageLoadError, load_image
from ..data.readers import DataError
from ..data.records import ImageCaption
from ..encode.activations import image_activations, text_activations
from ..encode.features import flatten_captions, tower_features
from ..encode.loader import default_workers
from ..errors import UsageError

MIN_TRAIN_IMAGES = 2  # a contrastive batch needs a negative
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Side:
    """How one side of the pairs reaches its head: ``features`` (a frozen tower's output, computed
    once), ``activations`` (a ``last:N`` tower's activations at block ``cut``, computed once; its
    last blocks run every step) or ``raw`` (pixels / tokens; the whole tower runs every step)."""

    kind: str = "raw"
    cut: int | None = None

    def describe(self) -> str:
        return {"features": "cached features", "raw": "tower every step"}.get(
            self.kind, f"cached activations at block {self.cut}")


class Pairs(Dataset):
    """(image item, caption item) pairs. Each side is either cached (a tower feature ``[F]``, or the
    activations at a cut point: ``[C,H,W]`` for an image, ``[L,D]`` for a caption, float16) or a raw
    input (preprocessed pixels; a caption string, tokenised by the collate), so that a frozen tower
    uses its cache even when the other tower trains.

    ``pairs="all"``: every (image, caption) pair once an epoch (the reference);
    ``pairs="sample"``: one item per image, its caption drawn at random each time (so a batch never
    holds the same image twice); ``fixed=True`` draws caption 0 (for validation);
    ``pairs="grouped"``: one item per image with all its captions (a list), for the multi-positive
    loss (:func:`dualsearch.model.losses.clip_loss` with ``owner``)."""

    def __init__(self, records: Sequence[ImageCaption], pairs: str, image_feats: np.ndarray | None = None,
                 text_feats: np.ndarray | list[np.ndarray] | None = None, preprocess=None, target_size: int = 224,
                 fixed: bool = False, augment: bool = False):
        self.records = list(records)
        counts = np.array([len(r.captions) for r in self.records])
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.counts = counts
        self.owner = np.repeat(np.arange(len(self.records)), counts)
        self.pairs = pairs
        self.img = torch.from_numpy(image_feats) if image_feats is not None else None
        self.txt = (None if text_feats is None else [torch.from_numpy(a) for a in text_feats]
                    if isinstance(text_feats, list) else torch.from_numpy(text_feats))
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
        if self.pairs == "grouped":
            text = [self._caption(i, int(self.starts[i]) + j) for j in range(self.counts[i])]
        else:
            text = self._caption(i, c)
        if self.img is not None:
            return self.img[i], text
        try:
            img = load_image(self.records[i].image, target_size=self.target_size)
        except ImageLoadError:
            return None
        if self.augment:
            img = _augment(img)
        return self.preprocess(img), text

    def _caption(self, i: int, c: int):
        """Caption ``c`` (flat index) of image ``i``: its cached item, or its string."""
        return self.txt[c] if self.txt is not None else self.records[i].captions[c - self.starts[i]]


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
    """Stacks tensors, tokenises caption strings, pads captions' cached activations ``[L_i, D]`` into
    (``[B, L, D]``, padding mask ``[B, L]``), drops images that failed to decode. Items with a list
    of captions (``pairs="grouped"``) are flattened to ``M`` captions, and the batch gains ``owner
    [M]``: the image of each caption."""

    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, batch):
        batch = [b for b in batch if b is not None]
        if not batch:  # every image failed to decode: the step is skipped
            return None
        images = torch.stack([b[0] for b in batch])
        texts = [b[1] for b in batch]
        if isinstance(texts[0], list):
            owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(t) for t in texts]))
            return images, self._texts([t for group in texts for t in group]), owner
        return images, self._texts(texts)

    def _texts(self, texts: list):
        if not isinstance(texts[0], torch.Tensor):
            return self.tokenize(texts)
        if texts[0].dim() == 1:
            return torch.stack(texts)
        lengths = torch.tensor([len(t) for t in texts])
        mask = (torch.arange(int(lengths.max())) < lengths[:, None]).long()
        return torch.nn.utils.rnn.pad_sequence(texts, batch_first=True), mask


class TopicBatches(torch.utils.data.Sampler):
    """Batches of items that share a topic: each epoch, the items of each topic in a random order,
    the topics in a random order, cut into batches of ``batch_size`` (the last one dropped when
    ``drop_last``), the batches shuffled. A batch then holds the images whose captions are closest
    to one another, the hardest negatives there are for one another, and costs nothing per step:
    Topic-Aware Sampling (TAS; Hofstätter et al., "Efficiently Teaching an Effective Dense Retriever
    with Balanced Topic Aware Sampling", SIGIR 2021), with captions as the queries.

    ``topics [N]``: each dataset item's topic (:func:`caption_topics`); ``seed``: the random order."""

    def __init__(self, topics: np.ndarray, batch_size: int, drop_last: bool, seed: int):
        super().__init__()
        self.topics, self.batch_size, self.drop_last = np.asarray(topics), int(batch_size), drop_last
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        n = len(self.topics)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = [self.rng.permutation(np.flatnonzero(self.topics == t)) for t in self.rng.permutation(
            np.unique(self.topics))]
        items = np.concatenate(order)
        batches = [items[s:s + self.batch_size] for s in range(0, len(items), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        for b in self.rng.permutation(len(batches)):
            yield batches[b].tolist()


def caption_topics(text_feats: np.ndarray, owner: np.ndarray, n_images: int, clusters: int,
                   seed: int) -> np.ndarray:
    """Each image's topic ``[n_images]``, one of ``clusters``: spherical k-means (FAISS) over the
    images' mean unit caption features (``text_feats [M, E]``, ``owner [M]``: the image of each
    caption)."""
    import faiss

    k = min(max(1, clusters), n_images)
    if k == 1:
        return np.zeros(n_images, np.int64)
    feats = text_feats.astype(np.float32)
    feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    mean = np.zeros((n_images, feats.shape[1]), np.float32)
    np.add.at(mean, owner, feats)
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    km = faiss.Kmeans(mean.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1)
    km.train(mean)
    return km.index.search(mean, 1)[1][:, 0].astype(np.int64)


def _side_inputs(model, sides: tuple[Side, Side], records, cache_root, device: str, num_workers, progress: bool):
    """(records kept, image side's cached array or None, text side's or None): the image side first
    (images that fail to decode are left out), then the captions of the records kept."""
    image, text = sides
    img = txt = None
    if image.kind == "features":
        f = tower_features(model, records, cache_root, device, num_workers, images=True, texts=False,
                           show_progress=progress)
        records, img = f.records, f.image
    elif image.kind == "activations":
        records, img = image_activations(model.image_tower, image.cut, records, cache_root, device, num_workers,
                                         show_progress=progress)
    if text.kind == "features":
        txt = tower_features(model, records, cache_root, device, num_workers, images=False, texts=True,
                             show_progress=progress).text
    elif text.kind == "activations":
        txt = text_activations(model.text_tower, text.cut, flatten_captions(records)[0], cache_root, device,
                               show_progress=progress)
    return records, img, txt


def check_topic_batches(tcfg: TrainConfig, sides: tuple[Side, Side]) -> None:
    """Topic batches cluster the captions' cached tower features: raises
    :class:`~dualsearch.errors.UsageError` when the text side is not ``features``."""
    if tcfg.topic_batches and sides[1].kind != "features":
        raise UsageError("--topic-batches clusters the captions' cached tower features: it needs a frozen text "
                         "tower and the feature cache")


def topics_of(ds: Pairs, tcfg: TrainConfig) -> np.ndarray:
    """Each item's topic ``[len(ds)]`` for :class:`TopicBatches`, from the cached caption features
    (:func:`caption_topics`, one topic per batch of items, so that a topic fills about one batch; an
    item of ``pairs="all"`` is a caption: its image's topic); the text side must be ``features``
    (:func:`check_topic_batches`)."""
    clusters = round(len(ds) / tcfg.batch_size)
    if clusters <= 1:
        log.warning("--topic-batches: %d training items fill about one batch of %d, so there is one topic: "
                    "batches are drawn as without it", len(ds), tcfg.batch_size)
    topics = caption_topics(ds.txt.numpy(), ds.owner, len(ds.records), clusters, tcfg.seed)
    return topics[ds.owner] if ds.pairs == "all" else topics


def build_loaders(model, tcfg: TrainConfig, train: Sequence[ImageCaption],
                  val: Sequence[ImageCaption], sides: tuple[Side, Side], cache_root, device: str,
                  num_workers: int | None, progress: bool = True):
    """(train, val or None) DataLoaders; a side whose tower is frozen (``features``) or cut
    (``activations``) reads what was computed once through the cache under ``cache_root`` (None:
    no cache), a ``raw`` side reads raw inputs. Raises :class:`DataError` when fewer than
    ``MIN_TRAIN_IMAGES`` training images are left once unreadable ones are dropped; a validation
    set with fewer is dropped with a warning (its contrastive loss would be 0). ``progress``:
    feature steps show their progress (:func:`dualsearch.logs.progress`)."""
    image_cached = sides[0].kind != "raw"

    def dataset(records, fixed):
        records, img_f, txt_f = _side_inputs(model, sides, records, cache_root, device, num_workers, progress)
        return Pairs(records, tcfg.pairs, img_f, txt_f, model.image_tower.preprocessor(),
                     model.image_tower.image_size, fixed=fixed, augment=tcfg.augment and not fixed)

    train_ds = dataset(train, False)
    if len(train_ds.records) < MIN_TRAIN_IMAGES:
        raise DataError(f"{len(train_ds.records)} training images left after decoding; a contrastive batch "
                        f"needs at least {MIN_TRAIN_IMAGES}")
    val_ds = dataset(val, True) if val else None
    if val_ds is not None and len(val_ds.records) < MIN_TRAIN_IMAGES:  # one image: its contrastive loss is 0
        log.warning("%d usable validation image(s): a contrastive loss needs %d, so training stops early on the "
                    "training loss instead (give more with --val-fraction or --val-captions)", len(val_ds.records),
                    MIN_TRAIN_IMAGES)
        val_ds = None
    workers = 0 if image_cached else (default_workers() if num_workers is None else num_workers)
    # no persistent workers: a fresh iterator each epoch draws its seeds as the cached path's
    # does, so both paths see the same batches in every epoch
    kw = {"num_workers": workers, "collate_fn": PairCollate(model.text_tower.tokenize)}
    g = torch.Generator().manual_seed(tcfg.seed)
    drop_last = len(train_ds) > tcfg.batch_size
    if tcfg.topic_batches:
        topics = topics_of(train_ds, tcfg)
        train_dl = DataLoader(train_ds, batch_sampler=TopicBatches(topics, tcfg.batch_size, drop_last, tcfg.seed),
                              generator=g, **kw)
    else:
        train_dl = DataLoader(train_ds, batch_size=tcfg.batch_size, shuffle=True, drop_last=drop_last, generator=g,
                              **kw)
    val_dl = DataLoader(val_ds, batch_size=tcfg.batch_size, shuffle=False, **kw) if val_ds is not None else None
    return train_dl, val_dl
