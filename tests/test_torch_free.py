"""Indexing without torch once a model's encoders are exported and verified; the lanes pipeline;
INT8 image encoders."""
import json
import subprocess
import sys

import numpy as np
import pytest

from dualsearch.data.images import ImagePreprocessor
from dualsearch.encode.pipeline import embed_images, plan_threads
from dualsearch.encode.runtime import onnx_file, read_record
from dualsearch.index.build import build_index
from dualsearch.index.catalog import Catalog
from dualsearch.model.folder import model_content_hash

# runs the CLI with torch, transformers and Lightning made unimportable, and says what got loaded
BLOCKED = """
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "lightning", "pytorch_lightning"):
            raise ImportError("blocked in this test: " + name)
        return None
sys.meta_path.insert(0, Blocker())
from dualsearch.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "lightning"))
print("HEAVY", heavy)
sys.exit(code)
"""


def _vectors(out) -> dict:
    cat = Catalog(out, readonly=True)
    try:
        ids, vecs = cat.vectors(int(json.loads((out / "manifest.json").read_text())["dim"]))
        paths = cat.paths_for(ids)
        return {paths[int(i)]: v for i, v in zip(ids, vecs)}
    finally:
        cat.close()


def test_index_runs_without_torch_once_the_encoders_are_exported(tmp_path, collection, tiny_model):  # noqa: F811
    ref = tmp_path / "torch-index"
    build_index(collection, tiny_model, ref, num_workers=0, progress=False, engine="torch")
    build_index(collection, tiny_model, tmp_path / "first", num_workers=0, progress=False)  # exports both encoders
    assert read_record(onnx_file(_cache(), f"encoder-{model_content_hash(tiny_model)}"))["image"]["size"] == 32

    out = tmp_path / "torch-free"
    res = subprocess.run([sys.executable, "-c", BLOCKED, "-q", "index", str(collection), "--model", str(tiny_model),
                          "--out", str(out), "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HEAVY []" in res.stdout
    assert "onnx" in res.stdout
    want, got = _vectors(ref), _vectors(out)
    assert sorted(got) == sorted(want) and len(got) == 24
    for path, v in want.items():
        np.testing.assert_allclose(got[path], v, atol=1e-4)
    # the index holds its own verified text encoder, and text queries are answered without torch too
    assert (out / "text_encoder" / "text_encoder.onnx").is_file()
    res = subprocess.run([sys.executable, "-c", BLOCKED, "search", str(out), "a red circle", "-k", "3", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HEAVY []" in res.stdout


def _cache():
    from dualsearch.encode.cache import default_cache_dir

    return default_cache_dir()


def test_a_changed_export_is_not_trusted(tmp_path, collection, tiny_model):  # noqa: F811
    build_index(collection, tiny_model, tmp_path / "a", num_workers=0, progress=False)
    path = onnx_file(_cache(), f"encoder-{model_content_hash(tiny_model)}")
    assert read_record(path) is not None
    path.write_bytes(path.read_bytes() + b"\0")  # tampered or half-copied: the record no longer matches
    assert read_record(path) is None
    report = build_index(collection, tiny_model, tmp_path / "b", num_workers=0, progress=False)
    assert report.engine == "onnx" and read_record(path) is not None  # exported and checked afresh


def test_lanes_give_the_same_vectors_as_one_thread_and_keep_skips(tmp_path, collection, tiny_model):  # noqa: F811
    from dualsearch.encode.runtime import ort_session

    build_index(collection, tiny_model, tmp_path / "a", num_workers=0, progress=False)
    path = onnx_file(_cache(), f"encoder-{model_content_hash(tiny_model)}")
    im = read_record(path)["image"]
    prep = ImagePreprocessor(im["size"], tuple(im["mean"]), tuple(im["std"]), im["resize"])
    srcs = sorted(str(p) for p in collection.rglob("*.jpg") if ".hidden" not in str(p))[:10]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    srcs.insert(3, str(tmp_path / "bad.jpg"))
    session = ort_session(path, 1)

    def run(lanes):
        out = list(embed_images(session, srcs, prep, batch_size=4, lanes=lanes))
        return ([i for b in out for i in b[0]], np.concatenate([b[1] for b in out if b[1] is not None]),
                [s for b in out for s in b[2]])

    idx0, v0, bad0 = run(0)
    idx2, v2, bad2 = run(2)
    assert idx0 == idx2 == [i for i in range(len(srcs)) if i != 3]
    np.testing.assert_allclose(v0, v2, atol=1e-5)
    assert [i for i, _ in bad0] == [i for i, _ in bad2] == [3] and "not an image" in bad0[0][1]


def test_thread_plan():
    assert plan_threads(None, 2) == (2, 1)
    assert plan_threads(0, 2) == (0, 2)
    assert plan_threads(None, 16) == (4, 4)


def test_int8_precision_builds_an_index_close_to_fp32(tmp_path, collection, tiny_model):  # noqa: F811
    fp32 = build_index(collection, tiny_model, tmp_path / "fp32", num_workers=0, progress=False)
    int8 = build_index(collection, tiny_model, tmp_path / "int8", num_workers=0, progress=False, precision="int8")
    assert fp32.engine == "onnx" and int8.engine == "onnx int8" and int8.added == fp32.added == 24
    rec = read_record(onnx_file(_cache(), f"encoder-{model_content_hash(tiny_model)}.int8"))
    assert rec["calibration_images"] == 24
    a, b = _vectors(tmp_path / "fp32"), _vectors(tmp_path / "int8")
    cos = [float(a[p] @ b[p]) for p in a]
    assert np.mean(cos) > 0.9, cos


def test_unknown_precision_is_one_line(tmp_path, collection, tiny_model):  # noqa: F811
    from dualsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown precision"):
        build_index(collection, tiny_model, tmp_path / "x", num_workers=0, progress=False, precision="int4")
