"""The hubness correction (QB-Norm, index/qbnorm.py): the offsets' formula, what training writes,
what indexing stores (incrementally), and how search ranks with it."""
import json
import logging
import shutil

import numpy as np
import pytest

from dualsearch.cli import main
from dualsearch.eval import retrieval_metrics
from dualsearch.index import qbnorm
from dualsearch.index.build import build_index
from dualsearch.index.catalog import PhotoFilter
from dualsearch.model.folder import QUERY_BANK_FILE, read_model_config, read_query_bank
from dualsearch.search import Searcher


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_offsets_are_the_inverted_softmax_normaliser():
    rng = np.random.default_rng(0)
    bank, gallery = _unit(rng.normal(size=(300, 8))), _unit(rng.normal(size=(50, 8)))
    got = qbnorm.offsets(bank, gallery, 15.0)
    logits = 15.0 * (bank @ gallery.T)
    want = -np.log(np.exp(logits).sum(0)) / 15.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert qbnorm.offsets(bank[:0], gallery, 15.0).tolist() == [0.0] * 50


def test_a_hub_is_demoted_below_the_true_match():
    """A hub image near every caption of the bank edges out a query's true match on cosine; the
    correction puts the true match first, in search-style re-ranking and in the metrics."""
    rng = np.random.default_rng(1)
    d = 32
    bank = _unit(rng.normal(size=(400, d)) + 3 * np.eye(d)[0])  # everyday captions share direction 0
    hub = _unit(np.eye(d)[0] + 0.05 * rng.normal(size=d))
    true = _unit(rng.normal(size=d))
    query = _unit(true + 1.15 * hub)
    gallery = np.stack([hub, true, *_unit(rng.normal(size=(20, d)))])
    cos = gallery @ query
    assert cos[0] > cos[1]  # on cosine alone the hub wins
    off = qbnorm.offsets(bank, gallery, 15.0)
    table = qbnorm.QBNorm(off, 15.0, len(bank))
    ids, scores = table.rerank(np.argsort(-cos), np.sort(cos)[::-1], 5)
    assert ids[0] == 1 and scores[0] == pytest.approx(cos[1])  # scores stay cosine
    m_raw = retrieval_metrics(gallery, query[None], np.array([1]))
    m_qb = retrieval_metrics(gallery, query[None], np.array([1]), image_bias=off)
    assert m_raw.text_to_image["R@1"] == 0.0 and m_qb.text_to_image["R@1"] == 100.0


def test_training_writes_the_query_bank(tiny_model):
    doc = read_model_config(tiny_model)
    entry = doc["query_bank"]
    texts = read_query_bank(tiny_model, entry)
    assert entry["file"] == QUERY_BANK_FILE and entry["count"] == len(texts) > 10
    assert len(set(texts)) == len(texts)  # distinct captions
    assert 1.0 < entry["beta"] < 200  # the model's exp(logit scale)


