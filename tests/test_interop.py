"""Interoperability: the reference's TFRecords, local Hugging Face datasets, ONNX export, embeddings."""
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from dualsearch.cli import main
from dualsearch.data.readers import read_dataset
from dualsearch.data.readers.tfrecord import frame, parse_example_bytes


def _varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _ld(field, payload):  # a length-delimited protobuf field
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def example(caption: bytes, image: bytes) -> bytes:
    """tf.train.Example{features{feature{"caption": bytes_list}, feature{"raw_image": bytes_list}}},
    encoded by hand on the protobuf wire format."""
    def feature(name, value):
        bytes_list = _ld(1, value)
        return _ld(1, _ld(1, name.encode()) + _ld(2, _ld(1, bytes_list)))
    return _ld(1, feature("caption", caption) + feature("raw_image", image))


def _jpeg(colour):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, "JPEG")
    return buf.getvalue()


def write_reference_shard(path, images):
    """One record per caption, as the reference writes them."""
    with open(path, "wb") as f:
        for colour, captions in images:
            img = _jpeg(colour)
            for c in captions:
                f.write(frame(example(c.encode(), img)))


def test_example_parser():
    buf = example(b"A dog.", b"\xff\xd8jpegbytes")
    spans = parse_example_bytes(buf)
    (a, b), = spans["caption"]
    assert buf[a:b] == b"A dog."
    (a, b), = spans["raw_image"]
    assert buf[a:b] == b"\xff\xd8jpegbytes"


def test_tfrecord_reader_groups_and_skips_bad_crc(tmp_path, caplog):
    shard = tmp_path / "train-000.tfrecord"
    write_reference_shard(shard, [((255, 0, 0), ["A red box.", "red square"]),
                                  ((0, 0, 255), ["a blue one", "blue"]),
                                  ((0, 255, 0), ["green"])])
    data = bytearray(shard.read_bytes())
    # corrupt one byte inside the data of the 3rd record ("a blue one"): its data CRC fails
    offsets, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack("<Q", data[pos:pos + 8])
        offsets.append(pos)
        pos += 12 + n + 4
    data[offsets[2] + 12 + 5] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = read_dataset(tmp_path)  # a folder of .tfrecord files
    assert [r.captions for r in ds.records] == [("a red box", "red square"), ("blue",), ("green",)]
    assert any("bad data CRC" in reason for _, reason in ds.skipped.entries)
    img = Image.open(io.BytesIO(ds.records[1].image.read_bytes()))
    assert img.size == (40, 30)
    # a broken length field ends the file, keeping what came before
    data[offsets[3]] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = read_dataset(shard)
    assert [r.captions for r in ds.records] == [("a red box", "red square")]
    assert any("bad length CRC" in reason for _, reason in ds.skipped.entries)


def _hf_parquet(path, n=40, seed=0):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220)}
    rows = {"image": [], "caption": [], "caption_2": []}
    for i in range(n):
        name = list(colours)[i % 3]
        c = tuple(int(v) for v in np.clip(np.array(colours[name]) + rng.integers(-20, 20, 3), 0, 255))
        rows["image"].append({"bytes": _jpeg(c), "path": f"img{i}.jpg"})
        rows["caption"].append(f"a {name} picture")
        rows["caption_2"].append([f"something {name}", f"{name} {i}"])
    pq.write_table(pa.table(rows), path)


def test_hf_parquet_reader(tmp_path):
    _hf_parquet(tmp_path / "train-00000.parquet", n=6)
    ds = read_dataset(tmp_path)
    assert len(ds) == 6 and ds.records[0].captions == ("a red picture",)
    ds = read_dataset(tmp_path / "train-00000.parquet", caption_column="caption,caption_2")
    assert ds.records[1].captions == ("a green picture", "something green", "green 1")
    assert Image.open(io.BytesIO(ds.records[0].image.read_bytes())).size == (40, 30)


def test_hf_imagefolder_metadata(tmp_path):
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "A thing."}) + "\n")
    ds = read_dataset(tmp_path)
    assert ds.records[0].captions == ("a thing",)


