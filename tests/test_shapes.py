import hashlib
import json

import pytest

from dualsearch.cli import main
from dualsearch.data.readers import read_dataset
from dualsearch.data.shapes import generate_shapes


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_shapes_deterministic_and_readable(tmp_path):
    a = generate_shapes(tmp_path / "a", 30, seed=7, size=64, progress=False)
    generate_shapes(tmp_path / "b", 30, seed=7, size=64, progress=False)
    generate_shapes(tmp_path / "c", 30, seed=8, size=64, progress=False)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    ds = read_dataset(a, tmp_path / "a")
    assert len(ds) == 30 and ds.num_captions == 150
    assert all(len(set(r.captions)) == 5 for r in ds.records)


def test_shapes_caption_variety(tmp_path):
    generate_shapes(tmp_path, 300, seed=1, size=48, progress=False)
    caps = [a["caption"] for a in json.loads((tmp_path / "captions.json").read_text())["annotations"]]
    assert len(set(caps)) / len(caps) > 0.5
    text = " ".join(caps)
    for word in ("above", "left", "two", "three", "small", "large", "background", "circle", "star"):
        assert f" {word}" in text, word


def test_cli_shapes_convert_roundtrip(tmp_path, capsys):
    assert main(["-q", "data", "shapes", str(tmp_path / "s"), "--images", "12", "--size", "40x30"]) == 0
    assert main(["-q", "data", "convert", "--captions", str(tmp_path / "s" / "captions.json"),
                 "--images", str(tmp_path / "s"), "--out", str(tmp_path / "wds"), "--shard-size", "5"]) == 0
    shards = sorted((tmp_path / "wds").glob("*.tar"))
    assert len(shards) == 3
    coco = read_dataset(tmp_path / "s" / "captions.json", tmp_path / "s")
    wds = read_dataset(tmp_path / "wds")
    assert [r.captions for r in wds.records] == [r.captions for r in coco.records]
    assert wds.records[3].image.read_bytes() == coco.records[3].image.read_bytes()


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    assert main(["data", "info", "--captions", str(tmp_path / "missing.json"), "--images", str(tmp_path)]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a value out of range is refused by argparse, at parse time
        main(["data", "shapes", str(tmp_path), "--images", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("argument --images: must be at least 1, got 0")
