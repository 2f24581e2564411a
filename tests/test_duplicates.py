"""Near-duplicates: the threshold measured on generated copies (resized, re-encoded, cropped) of
photos embedded by the default image tower, grouping through each ANN kind, query-time collapsing,
and `dualsearch duplicates` end to end."""
import io
import json

import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

from dualsearch.cli import library as cli_library
from dualsearch.cli import main
from dualsearch.index import ann
from dualsearch.index.build import build_index
from dualsearch.index.duplicates import DEFAULT_THRESHOLD, DuplicatesError, collapse, find_duplicates, group_pairs
from dualsearch.search import Searcher

GRID = 3  # the photo cut into 3 x 3 tiles: nine distinct pictures (200 x 170, shown at 600 x 510)
COPY_KINDS = ("resized", "jpeg", "cropped")


def make_copy(img: Image.Image, how: str, rng: np.random.Generator) -> Image.Image:
    """A near-duplicate of ``img``: resized to 50-70 %, re-encoded as JPEG at quality 40-70, or
    cropped by 5-10 % (then back to the original size)."""
    out = img.convert("RGB")
    if how == "cropped":
        w, h = out.size
        f = rng.uniform(0.05, 0.10)
        left, top = int(w * f * rng.uniform(0, 1)), int(h * f * rng.uniform(0, 1))
        out = out.crop((left, top, left + int(w * (1 - f)), top + int(h * (1 - f)))).resize((w, h))
    if how == "resized":
        f = rng.uniform(0.5, 0.7)
        out = out.resize((max(1, int(out.width * f)), max(1, int(out.height * f))), Image.LANCZOS)
    if how == "jpeg":
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=int(rng.integers(40, 71)))
        out = Image.open(io.BytesIO(buf.getvalue()))
    return out


def photo_tiles() -> list[Image.Image]:
    """Distinct real-photo pictures, offline: matplotlib's sample photo (grace_hopper.jpg, 600 x 512,
    shipped with matplotlib) cut into non-overlapping tiles, each enlarged 3x: photos are larger than
    the model's 224-pixel input, so that a copy at 50 % still has more pixels than the model sees."""
    src = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    w, h = src.width // GRID, src.height // GRID
    return [src.crop((i * w, j * h, (i + 1) * w, (j + 1) * h)).resize((3 * w, 3 * h), Image.LANCZOS)
            for j in range(GRID) for i in range(GRID)]


@pytest.fixture(scope="module")
def photo_model(tmp_path_factory, tiny_text_model):
    """The default image tower (EfficientNet-Lite0, ImageNet weights, frozen as the default recipe
    keeps it) behind a fresh projection head of the default width (256); a tiny text tower (text
    plays no part here)."""
    import torch

    from dualsearch.config import ModelConfig
    from dualsearch.model.dual_encoder import DualEncoder

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("photo-model") / "m"
    DualEncoder(ModelConfig(image_tower="efficientnet-lite0", text_tower=f"hf:{tiny_text_model}")).save(d)
    return d


@pytest.fixture(scope="module")
def dup_folder(tmp_path_factory):
    """Nine photo tiles, each with three copies (resized, JPEG, cropped) in a sub-folder."""
    col = tmp_path_factory.mktemp("dups") / "photos"
    (col / "copies").mkdir(parents=True)
    rng = np.random.default_rng(7)
    for n, tile in enumerate(photo_tiles()):
        tile.save(col / f"tile{n}.jpg", quality=92)
        for how in COPY_KINDS:
            make_copy(tile, how, rng).save(col / "copies" / f"tile{n}-{how}.png")
    return col


