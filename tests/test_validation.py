"""Numbers and data are validated where they enter: option ranges at parse time, k against the
index size, BOM tables, diverging training, duplicate COCO ids, too-small training sets, bad
embedding vectors, and file names the terminal cannot encode."""
import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from dualsearch.cli import build_parser, main
from dualsearch.cli.common import safe_output
from dualsearch.config import TrainConfig
from dualsearch.data.readers import DataError, read_coco, read_dataset, read_table
from dualsearch.errors import DualsearchError
from dualsearch.index.interop import EmbeddingsError, check_vectors, read_embeddings

# ============================================================================ 1. option ranges
BAD_OPTIONS = [
    (["search", "idx", "q"], "-k", ["0", "-3", "abc", "1.5", "1e400"]),
    (["search", "idx", "q"], "--image-weight", ["nan", "inf", "x"]),
    (["serve", "idx"], "--port", ["0", "65536", "-1", "http"]),
    (["serve", "idx"], "--max-k", ["0"]),
    (["demo"], "--images", ["0"]),
    (["demo"], "--epochs", ["0", "-2"]),
    (["index", "dir", "--model", "m", "--out", "o"], "--workers", ["-1"]),
    (["index", "dir", "--model", "m", "--out", "o"], "--batch-size", ["0"]),
    (["index", "dir", "--model", "m", "--out", "o"], "--commit-every", ["0"]),
    (["index", "dir", "--model", "m", "--out", "o"], "--max-pixels", ["0"]),
    (["index", "dir", "--model", "m", "--out", "o"], "--memory-budget", ["0", "-1", "nan", "inf"]),
    (["index", "dir", "--model", "m", "--out", "o"], "--shard-size", ["0"]),
    (["train", "--captions", "c", "--out", "o"], "--lr", ["0", "-1", "inf", "nan"]),
    (["train", "--captions", "c", "--out", "o"], "--epochs", ["0"]),
    (["train", "--captions", "c", "--out", "o"], "--batch-size", ["0", "1"]),
    (["train", "--captions", "c", "--out", "o"], "--weight-decay", ["-0.1", "nan"]),
    (["train", "--captions", "c", "--out", "o"], "--temperature", ["0", "-0.07", "inf"]),
    (["train", "--captions", "c", "--out", "o"], "--embed-dim", ["0"]),
    (["train", "--captions", "c", "--out", "o"], "--head-layers", ["-1"]),
    (["train", "--captions", "c", "--out", "o"], "--captions-per-image", ["0"]),
    (["train", "--captions", "c", "--out", "o"], "--val-fraction", ["1", "-0.1", "1.5", "nan"]),
    (["train", "--captions", "c", "--out", "o"], "--workers", ["-1"]),
    (["train", "--captions", "c", "--out", "o"], "--seed", ["-1", str(2**32)]),
    (["eval", "--model", "m", "--captions", "c"], "-k", ["0"]),
    (["eval", "--model", "m", "--captions", "c"], "--limit", ["0"]),
    (["eval", "--model", "m", "--captions", "c"], "--captions-per-image", ["0"]),
    (["eval", "--model", "m", "--captions", "c"], "--workers", ["-1"]),
    (["data", "shapes", "out"], "--images", ["0"]),
    (["data", "shapes", "out"], "--seed", ["-1"]),
    (["data", "convert", "--captions", "c", "--out", "o"], "--shard-size", ["0"]),
    (["data", "info", "--captions", "c"], "--show", ["-1"]),
]


@pytest.mark.parametrize("command,option,value",
                         [(c, o, v) for c, o, values in BAD_OPTIONS for v in values],
                         ids=lambda x: " ".join(x) if isinstance(x, list) else str(x))
def test_bad_option_values_exit_2_at_parse_time(command, option, value, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, f"{option}={value}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ")
    last = err.strip().splitlines()[-1]
    assert f"error: argument {option}" in last and ("must" in last or "expected" in last), last
    assert "Traceback" not in err