@pytest.mark.parametrize("fmt", ["tfrecord", "hf"])
def test_training_from_tfrecord_and_hf(tmp_path, fmt, tiny_text_model, tiny_vision_model, shapes_data, capsys):
    if fmt == "tfrecord":
        captions, root = shapes_data
        ds = read_dataset(captions, root)
        src = tmp_path / "shards"
        src.mkdir()
        with open(src / "train-000.tfrecord", "wb") as f:
            for r in ds.records[:60]:
                for c in r.captions[:2]:
                    f.write(frame(example(c.encode(), r.image.read_bytes())))
    else:
        src = tmp_path / "train.parquet"
        _hf_parquet(src, n=60)
    out = tmp_path / "m"
    assert main(["-q", "train", "--captions", str(src), "--out", str(out), "--epochs", "2", "--batch-size", "16",
                 "--image-tower", f"hf:{tiny_vision_model}", "--text-tower", f"hf:{tiny_text_model}",
                 "--cache-dir", str(tmp_path / "c"), "--ensemble", "1"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
    assert main(["-q", "eval", "--model", str(out), "--captions", str(src), "--json",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 60


@pytest.fixture()
def small_model(tiny_model):
    return tiny_model


def test_onnx_export_parity(tmp_path, small_model, shapes_data):
    from dualsearch.encode.onnx_encoders import OnnxDualEncoder
    from dualsearch.model.dual_encoder import DualEncoder

    assert main(["-q", "export", str(small_model), "--onnx", str(tmp_path / "onnx")]) == 0
    onnx = OnnxDualEncoder(tmp_path / "onnx")
    torch_model = DualEncoder.load(small_model)
    texts = ["a red circle", "two blue stars above a green square on a pink background", "star"]
    np.testing.assert_allclose(onnx.embed_texts(texts), torch_model.embed_texts(texts), atol=1e-4)
    imgs = [Image.open(p).convert("RGB") for p in sorted((shapes_data[1] / "images").glob("*.jpg"))[:5]]
    np.testing.assert_allclose(onnx.embed_images(imgs), torch_model.embed_images(imgs), atol=1e-4)


def test_embeddings_round_trip(tmp_path, small_model, shapes_data, capsys):
    from dualsearch.search import Searcher

    images = shapes_data[1] / "images"
    assert main(["-q", "index", str(images), "--model", str(small_model), "--out", str(tmp_path / "a"),
                 "--workers", "0"]) == 0
    assert main(["-q", "embeddings", "export", str(tmp_path / "a"), "--out", str(tmp_path / "emb")]) == 0
    assert (tmp_path / "emb" / "img_emb" / "img_emb_0.npy").is_file()
    assert main(["-q", "index", "--from-embeddings", str(tmp_path / "emb"), "--model", str(small_model),
                 "--out", str(tmp_path / "b")]) == 0
    a, b = Searcher.open(tmp_path / "a"), Searcher.open(tmp_path / "b")
    for q in ("a red circle", "three blue stars"):
        ra, rb = a.search(q, k=10), b.search(q, k=10)
        assert [r.path for r in ra] == [r.path for r in rb]
        np.testing.assert_allclose([r.score for r in ra], [r.score for r in rb], atol=1e-5)
    # one Parquet file with a vector column works too
    import pyarrow as pa
    import pyarrow.parquet as pq

    vecs = np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")
    paths = pq.read_table(tmp_path / "emb" / "metadata" / "metadata_0.parquet").column("image_path").to_pylist()
    pq.write_table(pa.table({"image_path": paths, "embedding": list(vecs)}), tmp_path / "one.parquet")
    assert main(["-q", "index", "--from-embeddings", str(tmp_path / "one.parquet"), "--model", str(small_model),
                 "--out", str(tmp_path / "c")]) == 0
    assert [r.path for r in Searcher.open(tmp_path / "c").search("a red circle", k=5)] == \
        [r.path for r in a.search("a red circle", k=5)]
    capsys.readouterr()
    # wrong dimension: a clear error, nothing written
    pq.write_table(pa.table({"image_path": paths, "embedding": list(vecs[:, :5])}), tmp_path / "bad.parquet")
    assert main(["index", "--from-embeddings", str(tmp_path / "bad.parquet"), "--model", str(small_model),
                 "--out", str(tmp_path / "d")]) == 2
    assert "dimension" in capsys.readouterr().err
