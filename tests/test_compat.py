"""An index and model folder written by dualsearch 0.1.0 before the encode/ refactor (commit 6cb5ffc,
built by tests/fixtures/index-v1/make_fixture.py) still open, search and take new images."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dualsearch.cli import main
from dualsearch.search import Searcher

FIXTURE = Path(__file__).parent / "fixtures" / "index-v1"


@pytest.fixture()
def old_index(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "v1")
    return tmp_path / "v1"


def _names(results):
    return [[r.path.rsplit("/", 1)[-1], r.score] for r in results]


def test_v1_index_opens_and_searches_as_before(old_index):
    expected = json.loads((old_index / "expected.json").read_text())
    searcher = Searcher.open(old_index / "index", old_index / "model")
    try:
        assert searcher.text_encoder is not None  # the ONNX text encoder it holds is still used
        for query, want in expected.items():
            if query.startswith("like_id:"):
                got = _names(searcher.search(like_id=int(query.split(":")[1]), k=5))
            else:
                got = _names(searcher.search(query, k=5))
            assert [g[0] for g in got] == [w[0] for w in want], query
            np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-4)
    finally:
        searcher.close()


def test_v1_index_takes_a_new_run(old_index, capsys):
    """Indexing into the old folder from the images' new place: the 12 old rows go (a mass delete,
    so it is asked for), 12 come back."""
    out = old_index / "index"
    assert main(["-q", "index", str(old_index / "images"), "--model", str(old_index / "model"), "--out", str(out),
                 "--workers", "0", "--allow-mass-delete"]) == 0
    assert "12 embedded" in capsys.readouterr().out
    assert main(["-q", "search", str(out), "two red triangles", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(h["path"].startswith(str(old_index / "images")) for h in hits)