def test_index_stores_offsets_and_text_search_ranks_with_them(tmp_path, collection, tiny_model, capsys):
    out = tmp_path / "idx"
    build_index(collection, tiny_model, out, num_workers=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["qbnorm"]["computed"] == 24 and manifest["qbnorm"]["bank"] > 10
    s = Searcher.open(out)
    try:
        assert s.info()["hubness_correction"] is True
        ids, vecs = s.catalog.vectors(s.dim)
        q = s.text_vector("two red triangles")
        want = ids[np.argsort(-(vecs @ q + s.qbnorm.of(ids)), kind="stable")][:10]
        page = s.search_page("two red triangles", k=10)
        assert [r.id for r in page.results] == want.tolist()
        cosine_first = ids[np.argsort(-(vecs @ q), kind="stable")][:10]
        assert want.tolist() != cosine_first.tolist()  # the correction changes this ranking
        like = s.search_page(like_id=int(ids[0]), k=5)  # more like this: an image query, cosine only
        assert [r.score for r in like.results] == sorted([r.score for r in like.results], reverse=True)
    finally:
        s.close()
    assert main(["search", str(out), "two red triangles", "-k", "10", "--json", "--no-qbnorm"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in hits] == cosine_first.tolist()
    from fastapi.testclient import TestClient

    from dualsearch.server.app import create_app

    with TestClient(create_app(Searcher.open(out))) as c:  # the HTTP API: per request, on by default
        for params, expect in (({}, want), ({"qbnorm": "false"}, cosine_first)):
            got = c.get("/api/search", params={"q": "two red triangles", "k": 10, **params}).json()
            assert [h["id"] for h in got["results"]] == expect.tolist()
        got = c.post("/api/search", json={"q": "two red triangles", "k": 10, "qbnorm": False}).json()
        assert [h["id"] for h in got["results"]] == cosine_first.tolist()
        paths = c.get("/openapi.json").json()["paths"]  # a switch only where a text query is ranked
        assert "qbnorm" in {p["name"] for p in paths["/api/search"]["get"]["parameters"]}
        for route, method in (("/api/similar/{image_id}", "get"), ("/api/search/image", "post")):
            assert "qbnorm" not in {p["name"] for p in paths[route][method]["parameters"]}


def test_offsets_follow_the_catalog_incrementally(tmp_path, collection, tiny_model):
    out = tmp_path / "idx"
    build_index(collection, tiny_model, out, num_workers=0, progress=False)
    before = np.load(out / qbnorm.STATS_FILE).copy()
    files = sorted(collection.glob("*.jpg"))
    files[0].unlink()
    shutil.copy(files[1], collection / "copy.jpg")
    build_index(collection, tiny_model, out, num_workers=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["qbnorm"]["computed"] == 1  # only the added image is scored against the bank
    after = np.load(out / qbnorm.STATS_FILE)
    s = Searcher.open(out)
    try:
        ids = s.catalog.filter_ids(PhotoFilter())
        gone = sorted(set(range(len(before))) - set(ids.tolist()))
        assert len(gone) == 1 and np.isnan(after[gone[0]])
        kept = ids[ids < len(before)]
        np.testing.assert_array_equal(after[kept], before[kept])
        ids_new = ids[ids >= len(before)]
        exact = qbnorm.offsets(np.load(out / qbnorm.BANK_FILE)["bank"], s.catalog.vectors_for(ids_new, s.dim),
                               manifest["qbnorm"]["beta"])
        np.testing.assert_allclose(after[ids_new], exact, rtol=1e-5)
    finally:
        s.close()


def test_damaged_bank_or_statistics_fall_back_to_cosine(tmp_path, collection, tiny_model, caplog):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / QUERY_BANK_FILE).write_text("edited after training\n")
    out = tmp_path / "idx"
    with caplog.at_level(logging.WARNING):
        build_index(collection, model, out, num_workers=0, progress=False)
    assert "does not match the model's config" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["qbnorm"] is None
    assert Searcher.open(out).qbnorm is None
    good = tmp_path / "idx2"
    build_index(collection, tiny_model, good, num_workers=0, progress=False)
    (good / qbnorm.STATS_FILE).write_bytes(b"not numpy")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        s = Searcher.open(good)
    assert s.qbnorm is None and "ranking by cosine" in caplog.text
    assert len(s.search("a red square", k=5)) == 5  # search goes on, nothing lost
    s.close()


def test_eval_reports_recall_as_search_ranks(tiny_model, shapes_data, capsys):
    captions, root = shapes_data
    args = ["eval", "--model", str(tiny_model), "--captions", str(captions), "--images", str(root), "--limit", "60"]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    qb, raw = doc["text_to_image_qbnorm"], doc["text_to_image"]
    assert set(qb) == set(raw) and 0 <= qb["R@1"] <= qb["R@5"] <= qb["R@10"] <= 100
    assert main(args) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("t->i QB-Norm"))
    assert f"{qb['R@5']:7.2f}" in row and table.splitlines().index(row) == 3


def test_rerank_is_block_by_block_so_pages_never_overlap():
    rng = np.random.default_rng(3)
    cos = np.sort(rng.uniform(0, 1, 50))[::-1].astype(np.float32)
    ids = np.arange(50)
    table = qbnorm.QBNorm(rng.uniform(-0.5, 0, 50).astype(np.float32), 15.0, 10)
    full = table.rerank(ids, cos, 50, depth=8)[0]
    assert sorted(full.tolist()) == ids.tolist()  # a permutation: nothing repeated or lost
    for keep in (3, 8, 9, 20):  # a shorter list is a prefix of a longer one
        assert table.rerank(ids[:-(-keep // 8) * 8], cos[:-(-keep // 8) * 8], keep, depth=8)[0].tolist() == \
            full[:keep].tolist()


def test_pages_across_windows_with_the_correction(tmp_path, collection, tiny_model, monkeypatch):
    """Windows of 4 results re-ranked in blocks of 6 on 24 images: every page of 3 continues the last."""
    import dualsearch.search as search_module

    out = tmp_path / "idx"
    build_index(collection, tiny_model, out, num_workers=0, progress=False)
    monkeypatch.setattr(search_module, "PAGE_WINDOW", 4)
    monkeypatch.setattr(qbnorm, "RERANK_DEPTH", 6)
    s = Searcher.open(out)
    try:
        seen = [r.id for offset in range(0, 24, 3) for r in s.search_page("a red square", k=3, offset=offset).results]
        assert len(seen) == len(set(seen)) == 24
    finally:
        s.close()


def test_missing_or_damaged_offsets_are_neutral_and_repaired(tmp_path, collection, tiny_model, caplog):
    out = tmp_path / "idx"
    build_index(collection, tiny_model, out, num_workers=0, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    table = np.load(out / qbnorm.STATS_FILE)
    s = Searcher.open(out)
    fill = s.qbnorm.fill
    assert fill == pytest.approx(float(np.nanmedian(table)), abs=1e-6) and fill < 0
    s.qbnorm.offset = table[:5]  # as if rows were added after the statistics: neutral, not boosted
    assert s.qbnorm.of(np.array([3, 10, 999])).tolist() == pytest.approx([table[3], fill, fill])
    s.close()
    np.save(out / qbnorm.STATS_FILE, np.stack([table, table]))  # damaged: another shape
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert Searcher.open(out).qbnorm is None
    assert "re-run `dualsearch index`" in caplog.text
    build_index(collection, tiny_model, out, num_workers=0, progress=False)  # nothing changed but the file
    np.testing.assert_allclose(np.load(out / qbnorm.STATS_FILE), table, rtol=1e-6)
    assert json.loads((out / "manifest.json").read_text())["qbnorm"]["computed"] == manifest["qbnorm"]["computed"]


@pytest.mark.parametrize("beta", [0, -14, "abc", float("nan"), 1e9])
def test_a_bad_beta_in_the_model_is_a_warning(tmp_path, tiny_model, beta, caplog):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    doc = json.loads((model / "config.json").read_text())
    doc["query_bank"]["beta"] = beta
    (model / "config.json").write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        assert qbnorm.bank_for(model) is None
    assert "beta must be a number in (0, 100]" in caplog.text


def test_a_bank_entry_naming_a_file_outside_the_model_is_refused(tmp_path, tiny_model):
    from dualsearch.model.folder import ModelError

    entry = dict(read_model_config(tiny_model)["query_bank"], file="/etc/hostname")
    with pytest.raises(ModelError, match="a file name inside the model folder"):
        read_query_bank(tiny_model, entry)
