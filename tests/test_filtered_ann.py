"""Filtered k-NN (`ann.search` with `allowed`) against exact brute-force filtered search, for every
index kind, on both routes (exact over the allowed vectors, and the index with an id selector)."""
import numpy as np
import pytest

from dualsearch.index import ann

N, DIM, K = 6000, 32, 10


def clustered(n: int, seed: int = 0, dim: int = DIM, n_centers: int = 40) -> np.ndarray:
    """``n`` unit vectors of ``dim`` from a mixture of ``n_centers`` Gaussians (callers keep the last
    few as fresh queries)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, dim))
    x = centers[rng.integers(0, len(centers), n)] + rng.normal(scale=0.6, size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(N + 40)
    ids = np.arange(N, dtype=np.int64) * 3 + 1  # external ids unlike positions, as catalog ids are
    return x[:N], ids, x[N:]


@pytest.fixture(scope="module", params=["flat", "hnsw", "ivfpq"])
def built(request, data):
    x, ids, _ = data
    b = ann.build(x, ids, request.param)
    assert b.kind == request.param
    return b


def brute(x, ids, queries, allowed):
    """Exact filtered top-K by numpy alone: (scores, ids), -1 padded."""
    pos = np.searchsorted(ids, allowed)
    scores = queries @ x[pos].T
    order = np.argsort(-scores, axis=1)[:, :K]
    out = np.full((len(queries), K), -1, np.int64)
    out[:, :order.shape[1]] = allowed[order]
    return np.take_along_axis(scores, order, axis=1), out


def recall(got, truth):
    return sum(len(set(g[g >= 0]) & set(t[t >= 0])) for g, t in zip(got, truth)) / (truth >= 0).sum()


@pytest.fixture(params=["auto", "selector"])
def route(request, monkeypatch):
    if request.param == "selector":  # every allowed set through the index with a selector
        monkeypatch.setattr(ann, "EXACT_MAX", dict.fromkeys(ann.EXACT_MAX, 0))
        monkeypatch.setattr(ann, "EXACT_FRACTION", dict.fromkeys(ann.EXACT_FRACTION, 0.0))
    return request.param


@pytest.mark.parametrize("fraction", [0.5, 0.05, 3 / N])
def test_filtered_matches_brute_force(data, built, route, fraction):
    x, ids, queries = data
    rng = np.random.default_rng(int(fraction * 1e6))
    allowed = np.sort(rng.choice(ids, size=max(3, int(N * fraction)), replace=False))
    scores, got = ann.search(built.index, queries, K, allowed)
    assert scores.shape == got.shape == (len(queries), K) and got.dtype == np.int64
    want_scores, want = brute(x, ids, queries, allowed)
    assert ((got >= 0).sum(axis=1) == min(K, len(allowed))).all()  # never fewer than min(k, allowed)
    assert np.isin(got[got >= 0], allowed).all()
    assert (np.diff(scores[got >= 0].reshape(len(queries), -1), axis=1) <= 1e-5).all()  # best first
    if built.kind == "flat" or len(allowed) <= K:
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(scores[:, :len(allowed)], want_scores[:, :K], atol=1e-2)
    else:
        assert recall(got, want) >= 0.9


def test_tiny_set_pads_the_rest(data, built, route):
    x, ids, queries = data
    allowed = ids[[5, 700, 4000]]
    scores, got = ann.search(built.index, queries[:4], K, allowed)
    assert (np.sort(got[:, :3], axis=1) == allowed).all()
    assert (got[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()


def test_unfiltered_and_empty(data, built):
    x, ids, queries = data
    scores, got = ann.search(built.index, queries, K)
    _, plain = built.index.search(queries, K)
    np.testing.assert_array_equal(got, plain)
    scores, got = ann.search(built.index, queries, K, np.empty(0, np.int64))
    assert (got == -1).all() and np.isneginf(scores).all()


def test_ids_the_index_lacks_are_ignored(data, built, route):
    x, ids, queries = data
    allowed = np.sort(np.concatenate([ids[:2], [2, 5, 10**9]]))  # 2, 5: not ids (ids are 3i + 1)
    _, got = ann.search(built.index, queries[:3], K, allowed)
    assert (np.sort(got[:, :2], axis=1) == ids[:2]).all() and (got[:, 2:] == -1).all()


def test_vector_getter_gives_exact_scores(data, built):
    x, ids, queries = data
    allowed = ids[::400]
    scores, got = ann.search(built.index, queries, K, allowed, vectors=lambda i: x[(i - 1) // 3])
    want_scores, want = brute(x, ids, queries, allowed)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_more_than_the_index_holds(data, built):
    x, ids, queries = data
    small = ann.build(x[:50], ids[:50], "flat").index
    scores, got = ann.search(small, queries[:2], 80, ids[:50])
    assert got.shape == (2, 80) and ((got >= 0).sum(axis=1) == 50).all()
    _, got = ann.search(small, queries[:2], 80)
    assert ((got >= 0).sum(axis=1) == 50).all()