def test_good_option_values_parse():
    args = build_parser().parse_args(["search", "idx", "q", "-k", "1e12", "--image-weight", "-0.5"])
    assert args.k == 10**12 and args.image_weight == -0.5
    args = build_parser().parse_args(["train", "--captions", "c", "--out", "o", "--val-fraction", "0",
                                      "--workers", "0", "--head-layers", "0", "--weight-decay", "0"])
    assert (args.val_fraction, args.workers, args.head_layers, args.weight_decay) == (0.0, 0, 0, 0.0)
    assert build_parser().parse_args(["serve", "idx", "--port", "65535"]).port == 65535


def _all_actions(parser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


def test_no_option_is_parsed_by_bare_int_or_float():
    """Every numeric option goes through a range-checking type from cli/options.py."""
    bare = [a.option_strings or a.dest for a in _all_actions(build_parser()) if a.type in (int, float)]
    assert bare == []


# ============================================================================ 2. k and the index size
@pytest.fixture()
def small_index(tmp_path, shapes_data, tiny_model):
    from dualsearch.index.build import build_index

    _, root = shapes_data
    col = tmp_path / "col"
    col.mkdir()
    for p in sorted((root / "images").glob("*.jpg"))[:7]:
        shutil.copy(p, col / p.name)
    out = tmp_path / "idx"
    build_index(col, tiny_model, out, num_workers=0, progress=False)
    return out


def test_huge_k_is_clamped_to_the_index_size(small_index):
    from dualsearch.search import Searcher

    s = Searcher.open(small_index)
    try:
        n = len(s)
        assert n == 7
        t0 = time.perf_counter()
        hits = s.search("a red circle", k=10**12)
        assert len(hits) == n and len({h.id for h in hits}) == n
        assert time.perf_counter() - t0 < 10
        like = s.search(like_id=hits[0].id, k=10**12)
        assert len(like) == n - 1 and hits[0].id not in {h.id for h in like}
        assert len(s.search("a red circle", k=3)) == 3
        from dualsearch.search import QueryError

        for bad in (float("nan"), float("inf"), None):
            with pytest.raises(QueryError, match="k must be a whole number"):
                s.search("a red circle", k=bad)
    finally:
        s.close()


def test_empty_index_returns_no_results(small_index):
    import faiss

    from dualsearch.search import Searcher

    s = Searcher.open(small_index)
    try:
        s.index = faiss.IndexFlatIP(s.dim)
        assert s.search("a red circle", k=10**12) == []
    finally:
        s.close()


@pytest.mark.parametrize("k", ["100000000", "1e12"])
def test_cli_huge_k_prints_the_whole_index(small_index, capsys, k):
    assert main(["-q", "search", str(small_index), "a red circle", "-k", k, "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 7


# ============================================================================ 3. BOM tables
def _jpg(path):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(path)
    return path


def test_csv_and_tsv_with_byte_order_mark_and_padded_headers(tmp_path):
    _jpg(tmp_path / "a.jpg")
    _jpg(tmp_path / "b.jpg")
    (tmp_path / "t.csv").write_bytes("filepath,caption\na.jpg,a red square\nb.jpg,café au lait\n"
                                     .encode("utf-8-sig"))
    ds = read_table(tmp_path / "t.csv")
    assert len(ds) == 2 and ds.records[1].captions == ("café au lait",)
    (tmp_path / "t.tsv").write_bytes("\ufeff filepath \t caption \na.jpg\ta red square\n".encode())
    assert len(read_table(tmp_path / "t.tsv")) == 1
    # the CLI reads it too
    assert main(["-q", "data", "info", "--captions", str(tmp_path / "t.csv")]) == 0


def test_jsonl_with_byte_order_mark(tmp_path):
    _jpg(tmp_path / "a.jpg")
    lines = [json.dumps({"file_name": "a.jpg", " text ": ["a red square", "red"]})]
    (tmp_path / "t.jsonl").write_bytes(("\n".join(lines) + "\n").encode("utf-8-sig"))
    ds = read_table(tmp_path / "t.jsonl")
    assert len(ds) == 1 and ds.records[0].captions == ("a red square", "red")


def test_jsonl_line_that_is_not_an_object_is_a_data_error(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"path": "a.jpg", "caption": "x"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: expected a JSON object"):
        read_table(tmp_path / "t.jsonl")


def test_coco_with_byte_order_mark(tmp_path):
    _jpg(tmp_path / "a.jpg")
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 1, "image_id": 1, "caption": "x"}]}
    (tmp_path / "c.json").write_bytes(json.dumps(doc).encode("utf-8-sig"))
    assert len(read_coco(tmp_path / "c.json", tmp_path)) == 1


# ============================================================================ 5. COCO duplicate ids
def test_coco_duplicate_image_ids_keep_the_first_and_are_reported(tmp_path):
    _jpg(tmp_path / "a.jpg")
    _jpg(tmp_path / "b.jpg")
    doc = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"},
                      {"id": 2, "file_name": "b.jpg"}],
           "annotations": [{"id": 1, "image_id": 1, "caption": "a red square"},
                           {"id": 2, "image_id": 2, "caption": "a blue star"},
                           {"id": 3, "image_id": [1], "caption": "unhashable id"},
                           "not an annotation"]}
    (tmp_path / "c.json").write_text(json.dumps(doc))
    ds = read_coco(tmp_path / "c.json", tmp_path)
    by_name = {os.path.basename(r.name): r.captions for r in ds.records}
    assert by_name == {"a.jpg": ("a red square",), "b.jpg": ("a blue star",)}
    reasons = [reason for _, reason in ds.skipped.entries]
    assert sum("duplicate image id" in r for r in reasons) == 1
    assert "duplicate image id" in ds.skipped.summary()


