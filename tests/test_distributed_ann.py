"""The IVF-PQ index built on Spark from Parquet shards (pyspark in local mode, a real JVM)."""
import json
import shutil

import faiss
import numpy as np
import pytest

from dualsearch.index import ann, distributed, qbnorm
from dualsearch.index import spark as sp
from dualsearch.index.catalog import Catalog
from dualsearch.index.plan import SHARD_PREFIX, Part

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java: make test installs it")

DIM = 32


def clustered(rng, n: int, centers: np.ndarray) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + rng.normal(scale=0.35, size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_shard(folder, name: str, vecs: np.ndarray, skipped: int, start: int) -> None:
    """A shard as an executor writes it: ``skipped`` unreadable files between the indexed ones."""
    import pyarrow as pa

    n = len(vecs) + skipped
    status = ["indexed"] * n
    for i in range(skipped):
        status[(i * 7 + 3) % n] = "skipped"
    it = iter(vecs)
    emb = [next(it).tolist() if s == "indexed" else None for s in status]
    table = pa.table({
        "path": pa.array([f"/photos/{start + i:06d}.jpg".encode() for i in range(n)], pa.binary()),
        "size": pa.array(np.full(n, 1000, np.int64)), "mtime_ns": pa.array(np.zeros(n, np.int64)),
        "status": pa.array(status), "reason": pa.array([None if s == "indexed" else "corrupt image" for s in status]),
        "embedding": pa.array(emb, pa.list_(pa.float32(), DIM)),
    })
    sp.write_shard(table, str(folder), f"{SHARD_PREFIX}{name}.parquet")


@pytest.fixture(scope="module")
def spark():
    session = sp.spark_session("local[2]")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """6,000 vectors in 4 shards, ingested into a catalog that refers to them."""
    root = tmp_path_factory.mktemp("dist")
    shards, index = root / "embeddings", root / "index"
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(40, DIM))
    vecs = clustered(rng, 6000, centers)
    cat = Catalog(index, create=True)
    shards.mkdir()
    cat.set_shards_uri(str(shards))
    start = 0
    for k, size in enumerate((2000, 1500, 1500, 1000)):
        write_shard(shards, f"s{k}", vecs[start:start + size], skipped=5, start=start + 5 * k)
        sp.ingest(cat, Part(f"s{k}", "files", ()), str(shards), DIM)
        start += size
    yield cat, index, centers
    cat.close()


def test_distributed_build_reaches_recall_and_labels_with_catalog_ids(spark, sharded):
    cat, index_dir, centers = sharded
    assert cat.count() == 6000 and cat.count("skipped") == 20
    built = distributed.build(spark, cat, DIM, index_dir, task_rows=1600)  # 3 tasks over 4 shards
    assert built.kind == "ivfpq" and built.params["ondisk"] and built.index.ntotal == 6000
    assert set(built.seconds) == {"sample", "train", "add", "merge", "tune"} and built.stats["tasks"] == 3
    assert not list(index_dir.parent.glob("embeddings/.ann-*"))  # the tasks' parts are cleaned up

    index = ann.read(index_dir / built.params["file"], built.params)  # a fresh, memory-mapped reader
    ids, vectors = cat.vectors(DIM)
    queries = clustered(np.random.default_rng(1), 200, centers)
    _, truth = faiss.knn(queries, vectors, 10, metric=faiss.METRIC_INNER_PRODUCT)
    truth = ids[truth]
    assert ann.recall_at(index, queries, truth) >= 0.9
    scores, got = index.search(queries[:5], 3)  # labels are the catalog's vector ids
    again = cat.vectors_for(got.ravel(), DIM).reshape(5, 3, DIM)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries[:5], again), atol=0.02)

    allowed = np.sort(ids[ids % 3 == 0])  # filtered search through the id selectors
    s, i = ann.search(index, queries[:20], 10, allowed)
    assert np.isin(i[i >= 0], allowed).all() and (i >= 0).sum(axis=1).min() == 10


def test_positions_follow_shards_and_rows(sharded):
    cat, _, _ = sharded
    groups, ids = distributed.group_shards(cat.shard_rows(), task_rows=1600)
    assert [g.size for g in groups] == [2000, 3000, 1000] and len(ids) == 6000 == len(np.unique(ids))
    positions = np.concatenate([s[2] for g in groups for s in g.shards])
    np.testing.assert_array_equal(positions, np.arange(6000))


