"""The Spark engine (pyspark in local mode, a real JVM) against the local path."""
import functools
import http.server
import json
import os
import shutil
import sqlite3
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from dualsearch.cli import main
from dualsearch.errors import DualsearchError
from dualsearch.index import spark as sp
from dualsearch.index.build import build_index, build_index_spark
from dualsearch.index.catalog import Catalog
from dualsearch.search import Searcher

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="Spark needs Java: make test installs it")


@pytest.fixture(scope="module")
def spark():
    session = sp.spark_session("local[2]")
    yield session
    session.stop()


def catalog_rows(index) -> tuple[dict, dict]:
    """-> ({path: vector} of indexed files, {path: reason} of skipped ones)."""
    cat = Catalog(index, readonly=True)
    try:
        ids, vectors = cat.vectors(int(json.loads((Path(index) / "manifest.json").read_text())["dim"]))
        paths = cat.paths_for(ids)
        vecs = {paths[int(i)]: v for i, v in zip(ids, vectors)}
        return vecs, dict(cat.skipped())
    finally:
        cat.close()


def add_corrupt(col):
    good = sorted(col.glob("*.jpg"))[0].read_bytes()
    (col / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (col / "text.png").write_text("I am not a PNG")


def test_spark_matches_local_path(tmp_path, collection, tiny_model, spark):  # noqa: F811
    add_corrupt(collection)
    local, dist = tmp_path / "local", tmp_path / "spark"
    build_index(collection, tiny_model, local, num_workers=0, progress=False)
    report = build_index_spark(str(collection), tiny_model, dist, shard_size=7, spark=spark)
    assert report.added == 24 and report.embedded == 24 and report.count == 24
    assert len(list((dist / "embeddings").glob("part-*.parquet"))) == 4  # 26 files in shards of 7

    want, want_bad = catalog_rows(local)
    got, got_bad = catalog_rows(dist)
    assert sorted(got) == sorted(want)
    assert max(float(np.abs(got[p] - want[p]).max()) for p in want) < 1e-5
    assert sorted(got_bad) == sorted(want_bad) and len(got_bad) == 2
    by_name = {os.path.basename(p): r for p, r in got_bad.items()}
    assert "corrupt image" in by_name["truncated.jpg"] and "not an image" in by_name["text.png"]

    a, b = Searcher.open(local), Searcher.open(dist)
    try:
        for q in ("a red circle", "two blue squares on a white background", "stars"):
            ra, rb = a.search(q, k=5), b.search(q, k=5)
            assert [r.path for r in ra] == [r.path for r in rb]
            np.testing.assert_allclose([r.score for r in ra], [r.score for r in rb], atol=1e-5)
    finally:
        a.close()
        b.close()
    # the vectors live once, in the shards: the catalog refers to them
    db = sqlite3.connect(dist / "catalog.sqlite")
    assert db.execute("SELECT COUNT(*) FROM files WHERE vector IS NOT NULL").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM files WHERE shard IS NOT NULL").fetchone()[0] == 24
    db.close()


def test_shard_folder_moved_or_damaged(tmp_path, collection, tiny_model, spark, capsys):  # noqa: F811
    """The shards are the only copy of the Spark path's vectors: a moved folder is refused up front
    (before embedding) until named, then followed; lost or damaged shards have their images
    embedded again; a copied index reads its own shards."""
    out = tmp_path / "idx"
    build_index_spark(str(collection), tiny_model, out, shard_size=10, spark=spark)
    moved = tmp_path / "elsewhere"
    shutil.move(out / "embeddings", moved)
    searcher = Searcher.open(out)
    try:
        assert searcher.search("a red circle", k=3)  # the ANN index holds what a text search needs
        with pytest.raises(DualsearchError, match="cannot read this shard"):  # "more like this" needs its vector
            searcher.id_vector(0)
        from fastapi.testclient import TestClient

        from dualsearch.server.app import create_app

        with TestClient(create_app(searcher)) as client:  # the server says so too, not "internal error"
            r = client.get("/api/similar/0")
            assert r.status_code == 503 and "cannot read this shard" in r.json()["detail"]
    finally:
        searcher.close()
    extra = collection / "new.jpg"
    shutil.copy(sorted(collection.glob("*.jpg"))[0], extra)
    args = ["-q", "index", str(collection), "--model", str(tiny_model), "--out", str(out), "--engine", "spark"]
    capsys.readouterr()
    assert main(args) == 2  # moved, not named: nothing embedded into the old place
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not under" in err[0] and "pass --embeddings NEWPLACE" in err[0], err
    assert not (out / "embeddings").exists()
    assert main([*args, "--embeddings", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "index's vectors live in the Parquet shards under" in err[0], err
    assert main([*args, "--embeddings", str(moved)]) == 0  # named: followed, and recorded
    assert "1 embedded" in capsys.readouterr().out
    assert main(args) == 0 and "0 embedded" in capsys.readouterr().out  # the recorded place is used
    extra.unlink()
    assert main(args) == 0 and "1 removed" in capsys.readouterr().out

    refs = Catalog(out, readonly=True).shard_refs()
    shards = [moved / name for name in sorted(refs)[:2]]
    damaged = refs[shards[0].name][0] + refs[shards[1].name][0]
    shards[0].write_bytes(shards[0].read_bytes()[:200])  # truncated
    shards[1].unlink()  # lost
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{damaged} embedded" in printed and f"{24 - damaged} unchanged" in printed, printed
    _, vectors = Catalog(out, readonly=True).vectors(16)
    assert vectors.shape == (24, 16) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)

    copy = tmp_path / "copy"  # the default place is recorded relative to the index folder
    build_index_spark(str(collection), tiny_model, copy / "idx", shard_size=10, spark=spark)
    shutil.copytree(copy, tmp_path / "copy2")
    shutil.rmtree(copy)
    assert Catalog(tmp_path / "copy2" / "idx", readonly=True).vectors(16)[1].shape == (24, 16)

def test_rerun_after_partial_run_ends_without_duplicates(tmp_path, collection, tiny_model, spark,  # noqa: F811
                                                         monkeypatch):
    out = tmp_path / "idx"
    emb = out / "embeddings"
    # a run killed after Spark wrote 2 of its 4 shards (one task's temp file left behind) ...
    from dualsearch.encode.backends import verified_onnx
    from dualsearch.encode.cache import default_cache_dir
    from dualsearch.encode.modules import NormalizedImageEncoder
    from dualsearch.index.plan import list_inputs, make_parts
    from dualsearch.model.dual_encoder import DualEncoder
    from dualsearch.model.folder import model_content_hash

    model = DualEncoder.load(tiny_model)
    mhash = model_content_hash(str(tiny_model.resolve()))
    inputs = list_inputs(str(collection))
    parts = make_parts(inputs.files, inputs.tars, 7, mhash)
    onnx_file, _ = verified_onnx(NormalizedImageEncoder(model), f"encoder-{mhash}", model.image_tower.image_size,
                                 default_cache_dir())
    stats = sp.run_parts(spark, parts[:2], str(onnx_file), model.image_tower.preprocessor(), str(emb))
    assert sorted(s[0] for s in stats) == sorted(p.name for p in parts[:2])
    (emb / f".{parts[2].file}.deadbeef.tmp").write_bytes(b"PAR1 half a shard")
    (emb / "part-from-an-older-plan.parquet").write_bytes(b"PAR1 stale")
    before = {p.name: p.stat().st_mtime_ns for p in emb.glob("part-*.parquet")}

    # ... and one killed while ingesting the shards into the catalog
    real_ingest, calls = sp.ingest, []

    def failing_ingest(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real_ingest(*args, **kwargs)

    monkeypatch.setattr(sp, "ingest", failing_ingest)
    with pytest.raises(KeyboardInterrupt):
        build_index_spark(str(collection), tiny_model, out, shard_size=7, spark=spark)
    monkeypatch.setattr(sp, "ingest", real_ingest)
    assert Catalog(out).count() == 14  # two whole shards, nothing of the third

    report = build_index_spark(str(collection), tiny_model, out, shard_size=7, spark=spark)
    assert "0 shards embedded, 2 reused" in report.engine  # the 2 ingested shards are no longer to do
    for name, mtime in before.items():
        if "older-plan" not in name:
            assert (emb / name).stat().st_mtime_ns == mtime  # shards written before were not redone
    assert not (emb / "part-from-an-older-plan.parquet").exists()  # a shard no plan or catalog knows
    assert len(list(emb.glob("part-*.parquet"))) == 4
    vecs, _ = catalog_rows(out)
    assert len(vecs) == 24 and report.count == 24
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 24
    s = Searcher.open(out)
    try:
        hits = s.search("a picture", k=50)
        assert len(hits) == 24 and len({h.path for h in hits}) == 24
    finally:
        s.close()

    # a re-run with nothing new does nothing; one with an image added and one removed does just that
    again = build_index_spark(str(collection), tiny_model, out, shard_size=7, spark=spark)
    assert again.added == 0 and again.unchanged == 24 and again.count == 24
    first = sorted(collection.glob("*.jpg"))[0]
    shutil.copy(first, collection / "copy.jpg")
    sorted(collection.glob("*.jpg"))[-1].unlink()
    third = build_index_spark(str(collection), tiny_model, out, shard_size=7, spark=spark)
    assert (third.added, third.removed, third.count) == (1, 1, 24)


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_list_of_paths_and_uris(tmp_path, collection, tiny_model, spark, http_root):  # noqa: F811
    www, base = http_root
    imgs = sorted(collection.glob("*.jpg"))
    shutil.copy(imgs[3], www / "remote.jpg")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([
        "# images to index", "",
        os.path.relpath(imgs[0], tmp_path),  # relative to the list file
        str(imgs[1]),
        f"file://{imgs[2]}",
        f"{base}/remote.jpg",
        f"{base}/missing.jpg",
        str(tmp_path / "nowhere.jpg"),
    ]) + "\n")
    out = tmp_path / "idx"
    report = build_index_spark(str(listing), tiny_model, out, shard_size=2, spark=spark)
    assert report.found == 6 and report.count == 4
    vecs, bad = catalog_rows(out)
    reasons = {os.path.basename(p): r for p, r in bad.items()}
    assert "HTTP 404" in reasons["missing.jpg"] and "cannot read" in reasons["nowhere.jpg"]

    local = tmp_path / "local"
    build_index(collection, tiny_model, local, num_workers=0, progress=False)
    want, _ = catalog_rows(local)
    for path, vec in vecs.items():
        src = str(imgs[3]) if path.endswith("remote.jpg") else path
        assert np.abs(vec - want[src]).max() < 1e-5, path

    from fastapi.testclient import TestClient

    from dualsearch.server.app import create_app

    s = Searcher.open(out)
    try:
        client = TestClient(create_app(s))
        remote = s.catalog.id_for_path(f"{base}/remote.jpg")
        r = client.get(f"/image/{remote}", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == f"{base}/remote.jpg"
        assert client.get(f"/thumb/{remote}").headers["content-type"] == "image/jpeg"
        assert client.get(f"/thumb/{s.catalog.id_for_path(str(imgs[1]))}").status_code == 200
    finally:
        s.close()


def test_webdataset_shards_and_cli(tmp_path, collection, tiny_model, spark, capsys):  # noqa: F811
    imgs = sorted(collection.glob("*.jpg"))
    shards = tmp_path / "shards"
    shards.mkdir()
    for n, chunk in enumerate((imgs[:5], imgs[5:8])):
        with tarfile.open(shards / f"shard-{n:03d}.tar", "w") as tar:
            for p in chunk:
                tar.add(p, arcname=f"{p.stem}.jpg")
                txt = tmp_path / "caption.txt"
                txt.write_text("a caption")
                tar.add(txt, arcname=f"{p.stem}.txt")
    out = tmp_path / "idx"
    assert main(["-q", "index", str(shards / "shard-{000..001}.tar"), "--model", str(tiny_model), "--out", str(out),
                 "--engine", "spark", "--spark-master", "local[2]"]) == 0
    printed = capsys.readouterr().out
    assert "index: 8 vectors" in printed and "2 shards embedded" in printed

    local = tmp_path / "local"
    build_index(collection, tiny_model, local, num_workers=0, progress=False)
    want, _ = catalog_rows(local)
    by_name = {os.path.basename(p): v for p, v in want.items()}
    got, _ = catalog_rows(out)
    assert len(got) == 8 and all("::" in p for p in got)
    for path, vec in got.items():
        assert np.abs(vec - by_name[path.split("::")[1]]).max() < 1e-5

    # search and serve read members back from their shards
    grid = tmp_path / "grid.png"
    assert main(["-q", "search", str(out), "a red circle", "-k", "3", "--grid", str(grid)]) == 0
    assert "::" in capsys.readouterr().out and grid.stat().st_size > 0
    from fastapi.testclient import TestClient

    from dualsearch.server.app import create_app

    s = Searcher.open(out)
    try:
        client = TestClient(create_app(s))
        hit = client.get("/api/search", params={"q": "a red circle", "k": 3}).json()["results"][0]
        assert hit["name"].endswith(".jpg") and "::" not in hit["name"]
        assert client.get(hit["image"]).headers["content-type"] == "image/jpeg"
        assert client.get(hit["thumb"]).status_code == 200
    finally:
        s.close()

    # unchanged shards are not read again; bad arguments are one-line errors
    assert main(["-q", "index", str(shards), "--model", str(tiny_model), "--out", str(out), "--engine", "spark",
                 "--spark-master", "local[2]"]) == 0
    assert "0 shards embedded" in capsys.readouterr().out
    assert main(["index", str(shards), "--model", str(tiny_model), "--out", str(out), "--shard-size", "5"]) == 2
    assert "--shard-size goes with --engine spark" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "none.tar"), "--model", str(tiny_model), "--out", str(out),
                 "--engine", "spark"]) == 2
    assert "no such WebDataset shard" in capsys.readouterr().err
    assert main(["index", str(shards), "--model", str(tiny_model), "--out", str(out)]) == 2
    assert "index WebDataset shards with --engine spark" in capsys.readouterr().err
    (tmp_path / "blocker").write_text("a file where the shard folder should go")
    assert main(["index", str(collection), "--model", str(tiny_model), "--out", str(tmp_path / "idx2"),
                 "--engine", "spark", "--embeddings", str(tmp_path / "blocker")]) == 2
    assert "cannot keep the shards there" in capsys.readouterr().err


