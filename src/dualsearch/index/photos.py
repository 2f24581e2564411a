"""The photo-library side of an index: the metadata pass and the weak-match calibration.

**Metadata pass** (:func:`fill_metadata`): every indexed row whose metadata is not read yet gets
it (:func:`dualsearch.data.metadata.read_metadata`: headers only, no decoding), committed in
batches, so an index upgraded from schema 1 is completed by its next run without re-embedding.

**Weak-match floor** (:func:`calibrate`): cosine scores differ by model and by query (rclip's and
Immich's maintainers rejected fixed thresholds for that reason), so a result is judged against its
own query's score distribution over the whole gallery: ``z = (s - q.mu) / sqrt(q^T Sigma q)``,
with ``mu`` [D] and ``Sigma`` [D, D] the gallery's mean and covariance (exact, streamed from the
catalog; stored in ``calibration.npz``). A result is marked weak when its score is below the best
top-1 score that any query of a bank of everyday queries (unrelated to most collections) reaches on
this index: it matches its query no better than an unrelated query's best match does. ``z`` is
reported with every result, and the bank's ``quantile`` of top-1 z is stored, but neither decides.
Measured on the shapes held-out set (``bench/library.py``; queries about a colour removed from the
gallery, 300 each; a no-match top 1 marked weak / a true match at rank 1 marked weak): z floor
(bank 95th percentile) 36.0 % / 7.3 %, z or score floors 43.7 % / 7.3 %, this rule **47.7 % /
2.6 %** with the ``clip`` recipe; with the default recipe (ConSE prior) 56.7 % / 14.7 %, 63.7 % /
14.7 % and **67.0 % / 4.2 %**. (In the spirit of score normalisation for open-set retrieval, e.g. QB-Norm, Bogolin
et al. CVPR 2022, which also normalises by a query bank; here only to flag, never to re-rank.)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..data.images import ImageLoadError, is_uri, stored_source
from ..data.metadata import PhotoMetadata, read_metadata
from ..data.records import ImageRef
from ..logs import progress
from ..storage import atomic_path
from .catalog import Catalog

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.npz"
CALIBRATION_QUANTILE = 0.95

# Everyday scenes and objects: a bank of queries most collections hold no true match for (a few
# will match in a general photo library; the quantile tolerates that).
NULL_QUERIES = tuple("""a plate of spaghetti with tomato sauce|a traffic jam on a highway at night|a violin lying on \
a velvet cloth|a snowy mountain peak under a blue sky|a golden retriever catching a frisbee|an old steam \
locomotive|a bowl of ramen|a hot air balloon over a desert|a chess board in the middle of a game|a lighthouse \
on a rocky coast|a close-up of a honeybee on a sunflower|a crowded subway platform|a birthday cake with \
candles|a sailboat at sunset|a laptop on a wooden desk|a cathedral's stained glass window|a tiger resting in \
tall grass|a bicycle leaning against a brick wall|a pair of running shoes|a microscope in a laboratory|a \
waterfall in a tropical forest|a vintage red telephone box|a basket of fresh strawberries|a surfer riding a \
large wave|a newborn baby sleeping|a city skyline reflected in a river|an astronaut floating in space|a \
campfire under the stars|a wedding couple walking down the aisle|a bookshelf full of old books|a plate of \
sushi|a windmill in a tulip field|a penguin colony on the ice|a cup of coffee with latte art|a tractor \
ploughing a field|a child blowing soap bubbles|a skateboarder doing a trick|a thunderstorm over the \
prairie|a pair of reading glasses on a newspaper|a medieval castle on a hill|a jellyfish glowing in dark \
water|a grand piano on a stage|a fire truck with flashing lights|a field of lavender in bloom|a cat sleeping \
on a windowsill|a football stadium full of fans|a mug of hot chocolate with marshmallows|a desert road \
stretching to the horizon|an airplane taking off from a runway|a farmer's market stall full of \
vegetables""".split("|"))


def _metadata_of(path: str, mtime_ns: int) -> PhotoMetadata:
    """A file's metadata; a WebDataset member's from its bytes; a URI's: none (never fetched)."""
    if is_uri(path):
        return PhotoMetadata()
    if "::" in path:
        try:
            src = stored_source(path)
            return read_metadata(src.read_bytes() if isinstance(src, ImageRef) else src, mtime_ns)
        except (ImageLoadError, OSError):
            return PhotoMetadata()
    return read_metadata(path, mtime_ns)


