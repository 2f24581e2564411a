import io
import json
import tarfile

import pytest
from PIL import Image

from dualsearch.data.readers import (
    FORMATS,
    REGISTRY,
    DataError,
    detect_format,
    read_coco,
    read_dataset,
    read_folder,
    read_table,
    read_webdataset,
)
from dualsearch.data.records import normalize_caption
from dualsearch.data.split import split_records


def _jpg(path, colour=(200, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path)
    return path


def test_normalize_caption():
    assert normalize_caption("  A Dog   runs.\n") == "a dog runs"
    assert normalize_caption("Two cats..") == "two cats"
    assert normalize_caption("   ") == ""


def test_coco_reader_groups_and_skips_missing(tmp_path, caplog):
    _jpg(tmp_path / "img" / "sub" / "a.jpg")
    _jpg(tmp_path / "img" / "b.jpg")
    doc = {"images": [{"id": 1, "file_name": "sub/a.jpg"}, {"id": 2, "file_name": "b.jpg"},
                      {"id": 3, "file_name": "missing.jpg"}, {"id": 4, "file_name": "b.jpg"}],
           "annotations": [{"id": 1, "image_id": 1, "caption": "A Red Square."},
                           {"id": 2, "image_id": 2, "caption": "a blue thing"},
                           {"id": 3, "image_id": 1, "caption": "red  box"},
                           {"id": 4, "image_id": 3, "caption": "nothing here"},
                           {"id": 5, "image_id": 99, "caption": "orphan"}]}
    f = tmp_path / "captions.json"
    f.write_text(json.dumps(doc))
    ds = read_coco(f, tmp_path / "img")
    assert [r.image.path.endswith(("a.jpg", "b.jpg")) for r in ds.records] == [True, True]
    assert ds.records[0].captions == ("a red square", "red box")
    reasons = dict(ds.skipped.entries)
    assert reasons["missing.jpg"] == "missing image"
    assert "unknown image_id 99" in reasons["annotation 5"]
    assert "missing image: 1" in ds.skipped.summary()
    assert read_coco(f, tmp_path / "img", captions_per_image=1).records[0].captions == ("a red square",)


def test_coco_reader_bad_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        read_coco(f, tmp_path)


@pytest.mark.parametrize("fmt,sep", [("csv", ","), ("tsv", "\t")])
def test_table_reader_csv_tsv(tmp_path, fmt, sep):
    _jpg(tmp_path / "a.jpg")
    _jpg(tmp_path / "b.jpg")
    lines = [f"filepath{sep}title", f"a.jpg{sep}first caption", f"b.jpg{sep}", f"a.jpg{sep}Second one.",
             f"gone.jpg{sep}x"]
    f = tmp_path / f"data.{fmt}"
    f.write_text("\n".join(lines) + "\n")
    ds = read_dataset(f)
    assert len(ds) == 1
    assert ds.records[0].captions == ("first caption", "second one")
    reasons = dict(ds.skipped.entries)
    assert reasons == {"b.jpg": "no non-empty caption", "gone.jpg": "missing image"}


def test_table_reader_jsonl_columns(tmp_path):
    _jpg(tmp_path / "imgs" / "a.jpg")
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"img_file": "a.jpg", "cap": ["one", "Two."]}) + "\n")
    ds = read_table(f, tmp_path / "imgs", path_column="img_file", caption_column="cap")
    assert ds.records[0].captions == ("one", "two")
    with pytest.raises(DataError, match="no caption column 'nope'"):
        read_table(f, tmp_path / "imgs", path_column="img_file", caption_column="nope")
    with pytest.raises(DataError, match="cannot find a path column"):
        read_table(f, tmp_path / "imgs")


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _jpeg_bytes(colour=(0, 0, 200)):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_webdataset_reader(tmp_path):
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "k1.jpg", _jpeg_bytes())
        _add(tar, "k1.txt", b"A blue square.\nsecond caption\n")
        _add(tar, "k2.png", _jpeg_bytes())  # image with no caption
        _add(tar, "k3.jpg", _jpeg_bytes())
        _add(tar, "k3.txt", b"\xff\xfe bad utf8")
    ds = read_webdataset(str(shard))
    assert len(ds) == 1
    rec = ds.records[0]
    assert rec.captions == ("a blue square", "second caption")
    assert rec.image.read_bytes() == _jpeg_bytes()
    reasons = [r for _, r in ds.skipped.entries]
    assert any("not UTF-8" in r for r in reasons)
    assert reasons.count("no non-empty caption") == 2


def test_webdataset_truncated_shard_keeps_what_it_read(tmp_path):
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        _add(tar, "a.jpg", _jpeg_bytes())
        _add(tar, "a.txt", b"first")
        _add(tar, "b.jpg", _jpeg_bytes() * 40)
        _add(tar, "b.txt", b"second")
    data = shard.read_bytes()
    for cut in (2600, 3200):  # in b.jpg's header, in its data
        shard.write_bytes(data[:cut])
        ds = read_dataset(tmp_path)  # a folder of shards
        assert [r.captions for r in ds.records] == [("first",)]
        assert any("broken tar" in reason for _, reason in ds.skipped.entries), ds.skipped.entries


def test_folder_reader(tmp_path):
    _jpg(tmp_path / "x" / "a.jpg")
    (tmp_path / "x" / "a.txt").write_text("One.\nTwo\n")
    _jpg(tmp_path / "b.png")
    _jpg(tmp_path / ".hidden" / "c.jpg")
    ds = read_folder(tmp_path)
    assert len(ds) == 1 and ds.records[0].captions == ("one", "two")
    assert len(ds.skipped) == 1


def test_read_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_dataset(tmp_path / "nope.json", tmp_path)
    f = tmp_path / "c.json"
    f.write_text("{}")
    with pytest.raises(DataError, match="needs the image folder"):
        read_dataset(f)
    g = tmp_path / "c.xyz"
    g.write_text("")
    with pytest.raises(DataError, match="--format"):
        read_dataset(g)


def test_split_is_deterministic_and_disjoint(tmp_path):
    from dualsearch.data.records import ImageCaption, ImageRef

    recs = [ImageCaption(ImageRef(f"/i/{k}.jpg"), (f"c{k}", f"d{k}")) for k in range(103)]
    a = split_records(recs, {"train": 0.8, "val": 0.2}, seed=3)
    b = split_records(list(reversed(recs)), {"train": 0.8, "val": 0.2}, seed=3)
    assert [r.name for r in a["train"]] == [r.name for r in b["train"]]
    assert len(a["train"]) == 82 and len(a["val"]) == 21
    assert not {r.name for r in a["train"]} & {r.name for r in a["val"]}
    c = split_records(recs, {"train": 0.8, "val": 0.2}, seed=4)
    assert [r.name for r in a["val"]] != [r.name for r in c["val"]]


def test_registry_feeds_formats_and_detection(tmp_path):
    assert FORMATS[0] == "auto" and set(FORMATS[1:]) == set(REGISTRY)
    for name, fmt in REGISTRY.items():
        assert name in FORMATS and fmt.name == name
        for suffix in fmt.suffixes:
            assert detect_format(tmp_path / f"data{suffix}") == name
            assert detect_format(tmp_path / f"DATA{suffix.upper()}") == name
    with pytest.raises(DataError, match="unknown format 'nope'"):
        read_dataset(tmp_path, fmt="nope")