def blocked_modules() -> list[str]:
    """The top-level modules of every core dependency outside ``spark.EXECUTOR_PACKAGES`` (torch,
    transformers, lightning, faiss, onnx, pandas, ...): what an executor install does not have."""
    import importlib.metadata as md
    import re

    deps = [r for r in md.requires("dualsearch") if "extra ==" not in r]  # pyproject.toml's dependencies
    norm = lambda name: name.lower().replace("_", "-")
    absent = {norm(re.match(r"[A-Za-z0-9_.-]+", d).group(0)) for d in deps} - set(sp.EXECUTOR_PACKAGES)
    return sorted(m for m, dists in md.packages_distributions().items() if any(norm(d) in absent for d in dists))


def test_executor_side_needs_no_torch(tmp_path, collection, tiny_model):  # noqa: F811
    """What a Spark task runs (decode, ONNX Runtime, Parquet: ``_embed_parts`` on one part of real
    images) works with every dependency outside EXECUTOR_PACKAGES made unimportable."""
    import subprocess
    import sys

    from dualsearch.encode.backends import verified_onnx
    from dualsearch.encode.cache import default_cache_dir
    from dualsearch.encode.modules import NormalizedImageEncoder
    from dualsearch.model.dual_encoder import DualEncoder

    blocked = blocked_modules()
    assert {"torch", "transformers", "lightning", "onnx"} <= set(blocked) and "faiss" not in blocked
    model = DualEncoder.load(tiny_model)
    onnx_file, _ = verified_onnx(NormalizedImageEncoder(model), "executor-test", model.image_tower.image_size,
                                 default_cache_dir())
    prep = model.image_tower.preprocessor()
    items = json.dumps([[str(p), 0, 0] for p in sorted(collection.glob("*.jpg"))[:3]] + [["/no/such.jpg", 0, 0]])
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is not in an executor install")
sys.meta_path.insert(0, Block())
import pyarrow as pa
from dualsearch.data.images import ImagePreprocessor
from dualsearch.index import spark as sp
batch = pa.RecordBatch.from_pydict({{"part": ["x"], "kind": ["files"], "items": [{items!r}]}})
prep = ImagePreprocessor({prep.size}, {prep.mean!r}, {prep.std!r}, {prep.resize!r})
(stats,) = sp._embed_parts(iter([batch]), {str(onnx_file)!r}, prep, {str(tmp_path / "out")!r}, 64, None)
assert stats.to_pydict()["indexed"] == [3] and stats.to_pydict()["unreadable"] == [1], stats.to_pydict()
table = pa.parquet.read_table({str(tmp_path / "out" / "part-x.parquet")!r})
assert table.column("status").to_pylist() == ["indexed"] * 3 + ["skipped"]
# the index tasks (sample, add) on that shard
import numpy as np
from dualsearch.index import distributed, ondisk
dim = table.schema.field("embedding").type.list_size
rng = np.random.default_rng(0)
sample = rng.normal(size=(1000, dim)).astype(np.float32)
trained = ondisk.new_trained(sample / np.linalg.norm(sample, axis=1, keepdims=True), 3, dim, "SQ8")
out = {str(tmp_path / "out")!r}
picks = [(0, [("part-x.parquet", np.array([0, 2]))])]
assert list(distributed._sample_task(iter(picks), out, out, dim)) == [(0, 2)]
group = distributed.Group(0)
group.shards.append(("part-x.parquet", np.arange(3), np.arange(3), np.array([7, 8, 9])))
bank = sample[:5] / np.linalg.norm(sample[:5], axis=1, keepdims=True)
(res,) = distributed._add_task(iter([group]), out, out, dim, ondisk.faiss.serialize_index(trained), sample[:4], 2,
                               (bank, 20.0))