PROGRESS_FROM = 10_000  # rows: a smaller pass takes a few seconds at most and prints no line of its own


def fill_metadata(catalog: Catalog, batch: int = 512, show_progress: bool = True) -> int:
    """Read and store the metadata of every indexed row that lacks it (see the module docstring),
    committing every ``batch`` rows (a killed run keeps what it read); a progress line only from
    :data:`PROGRESS_FROM` rows (an upgraded library). -> rows filled."""
    total = catalog.count_missing_metadata()
    done = 0
    if not total:
        return 0
    with progress(total, "photo metadata", enabled=show_progress and total >= PROGRESS_FROM) as bar:
        while rows := catalog.missing_metadata(batch):
            catalog.write_metadata([(vid, _metadata_of(path, mtime)) for vid, path, mtime in rows])
            done += len(rows)
            bar.update(len(rows))
    return done


def gallery_moments(catalog: Catalog, dim: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean ``[D]``, covariance ``[D, D]`` float64, count) of the indexed vectors, in one stream."""
    total, s1, s2 = 0, np.zeros(dim), np.zeros((dim, dim))
    for _, vecs in catalog.iter_vectors(dim):
        v = vecs.astype(np.float64)
        total += len(v)
        s1 += v.sum(0)
        s2 += v.T @ v
    if not total:
        return np.zeros(dim), np.zeros((dim, dim)), 0
    mean = s1 / total
    return mean, s2 / total - np.outer(mean, mean), total


def query_z(queries: np.ndarray, scores: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """z-scores of ``scores [n, k]`` (inner products) for unit ``queries [n, D]``: how many of the
    query's own gallery standard deviations each score lies above its gallery mean."""
    q = np.asarray(queries, np.float64)
    mu = q @ mean
    sd = np.sqrt(np.maximum(np.einsum("nd,de,ne->n", q, cov, q), 1e-12))
    return (np.asarray(scores, np.float64) - mu[:, None]) / sd[:, None]


def calibrate(folder: Path, catalog: Catalog, dim: int, embed_texts: Callable[[Sequence[str]], np.ndarray],
              search: Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]],
              quantile: float = CALIBRATION_QUANTILE) -> dict | None:
    """Compute and store the weak-match floor of an index (module docstring). ``embed_texts``
    maps texts to unit vectors ``[n, D]``; ``search(queries, k)`` is the ANN search. Writes
    ``folder/calibration.npz`` (mean, covariance) and returns the manifest's ``calibration``
    entry (``z_floor``, ``quantile``, ``bank``, ``method``, and ``best_bank_queries``: the bank's
    queries that match this index best); None for an empty index."""
    mean, cov, n = gallery_moments(catalog, dim)
    if n == 0:
        return None
    queries = np.asarray(embed_texts(list(NULL_QUERIES)), np.float32)
    scores, _ = search(queries, 1)
    top_z = query_z(queries, scores[:, :1], mean, cov)[:, 0]
    with atomic_path(folder / CALIBRATION_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mean=mean.astype(np.float32), cov=cov.astype(np.float32))
    floor = float(np.quantile(top_z, quantile))
    best = [NULL_QUERIES[i] for i in np.argsort(-top_z)[:8]]
    return {"method": "gallery z-score and score vs unrelated-query bank", "z_floor": round(floor, 4),
            "score_floor": round(float(scores[:, 0].max()), 4),
            "quantile": quantile, "bank": len(NULL_QUERIES), "bank_top1_z_median": round(float(np.median(top_z)), 4),
            "best_bank_queries": best}


def load_calibration(folder: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(mean, covariance, score floor) stored with an index, or None (an index built before it,
    or before the score floor)."""
    entry = manifest.get("calibration")
    try:
        with np.load(folder / CALIBRATION_FILE) as f:
            mean, cov = f["mean"].astype(np.float64), f["cov"].astype(np.float64)
    except (OSError, KeyError, ValueError):
        return None
    if not entry or "score_floor" not in entry or mean.shape != (manifest["dim"],):
        return None
    return mean, cov, float(entry["score_floor"])
