"""On-disk IVF-PQ built shard by shard (`index.ondisk`): shards added separately and merged answer as
one index filled in one go; the merged index opens memory-mapped, moves with its folder, tunes and
serves filtered search; bad shards fail with one line."""
import os
import shutil

import faiss
import numpy as np
import pytest

from dualsearch.index import ann, ondisk

from . import test_filtered_ann as filtered_ann

N, DIM, K = 20_000, 64, 10


def clustered(n: int, seed: int = 0) -> np.ndarray:
    return filtered_ann.clustered(n, seed, DIM, 50)


@pytest.fixture(scope="module")
def data():
    x = clustered(N + 50)
    return x[:N], x[N:]


@pytest.fixture(scope="module")
def trained(data):
    x, _ = data
    return faiss.serialize_index(ondisk.new_trained(x, N, pq_bytes=8, refine="SQ8"))


@pytest.fixture(scope="module")
def shards(data, trained, tmp_path_factory):
    """Three shards of shuffled positions, as Spark tasks would write them."""
    x, _ = data
    folder = tmp_path_factory.mktemp("shards")
    perm = np.random.default_rng(1).permutation(N)
    prefixes = []
    for s, pos in enumerate(np.array_split(perm, 3)):
        prefixes.append(str(folder / f"part-{s}"))
        assert ondisk.add_shard(trained, x[pos], pos, prefixes[-1]) > 0
    return prefixes


@pytest.fixture(scope="module")
def merged(trained, shards, tmp_path_factory):
    return ondisk.merge(trained, shards, tmp_path_factory.mktemp("index"), N)


PARAMS = {"nprobe": 16, "k_factor": 16}


def test_merged_shards_answer_as_one_index(data, trained, merged):
    x, queries = data
    index = ann.read(merged, PARAMS)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and index.ntotal == N
    assert not ann._code_store(index).codes.is_owned  # refine codes memory-mapped, not read in
    one = faiss.deserialize_index(trained)
    one.add(x)  # the same quantizers, every vector at once (labels = positions)
    ann.set_params(one, PARAMS)
    d1, i1 = one.search(queries, K)
    d2, i2 = index.search(queries, K)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(d1, d2, rtol=1e-6)
    assert faiss.downcast_index(index).base_index.ntotal == N


def test_merge_unmaps_the_shards(shards, merged):
    maps = open("/proc/self/maps").read()
    assert not any(p + ondisk.IVF_SUFFIX in maps for p in shards)


def test_moved_folder_opens_its_own_lists(data, merged, tmp_path):
    _, queries = data
    before = ann.read(merged, PARAMS).search(queries, K)
    moved = tmp_path / "moved"
    shutil.copytree(merged.parent, moved)
    index = ann.read(moved / merged.name, PARAMS)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    assert os.path.dirname(lists.filename) == str(moved)  # not the original folder, which still exists
    np.testing.assert_array_equal(index.search(queries, K)[1], before[1])
    os.rename(moved, tmp_path / "again")
    assert ann.read(tmp_path / "again" / merged.name, PARAMS).search(queries, K)[1].tolist() == before[1].tolist()


