import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dualsearch.cli import main
from dualsearch.index import ann
from dualsearch.index.build import build_index
from dualsearch.index.catalog import Catalog, CatalogError
from dualsearch.search import QueryError, Searcher


def _add_bad_files(col):
    good = sorted(col.glob("*.jpg"))[0].read_bytes()
    (col / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (col / "zero.jpg").write_bytes(b"")
    (col / "text.png").write_text("I am not a PNG")
    Image.new("L", (3000, 2000)).save(col / "huge.png")
    if os.geteuid() == 0:  # root reads mode-000 files: a dangling link is unreadable for everyone
        (col / "locked.jpg").symlink_to(col / "gone-away.jpg")
    else:
        (col / "locked.jpg").write_bytes(good)
        (col / "locked.jpg").chmod(0)


def test_index_skips_bad_files_with_reasons(tmp_path, collection, tiny_model, capsys):
    _add_bad_files(collection)
    out = tmp_path / "idx"
    assert main(["-q", "index", str(collection), "--model", str(tiny_model), "--out", str(out), "--workers", "0",
                 "--max-pixels", "5000000"]) == 0
    text = capsys.readouterr().out
    assert "24 embedded" in text and "5 skipped" in text
    reasons = dict(Catalog(out).skipped())
    by_name = {os.path.basename(p): r for p, r in reasons.items()}
    assert "corrupt image" in by_name["truncated.jpg"]
    assert "empty file" in by_name["zero.jpg"]
    assert "not an image" in by_name["text.png"]
    assert "too many pixels" in by_name["huge.png"]
    assert "cannot read" in by_name["locked.jpg"]
    assert json.loads((out / "manifest.json").read_text())["count"] == 24


def test_incremental_add_modify_delete(tmp_path, collection, tiny_model):
    out = tmp_path / "idx"
    r1 = build_index(collection, tiny_model, out, num_workers=0, progress=False)
    assert r1.added == 24 and r1.count == 24
    r2 = build_index(collection, tiny_model, out, num_workers=0, progress=False)
    assert r2.added == 0 and r2.unchanged == 24
    files = sorted(collection.glob("*.jpg"))
    files[0].unlink()
    Image.new("RGB", (64, 64), (255, 0, 0)).save(files[1])
    os.utime(files[1], ns=(time.time_ns(), time.time_ns() + 10_000_000))
    shutil.copy(files[2], collection / "new.jpg")
    r3 = build_index(collection, tiny_model, out, num_workers=0, progress=False)
    assert (r3.added, r3.unchanged, r3.removed, r3.count) == (2, 22, 1, 24)
    cat = Catalog(out)
    ids, vecs = cat.vectors(16)
    assert len(set(ids)) == len(ids) == 24
    s = Searcher.open(out)
    assert len(s) == 24
    paths = {r.path for r in s.search("a red square", k=24)}
    assert str(files[0].resolve()) not in paths and str((collection / "new.jpg").resolve()) in paths


def test_resume_after_sigkill(tmp_path, collection, tiny_model):
    originals = sorted(collection.glob("*.jpg"))
    for i in range(8):  # more files so that the run lasts a while
        for p in originals:
            shutil.copy(p, collection / f"copy{i}_{p.name}")
    total = 24 + 8 * len(originals)
    out, ref = tmp_path / "idx", tmp_path / "ref"
    cmd = [sys.executable, "-m", "dualsearch.cli", "-q", "index", str(collection), "--model", str(tiny_model),
           "--out", str(out), "--workers", "0", "--batch-size", "4", "--commit-every", "8", "--engine", "torch"]
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cat_path = out / "catalog.sqlite"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some but not all batches are committed
        if cat_path.exists():
            try:
                n = Catalog(out).count()
            except Exception:
                n = 0
            if n >= 8:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = Catalog(out).count()
    assert 0 < partial < total, partial
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    build_index(collection, tiny_model, ref, num_workers=0, progress=False)
    a, b = Catalog(out), Catalog(ref)
    assert a.count() == b.count() == total
    assert set(a.file_stats()) == set(b.file_stats())
    ia, va = a.vectors(16)
    assert len(set(ia)) == len(ia)
    pa = a.paths_for(ia)
    ib, vb = b.vectors(16)
    pb = b.paths_for(ib)
    va_by_path = {pa[i]: v for i, v in zip(ia, va)}
    for i, v in zip(ib, vb):
        np.testing.assert_allclose(va_by_path[pb[i]], v, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["count"] == total


def test_exact_and_ann_agree_and_queries(tmp_path, collection, tiny_model):
    flat = tmp_path / "flat"
    build_index(collection, tiny_model, flat, kind="flat", num_workers=0, progress=False)
    hnsw = tmp_path / "hnsw"
    build_index(collection, tiny_model, hnsw, kind="hnsw", num_workers=0, progress=False)
    a, b = Searcher.open(flat), Searcher.open(hnsw)
    for q in ("a red circle", "two blue stars above a green square"):
        ra, rb = a.search(q, k=5), b.search(q, k=5)
        assert [r.path for r in ra] == [r.path for r in rb]
        np.testing.assert_allclose([r.score for r in ra], [r.score for r in rb], atol=1e-5)
    img = sorted(collection.glob("*.jpg"))[3]
    top = a.search(image=str(img), k=3)
    assert top[0].path == str(img.resolve()) and top[0].score == pytest.approx(1.0, abs=1e-4)
    like = a.search(like_id=top[0].id, k=3)
    assert top[0].id not in [r.id for r in like]
    combo = a.search("a red circle", image=str(img), image_weight=0.5, k=5)
    neg = a.search("a red circle", subtract=["red"], k=5)
    assert [r.path for r in combo] != [r.path for r in a.search("a red circle", k=5)] or combo
    assert neg[0].score <= 1.0
    with pytest.raises(QueryError, match="empty query"):
        a.search(k=3)


def test_model_mismatch_and_damaged_files(tmp_path, collection, tiny_model, tiny_model_config, capsys):
    out = tmp_path / "idx"
    build_index(collection, tiny_model, out, num_workers=0, progress=False)
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    from safetensors.torch import load_file, save_file

    state = load_file(str(other / "model.safetensors"))
    state["logit_scale"] = state["logit_scale"] + 1
    save_file(state, str(other / "model.safetensors"))
    with pytest.raises(CatalogError, match="another model"):
        build_index(collection, other, out, num_workers=0, progress=False)
    assert main(["search", str(out), "a circle", "--model", str(other)]) == 2
    assert "re-index" in capsys.readouterr().err
    (out / "vectors.faiss").write_bytes(b"garbage")
    assert main(["search", str(out), "a circle"]) == 2
    assert "damaged" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "nothing"), "a circle"]) == 2