assert res[1] == 3 and set(np.frombuffer(res[4], np.int64)) <= {{7, 8, 9}}, res
from dualsearch.index import qbnorm
vecs = np.stack(table.column("embedding").to_pylist()[:3]).astype(np.float32)
assert np.frombuffer(res[7], np.int64).tolist() == [7, 8, 9]
np.testing.assert_allclose(np.frombuffer(res[8], np.float32), qbnorm.offsets(bank, vecs, 20.0), atol=1e-6)
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r}))
"""
    (tmp_path / "out").mkdir()
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok []", res.stderr[-3000:]


def test_io_skips_are_planned_again(tmp_path):
    """Skips that say a file could not be reached are retried by the next run (both runners plan
    with ``plan.diff``); a bad image stays skipped until it changes."""
    from dualsearch.index.catalog import IndexedFile, SkippedFile
    from dualsearch.index.plan import Entry, Inputs, diff

    cat = Catalog(tmp_path / "idx", create=True)
    try:
        cat.write_batch([IndexedFile("/p/ok.jpg", 10, 1, np.ones(4, np.float32))], [
            SkippedFile("/p/unreadable.jpg", 10, 1, "cannot read file (Permission denied)"),
            SkippedFile("/p/corrupt.jpg", 10, 1, "corrupt image (truncated image file)"),
            SkippedFile("http://h/x.jpg", 0, 0, "cannot fetch (HTTP 503)"),
            SkippedFile("/p/a.tar::m.jpg", 0, 5, "no longer in its shard"),
        ])
        cat.set_meta("tar:/p/a.tar", "100:5")
        cat.set_meta("tar:/p/b.tar", "100:5")
        files = [Entry("/p/ok.jpg", 10, 1), Entry("/p/unreadable.jpg", 10, 1), Entry("/p/corrupt.jpg", 10, 1),
                 Entry("http://h/x.jpg", 0, 0)]
        plan = diff(cat, Inputs(files, [Entry("/p/a.tar", 100, 5), Entry("/p/b.tar", 100, 5)]))
    finally:
        cat.close()
    assert sorted(e.path for e in plan.todo) == ["/p/unreadable.jpg", "http://h/x.jpg"]
    assert [t.path for t in plan.tars] == ["/p/a.tar"] and plan.unchanged == 2 and not plan.gone