# ============================================================================ 5. too few training images
def test_fit_refuses_fewer_than_two_images_before_computing_features(tmp_path, shapes_data, tiny_model_config,
                                                                     monkeypatch):
    import dualsearch.train.fit as fit_mod

    def no_features(*a, **k):
        raise AssertionError("features computed")

    monkeypatch.setattr(fit_mod, "build_loaders", no_features)
    ds = read_dataset(*shapes_data)
    for train in ([], ds.records[:1]):
        with pytest.raises(DataError, match="at least 2"):
            fit_mod.fit(tiny_model_config, TrainConfig(epochs=1, batch_size=8), train, [], tmp_path / "m",
                        cache_dir=None, progress=False, num_workers=0)
    assert not (tmp_path / "m").exists()
    with pytest.raises(DualsearchError, match="batch size must be at least 2"):
        fit_mod.fit(tiny_model_config, TrainConfig(epochs=1, batch_size=1), ds.records[:4], [], None,
                    cache_dir=None, progress=False, num_workers=0)


def test_cli_train_on_one_image_is_a_clear_error(tmp_path, capsys):
    _jpg(tmp_path / "a.jpg")
    (tmp_path / "t.csv").write_text("filepath,caption\na.jpg,a red square\n")
    assert main(["-q", "train", "--captions", str(tmp_path / "t.csv"), "--out", str(tmp_path / "m"),
                 "--val-fraction", "0", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert "at least 2" in err and "\n" not in err.strip()
    assert not (tmp_path / "m").exists()


# ============================================================================ 4. diverging training
def _nan_loss_from_epoch(monkeypatch, epoch: int):
    """From the 0-based ``epoch`` on, the model's loss is NaN."""
    from dualsearch.train.module import DualEncoderModule

    orig = DualEncoderModule.training_step

    def step(self, batch, i):
        if self.current_epoch >= epoch:
            real = type(self.model).loss
            self.model.loss = lambda a, b, owner=None: real(self.model, a, b, owner) * float("nan")
        return orig(self, batch, i)

    monkeypatch.setattr(DualEncoderModule, "training_step", step)


def _finite(folder) -> bool:
    from dualsearch.model.dual_encoder import DualEncoder

    model = DualEncoder.load(folder)
    return all(torch.isfinite(p).all() for p in model.parameters())


def _split(shapes_data):
    ds = read_dataset(*shapes_data)
    return ds.records[:48], ds.records[48:64]


def test_nan_loss_after_a_good_epoch_keeps_the_best_model(tmp_path, shapes_data, tiny_model_config, monkeypatch):
    from dualsearch.train.fit import fit
    from dualsearch.train.module import TrainingError

    _nan_loss_from_epoch(monkeypatch, 1)
    train, val = _split(shapes_data)
    with pytest.raises(TrainingError, match=r"epoch 2.*loss is nan.*--lr.*best earlier model \(epoch 1") as e:
        fit(tiny_model_config, TrainConfig(epochs=4, batch_size=16), train, val, tmp_path / "m", cache_dir=None,
            progress=False, num_workers=0)
    assert str(tmp_path / "m") in str(e.value) and "\n" not in str(e.value)
    assert e.value.result.folder == tmp_path / "m" and len(e.value.result.history) == 1
    assert _finite(tmp_path / "m")


def test_nan_loss_in_the_first_epoch_writes_nothing(tmp_path, shapes_data, tiny_model_config, monkeypatch):
    from dualsearch.train.fit import fit
    from dualsearch.train.module import TrainingError

    _nan_loss_from_epoch(monkeypatch, 0)
    train, val = _split(shapes_data)
    with pytest.raises(TrainingError, match=r"epoch 1.*no model was written"):
        fit(tiny_model_config, TrainConfig(epochs=2, batch_size=16), train, val, tmp_path / "m", cache_dir=None,
            progress=False, num_workers=0)
    assert not (tmp_path / "m").exists()


def test_infinite_temperature_is_divergence(tmp_path, shapes_data, tiny_model_config, monkeypatch):
    """A finite logit scale so negative that the temperature 1/exp(scale) is inf is caught too."""
    from dualsearch.train.fit import fit
    from dualsearch.train.module import DualEncoderModule, TrainingError

    orig = DualEncoderModule.on_train_batch_end

    def end(self, outputs, batch, i):
        if self.current_epoch >= 1:
            with torch.no_grad():
                self.model.logit_scale.fill_(-1000.0)
        return orig(self, outputs, batch, i)

    monkeypatch.setattr(DualEncoderModule, "on_train_batch_end", end)
    train, _ = _split(shapes_data)
    with pytest.raises(TrainingError, match=r"epoch 2: the temperature is inf"):
        fit(tiny_model_config, TrainConfig(epochs=3, batch_size=16), train, [], tmp_path / "m", cache_dir=None,
            progress=False, num_workers=0)
    assert _finite(tmp_path / "m")
    from dualsearch.model.dual_encoder import DualEncoder

    assert DualEncoder.load(tmp_path / "m").logit_scale.item() > -100


def test_huge_learning_rate_is_never_a_silent_success(tmp_path, shapes_data, tiny_model_config):
    from dualsearch.train.fit import fit
    from dualsearch.train.module import TrainingError

    train, val = _split(shapes_data)
    mcfg = replace(tiny_model_config, learn_temperature=True, loss="clip")
    with pytest.raises(TrainingError, match="diverged") as e:
        fit(mcfg, TrainConfig(epochs=5, batch_size=16, lr=100.0, early_stop_patience=10), train, val,
            tmp_path / "m", cache_dir=None, progress=False, num_workers=0)
    if (tmp_path / "m").exists():
        assert "written to" in str(e.value) and _finite(tmp_path / "m")
    else:
        assert "no model was written" in str(e.value)


def test_cli_train_with_huge_lr_exits_2_with_one_line(tmp_path, shapes_data, tiny_text_model, tiny_vision_model,
                                                      capsys):
    captions, root = shapes_data
    code = main(["-q", "train", "--captions", str(captions), "--images", str(root), "--out", str(tmp_path / "m"),
                 "--image-tower", f"hf:{tiny_vision_model}", "--text-tower", f"hf:{tiny_text_model}",
                 "--embed-dim", "16", "--head-layers", "1", "--epochs", "3", "--batch-size", "16", "--lr", "100",
                 "--no-cache", "--workers", "0"])
    assert code == 2
    last = capsys.readouterr().err.strip().replace("\r", "\n").splitlines()[-1]  # after any progress bars
    assert last.startswith("dualsearch: error: training diverged in epoch") and "--lr" in last
    assert not (tmp_path / "m").exists() or _finite(tmp_path / "m")


# ============================================================================ 5. embedding vectors
def _parquet(path, vectors):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_path": [f"{i}.jpg" for i in range(len(vectors))],
                             "embedding": [list(map(float, v)) for v in vectors]}), path)
    return path