def test_cli_search_json_and_grid(tmp_path, collection, tiny_model, capsys):
    out = tmp_path / "idx"
    assert main(["-q", "index", str(collection), "--model", str(tiny_model), "--out", str(out), "--workers", "0"]) == 0
    capsys.readouterr()
    grid = tmp_path / "g.png"
    assert main(["-q", "search", str(out), "a red circle", "-k", "4", "--json", "--grid", str(grid)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 4 and {"path", "score", "id", "weak", "z", "duplicates", "taken", "format"} <= set(res[0])
    assert res[0]["score"] >= res[-1]["score"]
    assert Image.open(grid).size[0] > 300
    assert main(["-q", "search", str(out), "a red circle"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "match", "taken", "path"] and len(table) == 10


def test_ann_kinds_reach_recall_target():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(50, 32))
    x = (centers[rng.integers(0, 50, 6000)] + 0.3 * rng.normal(size=(6000, 32))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for kind in ("hnsw", "ivfpq"):
        built = ann.build(x, np.arange(6000), kind)
        assert built.kind == kind and built.recall >= 0.95, (kind, built.recall)
    assert ann.choose_kind(1000, 256) == "flat"
    assert ann.choose_kind(1_000_000, 256) == "hnsw"
    assert ann.choose_kind(100_000_000, 256) == "ivfpq"


def test_text_queries_use_the_onnx_encoder_without_torch(tmp_path, collection, tiny_model):
    out = tmp_path / "idx"
    build_index(collection, tiny_model, out, num_workers=0, progress=False)
    s = Searcher.open(out)
    assert s.text_encoder is not None and s._model is None
    for q in ("a red circle", "two blue stars above a green square on a pink background"):
        np.testing.assert_allclose(s.text_vector(q), s.model.embed_texts([q])[0], atol=1e-5)
    code = ("import sys, json; from dualsearch.search import Searcher; s = Searcher.open(sys.argv[1]); "
            "r = s.search('a red circle', k=3); print(json.dumps([len(r), 'torch' in sys.modules, "
            "'transformers' in sys.modules]))")
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [3, False, False]


def test_grid_labels_clear_the_row_above(tmp_path, collection):
    """Each cell's rank/score/name label sits below the image of the cell above it (it used to
    overlap it by a few pixels)."""
    import matplotlib.pyplot as plt

    from dualsearch.search import Result, grid_figure

    paths = sorted(str(p) for p in collection.glob("*.jpg"))[:9]
    fig = grid_figure([Result(p, 0.5, i) for i, p in enumerate(paths)], title="two red triangles")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = fig.axes
        for above, below in zip(axes[:6], axes[3:9]):
            image_bottom = above.images[0].get_window_extent(renderer).y0
            label_top = below.title.get_window_extent(renderer).y1
            assert label_top < image_bottom, (label_top, image_bottom)
    finally:
        plt.close(fig)