def test_missing_list_data_is_one_line(merged, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(merged.parent, folder)
    data = next(folder.glob("*.ivfdata"))
    os.truncate(data, data.stat().st_size // 2)
    with pytest.raises(ann.ANNError, match="truncated") as e:
        ann.read(folder / merged.name)
    assert "\n" not in str(e.value)
    data.unlink()
    with pytest.raises(ann.ANNError, match="missing"):
        ann.read(folder / merged.name, {"ondisk": True})


def brute(x, ids, queries, allowed):
    pos = np.searchsorted(ids, allowed)
    scores = queries @ x[pos].T
    order = np.argsort(-scores, axis=1)[:, :K]
    return allowed[order]


def recall(got, truth):
    return sum(len(set(g[g >= 0]) & set(t)) for g, t in zip(got, truth)) / truth.size


@pytest.fixture(scope="module")
def with_ids(trained, shards, tmp_path_factory):
    ids = np.arange(N, dtype=np.int64) * 3 + 1  # external ids unlike positions, as catalog ids are
    path = ondisk.merge(trained, shards, tmp_path_factory.mktemp("ids"), N, ids)
    return ann.read(path), ids


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.05, 0.001])
def test_filtered_search_and_tuning_on_merged_index(data, with_ids, fraction):
    x, queries = data
    index, ids = with_ids
    assert isinstance(index, faiss.IndexIDMap) and not isinstance(index, faiss.IndexIDMap2)  # no reverse map
    truth = brute(x, ids, queries, ids)
    params, r = ann.tune(index, "ivfpq", queries, truth, 0.95)
    assert r >= 0.9 and params["nprobe"] <= 512
    rng = np.random.default_rng(int(fraction * 1000))
    allowed = ids if fraction == 1.0 else np.sort(rng.choice(ids, size=int(N * fraction), replace=False))
    _, got = ann.search(index, queries, K, None if fraction == 1.0 else allowed)
    assert np.isin(got[got >= 0], allowed).all()
    assert recall(got, brute(x, ids, queries, allowed)) >= 0.9
    if fraction == 0.001:  # the exact route, from the memory-mapped refine codes
        assert ann.exact_route("ivf", len(allowed), N)
        vecs, kept = ann._reconstruct(index, allowed)
        assert kept.tolist() == allowed.tolist()
        np.testing.assert_allclose(vecs, x[np.searchsorted(ids, allowed)], atol=0.02)


def test_positions_must_cover_once(trained, shards, tmp_path):
    with pytest.raises(ann.ANNError, match="missing, the first") as e:
        ondisk.merge(trained, shards[:2], tmp_path, N)
    assert "\n" not in str(e.value)
    with pytest.raises(ann.ANNError, match="held twice"):
        ondisk.merge(trained, [*shards, shards[0]], tmp_path, N)
    with pytest.raises(ann.ANNError, match="outside"):
        ondisk.merge(trained, shards, tmp_path, N - 1)
    with pytest.raises(ann.ANNError, match="distinct"):
        ondisk.merge(trained, shards, tmp_path, N, np.zeros(N, np.int64))
    assert not list(tmp_path.iterdir())  # nothing written


def test_repeated_position_within_a_shard(data, trained, tmp_path):
    x, _ = data
    ondisk.add_shard(trained, x[:3], np.array([0, 1, 1]), tmp_path / "a")
    with pytest.raises(ann.ANNError, match="position 1 is held twice"):
        ondisk.merge(trained, [tmp_path / "a"], tmp_path, 3)