@pytest.fixture(scope="module")
def dup_index(tmp_path_factory, dup_folder, photo_model):
    out = tmp_path_factory.mktemp("dup-index") / "index"
    build_index(dup_folder, photo_model, out, kind="flat", num_workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def embedded(dup_index):
    """(ids, vectors, names): the index's vectors and each one's file stem."""
    s = Searcher.open(dup_index)
    try:
        ids, vecs = s.catalog.vectors(s.dim)
        paths = s.catalog.paths_for(ids)
    finally:
        s.close()
    names = [paths[int(i)].rsplit("/", 1)[-1].rsplit(".", 1)[0] for i in ids]
    return ids, vecs, names


def origin(name: str) -> str:
    return name.rsplit("-", 1)[0]


def test_threshold_separates_copies_from_distinct_images(embedded):
    """The measurement behind DEFAULT_THRESHOLD (figures in dualsearch.index.duplicates)."""
    ids, vecs, names = embedded
    sims = vecs @ vecs.T
    pos = {n: i for i, n in enumerate(names)}
    copies = np.array([sims[i, pos[origin(n)]] for i, n in enumerate(names) if origin(n) != n])
    originals = [i for i, n in enumerate(names) if origin(n) == n]
    distinct = sims[np.ix_(originals, originals)][np.triu_indices(len(originals), 1)]
    for how in COPY_KINDS:
        got = [sims[i, pos[origin(n)]] for i, n in enumerate(names) if n.endswith("-" + how)]
        print(f"\n{how}: min {min(got):.4f} median {np.median(got):.4f}", end="")
    print(f"\ncopy-original cosine: min {copies.min():.4f} median {np.median(copies):.4f} (n={len(copies)}); "
          f"distinct-pair cosine: max {distinct.max():.4f} median {np.median(distinct):.4f} (n={len(distinct)})")
    assert len(copies) == GRID * GRID * len(COPY_KINDS) and len(originals) == GRID * GRID
    assert copies.min() >= DEFAULT_THRESHOLD + 0.02 and distinct.max() <= DEFAULT_THRESHOLD - 0.02
    assert cli_library.DEFAULT_THRESHOLD == DEFAULT_THRESHOLD


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_groups_through_every_kind(kind):
    """Clusters of 1-5 near-identical unit vectors among 3,000 distinct ones come out as the groups,
    whatever the index kind (range search on flat and HNSW, k-NN on IVF-PQ)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3000, 32)).astype(np.float32)
    sizes = rng.integers(1, 6, len(base))
    x = np.concatenate([b + rng.normal(scale=0.02, size=(s, 32)) for b, s in zip(base, sizes)]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.arange(len(x), dtype=np.int64) * 2 + 10
    owner = np.repeat(np.arange(len(base)), sizes)
    built = ann.build(x, ids, kind)
    groups = find_duplicates(built.index, ids, x, threshold=0.95)
    want = sorted((sorted(ids[owner == o].tolist()) for o in np.flatnonzero(sizes > 1)),
                  key=lambda g: (-len(g), g[0]))
    assert groups == want
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)


def test_group_pairs_is_transitive_and_bad_input_is_one_line():
    ids = np.array([40, 10, 30, 20, 50])
    assert group_pairs(ids, np.array([10, 20]), np.array([20, 30])) == [[10, 20, 30]]
    assert group_pairs(ids, np.array([], np.int64), np.array([], np.int64)) == []
    idx = ann.build(np.eye(4, dtype=np.float32), np.arange(4), "flat").index
    for bad in (0, 1.5, "x", float("nan")):
        with pytest.raises(DuplicatesError, match="threshold"):
            find_duplicates(idx, np.arange(4), np.eye(4, dtype=np.float32), bad)
    with pytest.raises(DuplicatesError, match="3 ids but 4 vectors"):
        find_duplicates(idx, np.arange(3), np.eye(4, dtype=np.float32), 0.9)


def test_collapse_keeps_the_best_of_each_group():
    v = np.eye(3, dtype=np.float32)
    vecs = np.stack([v[0], v[1], 0.999 * v[0] + 0.045 * v[2], v[2], v[1]])
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.array([7, 8, 9, 10, 11])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    got = collapse(np.append(ids, -1), np.append(scores, -np.inf), np.vstack([vecs, np.zeros(3)]), 0.95)
    assert [(c.id, c.count, c.members) for c in got] == [(7, 2, [7, 9]), (8, 2, [8, 11]), (10, 1, [10])]
    by_id = dict(zip(ids.tolist(), vecs))
    getter = lambda i: np.stack([by_id[int(j)] for j in i])  # noqa: E731
    assert [c.id for c in collapse(ids, scores, getter)] == [7, 8, 10]
    with pytest.raises(DuplicatesError):
        collapse(ids, scores[:2], vecs)


def test_cli_groups_copies_and_not_distinct_images(dup_index, tmp_path, capsys):
    assert main(["-q", "duplicates", str(dup_index), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    groups = [sorted(origin(p.rsplit("/", 1)[-1].rsplit(".", 1)[0]) for p in g["paths"]) for g in doc["groups"]]
    assert len(groups) == GRID * GRID and doc["threshold"] == DEFAULT_THRESHOLD
    assert all(len(g) == 1 + len(COPY_KINDS) and len(set(g)) == 1 for g in groups)  # one original each
    assert len({g[0] for g in groups}) == GRID * GRID
    assert main(["-q", "duplicates", str(dup_index), "--grid", str(tmp_path / "grids")]) == 0
    text = capsys.readouterr().out
    assert text.count("group ") == GRID * GRID and "-jpeg.png" in text
    grids = sorted((tmp_path / "grids").glob("*.png"))
    assert len(grids) == GRID * GRID and Image.open(grids[0]).size[0] > 100
    assert main(["-q", "duplicates", str(dup_index), "--threshold", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["groups"] == []


def test_cli_rejects_bad_threshold_and_missing_index(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["duplicates", str(tmp_path), "--threshold", "1.5"])
    assert e.value.code == 2 and "--threshold" in capsys.readouterr().err
    assert main(["duplicates", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err