def test_index_command_builds_the_ivfpq_index_on_spark(tmp_path, tiny_model, spark, capsys):
    """`dualsearch index --engine spark --ann ivfpq`: embedded and indexed on Spark, searched
    through the on-disk index the manifest names; a re-run with nothing new keeps it."""
    from PIL import Image

    from dualsearch.cli import main
    from dualsearch.search import Searcher

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2100):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(photos / f"{i:04d}.png")
    out = tmp_path / "index"
    args = ["index", str(photos), "--model", str(tiny_model), "--out", str(out), "--engine", "spark", "--ann", "ivfpq",
            "--shard-size", "700"]
    assert main(args) == 0
    assert "2100 embedded" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ann"]["kind"] == "ivfpq" and manifest["ann"]["params"]["ondisk"]
    assert len(list(out.glob("vectors.faiss.*.ivfdata"))) == 1
    # the add tasks computed every QB-Norm offset, as the driver would have
    assert manifest["qbnorm"]["by_tasks"] == manifest["qbnorm"]["computed"] == 2100
    searcher = Searcher.open(out)
    try:
        texts, beta = qbnorm.model_bank(tiny_model)
        ids, vecs = searcher.catalog.vectors(searcher.dim)
        expect = qbnorm.offsets(np.stack([searcher.text_vector(t) for t in texts]), vecs, beta)
        np.testing.assert_allclose(searcher.qbnorm.of(ids), expect, atol=1e-5)
        page = searcher.search_page("a red circle", k=5)
        assert len(page.results) == 5 and all(r.path.endswith(".png") for r in page.results)
        own = searcher.id_vector(page.results[0].id)
        one = searcher.search_vector(own, k=1)
        # an image finds itself, or a twin: the tiny model maps some of the 8x8 noise images to one vector
        assert float(searcher.id_vector(one.results[0].id) @ own) > 0.999
    finally:
        searcher.close()
    assert main(args) == 0 and "2100 unchanged" in capsys.readouterr().out


def test_local_ivfpq_index_is_on_disk_and_replaced_whole(tmp_path, tiny_model):
    """The local path builds IVF-PQ on disk too (`ondisk.build_local` over the catalog): searched
    through the manifest, and a rebuild leaves one list file."""
    from dualsearch.index.build import index_vectors
    from dualsearch.search import Searcher

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(30, 16))
    x = centers[rng.integers(0, 30, 3000)] + rng.normal(scale=0.3, size=(3000, 16))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    out = tmp_path / "index"
    paths = [f"/photos/{i:05d}.jpg" for i in range(3000)]
    index_vectors(out, tiny_model, paths[:2500], x[:2500], kind="ivfpq")
    index_vectors(out, tiny_model, paths[2500:], x[2500:], kind="ivfpq")  # more photos: rebuilt
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ann"]["kind"] == "ivfpq" and manifest["ann"]["params"]["ondisk"] and manifest["count"] == 3000
    assert len(list(out.glob("vectors.faiss.*.ivfdata"))) == 1
    searcher = Searcher.open(out)
    try:
        hits = [searcher.search_vector(x[i], k=1).results[0].path for i in range(0, 3000, 100)]
        assert sum(h == paths[i] for h, i in zip(hits, range(0, 3000, 100))) >= 27  # an image finds itself
    finally:
        searcher.close()


def test_shards_uri_is_absolute_or_relative_to_the_index(tmp_path, monkeypatch):
    """A relative path is taken from the working folder; inside the index folder it is stored
    relative to it (a copy reads its own shards); outside, absolute."""
    monkeypatch.chdir(tmp_path)
    cat = Catalog(tmp_path / "index", create=True)
    cat.set_shards_uri("elsewhere/emb")
    assert cat.shards_uri == str(tmp_path / "elsewhere" / "emb")
    cat.set_shards_uri(str(tmp_path / "index" / "embeddings"))
    assert cat.get_meta("shards_uri") == "embeddings" and cat.shards_uri == str(tmp_path / "index" / "embeddings")
    cat.close()
