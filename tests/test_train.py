import csv
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dualsearch.cli import main
from dualsearch.config import TrainConfig
from dualsearch.data.readers import read_dataset
from dualsearch.data.records import ImageCaption, ImageRef
from dualsearch.data.split import split_records
from dualsearch.encode.cache import FeatureCache
from dualsearch.encode.features import compute_image_features, embed_records
from dualsearch.errors import UsageError
from dualsearch.model.dual_encoder import DualEncoder, ModelError
from dualsearch.model.towers import TowerError, build_image_tower, build_text_tower
from dualsearch.train.fit import fit


def test_hf_towers_load_from_local_paths(tiny_text_model, tiny_vision_model):
    text = build_text_tower(f"hf:{tiny_text_model}")
    assert text.pooling == "pooler" and text.output_dim == 32
    out = text(text.tokenize(["a red circle", "two blue stars above a square"]))
    assert out.shape == (2, 32)
    mean = build_text_tower(f"hf:{tiny_text_model}", pooling="mean")
    assert not torch.allclose(mean(mean.tokenize(["a red circle"])), text(text.tokenize(["a red circle"])))
    vis = build_image_tower(f"hf:{tiny_vision_model}")
    assert vis.image_size == 32 and vis.output_dim == 32 and vis.resize == "squash"
    from PIL import Image

    px = vis.preprocess(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert px.shape == (3, 32, 32)
    assert vis(px[None]).shape == (1, 32)


def test_tower_errors_are_clear(tmp_path):
    with pytest.raises(TowerError, match="unknown image tower"):
        build_image_tower("resnet9000")
    with pytest.raises(TowerError, match="local folder"):
        build_text_tower(f"hf:{tmp_path}/nothing-here")


def test_trainable_modes(tiny_text_model):
    t = build_text_tower(f"hf:{tiny_text_model}")
    t.set_trainable("frozen")
    assert t.is_frozen
    t.set_trainable("last:1")
    trainable = {n for n, p in t.named_parameters() if p.requires_grad}
    assert trainable and all("encoder.layer.1." in n for n in trainable)
    with pytest.raises(TowerError):
        t.set_trainable("some")


def _records(captions, root):
    ds = read_dataset(captions, root)
    return split_records(ds.records, {"train": 0.8, "val": 0.2}, seed=0)


def test_two_epoch_run_lowers_loss_and_writes_loadable_model(tmp_path, shapes_data, tiny_model_config):
    parts = _records(*shapes_data)
    tcfg = TrainConfig(epochs=3, batch_size=32, lr=3e-3, early_stop_patience=10)
    res = fit(tiny_model_config, tcfg, parts["train"], parts["val"], tmp_path / "m", cache_dir=tmp_path / "c",
              progress=False)
    assert len(res.history) == 3
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    folder = tmp_path / "m"
    for name in ("config.json", "model.safetensors", "loss_history.csv", "loss.png"):
        assert (folder / name).is_file(), name
    rows = list(csv.DictReader(open(folder / "loss_history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    doc = json.loads((folder / "config.json").read_text())
    assert doc["model"]["embed_dim"] == 16 and doc["train"]["epochs"] == 3
    loaded = DualEncoder.load(folder, verify_towers=True)
    texts = ["a red circle", "two blue squares"]
    np.testing.assert_allclose(loaded.embed_texts(texts), res.model.embed_texts(texts), atol=1e-6)
    a = embed_records(res.model, parts["val"][:5], None)
    b = embed_records(loaded, parts["val"][:5], None)
    np.testing.assert_allclose(a.image_emb, b.image_emb, atol=1e-5)


def test_raw_path_with_trainable_tower_saves_tower_weights(tmp_path, shapes_data, tiny_model_config):
    from dataclasses import replace

    parts = _records(*shapes_data)
    mcfg = replace(tiny_model_config, text_trainable="last:1")
    res = fit(mcfg, TrainConfig(epochs=1, batch_size=32), parts["train"][:40], parts["val"][:10],
              tmp_path / "m", cache_dir=tmp_path / "c", progress=False, num_workers=0)
    loaded = DualEncoder.load(tmp_path / "m")
    np.testing.assert_allclose(loaded.embed_texts(["a star"]), res.model.embed_texts(["a star"]), atol=1e-6)


def test_feature_cache_hit_and_invalidation(tmp_path, tiny_vision_model):
    from PIL import Image

    tower = build_image_tower(f"hf:{tiny_vision_model}")
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (40, 40), (80 * i, 0, 0)).save(p)
        paths.append(p)
    refs = [ImageRef(str(p)) for p in paths]
    cache = FeatureCache(tmp_path / "c", tower.fingerprint(), tower.output_dim)
    f1, ok = compute_image_features(tower, refs, cache, num_workers=0)
    assert ok.all() and cache.misses == 3 and cache.hits == 0
    f2, _ = compute_image_features(tower, refs, cache, num_workers=0)
    assert cache.hits == 3
    np.testing.assert_array_equal(f1, f2)
    # a changed file gets a new key and is recomputed
    import os
    import time

    Image.new("RGB", (40, 40), (0, 0, 255)).save(paths[0])
    os.utime(paths[0], ns=(time.time_ns(), time.time_ns() + 10_000_000))
    before = cache.misses
    f3, _ = compute_image_features(tower, refs, cache, num_workers=0)
    assert cache.misses == before + 1
    assert not np.allclose(f3[0], f1[0]) and np.allclose(f3[1:], f1[1:])
    # a changed tower has another fingerprint, so another cache file
    with torch.no_grad():
        next(tower.parameters()).add_(1.0)
    tower._fingerprint = None
    assert FeatureCache(tmp_path / "c", tower.fingerprint(), tower.output_dim).path != cache.path


def test_bad_image_in_training_is_skipped(tmp_path, shapes_data, tiny_model_config):
    parts = _records(*shapes_data)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    train = parts["train"][:30] + [ImageCaption(ImageRef(str(bad)), ("a red circle",))]
    res = fit(tiny_model_config, TrainConfig(epochs=1, batch_size=16), train, [], None, cache_dir=None,
              use_cache=True, progress=False)
    assert len(res.history) == 1


def test_model_load_errors(tmp_path):
    with pytest.raises(ModelError, match="not a dualsearch model folder"):
        DualEncoder.load(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelError, match="damaged config"):
        DualEncoder.load(tmp_path)


def test_cli_train_and_eval_json(tmp_path, shapes_data, tiny_text_model, tiny_vision_model, capsys):
    captions, root = shapes_data
    common = ["--captions", str(captions), "--images", str(root), "--cache-dir", str(tmp_path / "c")]
    for rec in ("seed", "default"):
        out = tmp_path / rec
        assert main(["-q", "train", *common, "--out", str(out), "--recipe", rec, "--epochs", "2",
                     "--image-tower", f"hf:{tiny_vision_model}", "--text-tower", f"hf:{tiny_text_model}",
                     "--batch-size", "32"]) == 0
        assert f"model written to {out}" in capsys.readouterr().out
        assert main(["-q", "eval", "--model", str(out), *common, "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["images"] == 120 and doc["queries"] == 600
        assert set(doc["text_to_image"]) == {"R@1", "R@5", "R@10", "median_rank"}
        assert doc["top_k_accuracy"]["k"] == 100
    cfg = json.loads((tmp_path / "seed" / "config.json").read_text())
    assert cfg["model"]["loss"] == "seed" and cfg["train"]["captions_per_image"] == 2
    assert main(["eval", "--model", str(tmp_path / "nope"), *common]) == 2


def test_recipes_seed_unchanged_default_prior_only_where_it_fits():
    from dualsearch.train.recipes import recipe

    seed_m, seed_t = recipe("seed")
    assert (seed_m.loss, seed_m.temperature, seed_m.learn_temperature, seed_m.embed_dim, seed_m.head_layers,
            seed_m.image_prior) == ("seed", 0.05, False, 256, 1, "none")
    assert (seed_t.captions_per_image, seed_t.pairs, seed_t.weight_decay, seed_t.epochs) == (2, "all", 1e-3, 30)
    m, _ = recipe("default")
    assert (m.image_prior, m.embed_dim) == ("conse:20:0.5", 256 + 384)
    assert recipe("default", embed_dim=128)[0].embed_dim == 128 + 384  # the heads' dimension
    other = recipe("default", image_tower="hf:some/vit", embed_dim=16)[0]
    assert (other.image_prior, other.embed_dim) == ("none", 16)
    assert recipe("default", text_tower="hf:some/bert")[0].image_prior == "none"
    assert recipe("clip")[0] == replace(m, image_prior="none", embed_dim=256, ensemble=1)
    assert (seed_m.ensemble, m.ensemble) == (1, 3)  # the default averages 3 heads per side
    assert recipe("default", image_trainable="last:1")[0].ensemble == 1  # one model trains a tower
    assert recipe("default", text_trainable="all", ensemble=2)[0].ensemble == 2  # asked for: check_ensemble refuses


def test_conse_prior_model_saves_loads_and_trains_through_the_cache(tmp_path, shapes_data, tiny_text_model):
    """EfficientNet-Lite0's own classifier and a tiny text tower: the prior's buffers travel with the
    model folder, and training fills them through the feature cache as the constructor would."""
    from dualsearch.config import ModelConfig
    from dualsearch.model.prior import PriorHead, class_text_embeddings

    parts = _records(*shapes_data)
    text_dim = build_text_tower(f"hf:{tiny_text_model}").output_dim
    mcfg = ModelConfig(image_tower="efficientnet-lite0", text_tower=f"hf:{tiny_text_model}", embed_dim=8 + text_dim,
                       head_layers=1, image_prior="conse:5:1")
    tcfg = TrainConfig(epochs=1, batch_size=32, lr=1e-3)
    res = fit(mcfg, tcfg, parts["train"][:40], parts["val"][:8], tmp_path / "m", cache_dir=tmp_path / "c",
              progress=False)
    head = res.model.image_head
    assert isinstance(head, PriorHead) and head.classifier_w.abs().sum() > 0
    torch.testing.assert_close(head.class_text, torch.nn.functional.normalize(
        class_text_embeddings(res.model.text_tower), dim=-1), atol=1e-5, rtol=1e-4)
    loaded = DualEncoder.load(tmp_path / "m")
    a = embed_records(res.model, parts["val"][:4], None)
    b = embed_records(loaded, parts["val"][:4], None)
    assert a.image_emb.shape == (4, 8 + text_dim)
    np.testing.assert_allclose(a.image_emb, b.image_emb, atol=1e-5)
    np.testing.assert_allclose(a.text_emb, b.text_emb, atol=1e-5)


def test_prior_needs_an_imagenet_classifier(tiny_text_model, tiny_vision_model):
    from dualsearch.config import ModelConfig

    with pytest.raises(TowerError, match="no ImageNet classifier"):
        DualEncoder(ModelConfig(image_tower=f"hf:{tiny_vision_model}", text_tower=f"hf:{tiny_text_model}",
                                image_prior="conse:5"))
    with pytest.raises(ModelError, match="embed_dim must be over"):
        DualEncoder(ModelConfig(image_tower="efficientnet-lite0", text_tower=f"hf:{tiny_text_model}",
                                image_prior="conse:5:1", embed_dim=4), fill_prior=False)


def test_grouped_batches_train_on_every_caption_as_positives(tmp_path, shapes_data, tiny_model_config):
    """--pairs grouped: each image once a batch with all its (5) captions; the multi-positive loss
    trains through the feature cache, and the seed loss refuses it in one line."""
    from dualsearch.train.pairs import PairCollate, Pairs

    parts = _records(*shapes_data)
    records = parts["train"][:6]
    ds = Pairs(records, "grouped", np.zeros((6, 3), np.float32), np.arange(30, dtype=np.float32)[:, None])
    batch = PairCollate(None)([ds[0], ds[1]])
    assert batch[0].shape == (2, 3) and batch[1][:, 0].tolist() == list(range(10))
    assert batch[2].tolist() == [0] * 5 + [1] * 5
    tcfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, pairs="grouped")
    res = fit(tiny_model_config, tcfg, parts["train"][:48], parts["val"][:8], None, cache_dir=tmp_path / "c",
              progress=False)
    assert len(res.history) == 2 and all(np.isfinite(h["train_loss"]) for h in res.history)
    with pytest.raises(UsageError, match="--pairs grouped needs the clip or siglip loss"):
        fit(replace(tiny_model_config, loss="seed"), tcfg, parts["train"][:48], [], None, progress=False)
    both = replace(tiny_model_config, soft_targets=0.3, hard_negatives=0.5)
    res = fit(both, TrainConfig(epochs=1, batch_size=16), parts["train"][:48], [], None, cache_dir=tmp_path / "c",
              progress=False)
    assert np.isfinite(res.history[0]["train_loss"])
    with pytest.raises(UsageError, match="need the clip loss with one caption per image"):
        fit(replace(tiny_model_config, soft_targets=0.2), tcfg, parts["train"][:48], [], None, progress=False)
    with pytest.raises(UsageError, match="--hard-negatives in \\[0, 10\\]"):
        fit(replace(tiny_model_config, hard_negatives=-1.0), TrainConfig(), parts["train"][:48], [], None,
            progress=False)