@pytest.mark.parametrize("damage", ["truncate ivf", "garbage codes", "missing codes", "missing ivf"])
def test_damaged_shard_is_one_line(shards, trained, tmp_path, damage):
    copies = []
    for p in shards:
        for suffix in (ondisk.IVF_SUFFIX, ondisk.CODES_SUFFIX):
            shutil.copy(p + suffix, tmp_path / (os.path.basename(p) + suffix))
        copies.append(str(tmp_path / os.path.basename(p)))
    ivf, codes = copies[1] + ondisk.IVF_SUFFIX, copies[1] + ondisk.CODES_SUFFIX
    if damage == "truncate ivf":
        os.truncate(ivf, os.path.getsize(ivf) // 3)
    elif damage == "garbage codes":
        with open(codes, "r+b") as f:
            f.write(b"garbage" * 20)
    else:
        os.unlink(codes if damage == "missing codes" else ivf)
    with pytest.raises(ann.ANNError, match="part-1") as e:
        ondisk.merge(trained, copies, tmp_path / "out", N)
    assert "\n" not in str(e.value)


def test_shard_from_another_training_is_refused(data, trained, tmp_path):
    x, _ = data
    other = ondisk.new_trained(x[:3000], 3000, pq_bytes=8, refine="SQ8", seed=5)  # fewer lists, other codebooks
    ondisk.add_shard(other, x[:10], np.arange(10), tmp_path / "a")
    with pytest.raises(ann.ANNError, match="not built from this trained index"):
        ondisk.merge(trained, [tmp_path / "a"], tmp_path, 10)


def test_merging_again_replaces_the_list_file(trained, shards, tmp_path):
    ondisk.merge(trained, shards, tmp_path, N)
    first = {p.name for p in tmp_path.glob("*.ivfdata")}
    path = ondisk.merge(trained, shards, tmp_path, N)
    second = {p.name for p in tmp_path.glob("*.ivfdata")}
    assert len(first) == len(second) == 1 and first != second
    assert ann.read(path).ntotal == N


def test_bad_arguments(data, trained):
    x, _ = data
    with pytest.raises(ann.ANNError, match="divide"):
        ondisk.new_trained(x[:1000], N, pq_bytes=7)
    with pytest.raises(ann.ANNError, match="refine"):
        ondisk.new_trained(x[:1000], N, refine="PQ4")
    with pytest.raises(ann.ANNError, match="does not fit"):
        ondisk.add_shard(trained, x[:10, :32], np.arange(10), "/nonexistent/a")
    with pytest.raises(ann.ANNError, match="serialized"):
        ondisk.add_shard(b"not an index", x[:10], np.arange(10), "/nonexistent/a")


def test_build_local(data, tmp_path):
    x, queries = data
    n = 8000
    x, ids = x[:n], np.arange(n, dtype=np.int64) * 3 + 1
    built = ondisk.build_local(ann.blocks(x, ids, 1024), n, DIM, tmp_path, shard_rows=3000, pq_bytes=8,
                               target_recall=0.95)
    assert built.recall >= 0.95 and built.params["ondisk"] and built.params["refine"] == "SQ8"
    assert sorted(p.name for p in tmp_path.iterdir())[0] == built.params["file"]  # shards removed
    assert len(list(tmp_path.glob("*.ivfdata"))) == 1 and len(list(tmp_path.iterdir())) == 2
    index = ann.read(tmp_path / built.params["file"], built.params)
    _, got = ann.search(index, queries, K)
    assert recall(got, brute(x, ids, queries, ids)) >= 0.9
    with pytest.raises(ann.ANNError, match="4096 vectors; 5000 expected"):
        ondisk.build_local(ann.blocks(x[:4096], ids[:4096], 4096), 5000, DIM, tmp_path / "short")
    with pytest.raises(ann.ANNError, match="more than the 3000 vectors expected"):
        ondisk.build_local(ann.blocks(x[:4096], ids[:4096], 1024), 3000, DIM, tmp_path / "long")
    assert not list((tmp_path / "long").iterdir())  # the shards' folder removed


def test_without_refine_codes(data, tmp_path):
    """refine="none": the bare IVF-PQ on disk; tuning works, and the exact route needs a vector getter."""
    x, queries = data
    trained = ondisk.new_trained(x, N, pq_bytes=8, refine="none")
    ids = np.arange(N, dtype=np.int64) * 3 + 1
    for s, pos in enumerate(np.array_split(np.arange(N), 2)):
        ondisk.add_shard(trained, x[pos], pos, tmp_path / f"s{s}")
    assert np.load(tmp_path / f"s0{ondisk.CODES_SUFFIX}").dtype.names == ("pos",)
    index = ann.read(ondisk.merge(trained, [tmp_path / "s0", tmp_path / "s1"], tmp_path / "out", N, ids))
    assert isinstance(faiss.downcast_index(index.index), faiss.IndexIVFPQ)
    params, r = ann.tune(index, "ivfpq", queries, brute(x, ids, queries, ids), 0.95)
    assert 0.2 < r < 0.95  # 8-byte codes alone cannot reach 0.95
    assert faiss.extract_index_ivf(index).nprobe == params["nprobe"]
    allowed = ids[:15]
    with pytest.raises(ann.ANNError, match="vector getter"):
        ann.search(index, queries, K, allowed)
    _, got = ann.search(index, queries, K, allowed, vectors=lambda a: x[np.searchsorted(ids, a)])
    assert recall(got, brute(x, ids, queries, allowed)) == 1.0


def test_executor_side_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, dualsearch.index.ondisk; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