def test_check_vectors():
    good = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    check_vectors(good)
    check_vectors(np.zeros((0, 4), np.float32))
    bad = good.copy()
    bad[2, 1] = np.nan
    bad[3] = 0
    bad[4, 0] = np.inf
    with pytest.raises(EmbeddingsError, match=r"3 of 5 vectors.*2 with NaN/inf, 1 all zeros.*row 2"):
        check_vectors(bad)
    with pytest.raises(EmbeddingsError, match=r"row 0 \(0-based, all zeros"):
        check_vectors(np.zeros((2, 4)))
    with pytest.raises(EmbeddingsError, match=r"shape \[4\]"):
        check_vectors(np.ones(4))


def test_read_embeddings_refuses_bad_vectors(tiny_model, tmp_path, capsys):
    vecs = np.eye(4, dtype=np.float32)
    vecs[1] = 0
    vecs[3, 2] = np.nan
    src = _parquet(tmp_path / "e.parquet", vecs)
    with pytest.raises(EmbeddingsError, match=r"2 of 4 vectors.*row 1"):
        read_embeddings(src)
    # clip-retrieval's layout, an inf in the second file
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "cr" / "img_emb").mkdir(parents=True)
    (tmp_path / "cr" / "metadata").mkdir()
    for i, v in enumerate((np.eye(3, dtype=np.float32), np.full((2, 3), np.inf, np.float32))):
        np.save(tmp_path / "cr" / "img_emb" / f"img_emb_{i}.npy", v)
        pq.write_table(pa.table({"image_path": [f"{i}-{j}.jpg" for j in range(len(v))]}),
                       tmp_path / "cr" / "metadata" / f"metadata_{i}.parquet")
    with pytest.raises(EmbeddingsError, match=r"2 of 5 vectors.*row 3"):
        read_embeddings(tmp_path / "cr")
    assert main(["-q", "index", "--from-embeddings", str(src), "--model", str(tiny_model), "--out",
                 str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert "row 1" in err and "\n" not in err.strip()


def test_read_embeddings_refuses_ragged_and_mixed_files(tmp_path):
    (tmp_path / "cr" / "img_emb").mkdir(parents=True)
    (tmp_path / "cr" / "metadata").mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i, v in enumerate((np.eye(3, dtype=np.float32), np.ones((2, 4), np.float32))):
        np.save(tmp_path / "cr" / "img_emb" / f"img_emb_{i}.npy", v)
        pq.write_table(pa.table({"image_path": [f"{i}-{j}.jpg" for j in range(len(v))]}),
                       tmp_path / "cr" / "metadata" / f"metadata_{i}.parquet")
    with pytest.raises(EmbeddingsError, match="4-d vectors"):
        read_embeddings(tmp_path / "cr")
    pq.write_table(pa.table({"image_path": ["a", "b"], "embedding": [[1.0, 2.0], None]}), tmp_path / "n.parquet")
    with pytest.raises(EmbeddingsError):
        read_embeddings(tmp_path / "n.parquet")


# ============================================================================ 5. unencodable file names
def test_safe_output_escapes_what_the_stream_cannot_encode():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")
    safe_output(stream)
    name = os.fsdecode(b"caf\xe9.jpg")
    print(name, "café", file=stream)
    stream.flush()
    assert raw.getvalue() == b"caf\\udce9.jpg caf\\xe9\n"
    safe_output(object())  # no reconfigure: left alone


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that stores any bytes as a name")
def test_cli_prints_undecodable_file_names_to_an_ascii_pipe(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    name = os.fsencode(folder) + b"/caf\xe9"
    Image.new("RGB", (16, 16)).save(os.fsdecode(name + b".jpg"), format="JPEG")
    with open(name + b".txt", "w") as f:
        f.write("a black square\n")
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    res = subprocess.run([sys.executable, "-m", "dualsearch", "-q", "data", "info", "--captions", str(folder)],
                         capture_output=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert b"caf\\udce9.jpg" in res.stdout


@pytest.mark.parametrize("option,value", [("--devices", "abc"), ("--devices", "0"), ("--devices", "-1"),
                                          ("--devices", "1e400"), ("--embed-dim", "99999999999999999999"),
                                          ("--batch-size", "99999999999999999999")])
def test_train_devices_and_sizes_are_bounded(option, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--captions", "c", "--out", "o", f"{option}={value}"])
    assert e.value.code == 2
    assert f"error: argument {option}" in capsys.readouterr().err
