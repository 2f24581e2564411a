"""--topic-batches: each batch from one k-means cluster of the captions (caption-level mined hard
negatives, as topic-aware sampling draws them)."""
from dataclasses import replace

import numpy as np
import pytest

from dualsearch.config import TrainConfig
from dualsearch.data.readers import read_dataset
from dualsearch.errors import UsageError
from dualsearch.train.fit import fit
from dualsearch.train.pairs import TopicBatches, caption_topics


def _clustered(n_topics=4, per_topic=10, captions=2, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_topics, 8))
    label = np.repeat(np.arange(n_topics), per_topic)
    owner = np.repeat(np.arange(len(label)), captions)
    feats = centers[label[owner]] + 0.05 * rng.normal(size=(len(owner), 8))
    return feats, owner, label


def test_topics_are_the_caption_clusters():
    feats, owner, label = _clustered()
    topics = caption_topics(feats, owner, 40, clusters=4, seed=0)
    assert len(set(topics)) == 4
    for t in set(topics):  # each k-means cluster is one true topic
        assert len(set(label[topics == t])) == 1
    assert set(caption_topics(feats, owner, 40, clusters=0, seed=0)) == {0}  # under one batch: one topic


def test_batches_hold_one_topic_and_cover_every_item_once_an_epoch():
    topics = np.repeat([3, 1, 2, 0], 10)
    sampler = TopicBatches(topics, batch_size=10, drop_last=True, seed=1)
    epochs = [list(sampler), list(sampler)]
    assert len(sampler) == 4
    for batches in epochs:
        assert all(len(set(topics[b])) == 1 and len(b) == 10 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(40))
    assert epochs[0] != epochs[1]  # a new order every epoch
    uneven = TopicBatches(np.repeat([0, 1], [7, 6]), batch_size=4, drop_last=False, seed=0)
    sizes = [len(b) for b in uneven]
    assert len(uneven) == 4 and sorted(sizes) == [1, 4, 4, 4]
    assert len(TopicBatches(np.repeat([0, 1], [7, 6]), 4, True, 0)) == len(list(TopicBatches(
        np.repeat([0, 1], [7, 6]), 4, True, 0))) == 3


def test_training_with_topic_batches(tmp_path, shapes_data, tiny_model_config):
    ds = read_dataset(*shapes_data)
    tcfg = TrainConfig(epochs=2, batch_size=16, lr=3e-3, topic_batches=True)
    res = fit(tiny_model_config, tcfg, ds.records[:64], ds.records[64:80], None, cache_dir=tmp_path / "c",
              progress=False)
    assert len(res.history) == 2 and all(np.isfinite(h["train_loss"]) for h in res.history)
    for pairs in ("all", "grouped"):
        res = fit(tiny_model_config, replace(tcfg, pairs=pairs, epochs=1), ds.records[:64], [], None,
                  cache_dir=tmp_path / "c", progress=False)
        assert np.isfinite(res.history[0]["train_loss"])
    with pytest.raises(UsageError, match="--topic-batches clusters the captions' cached tower features"):
        fit(tiny_model_config, tcfg, ds.records[:64], [], None, cache_dir=None, use_cache=False, progress=False,
            num_workers=0)


def test_one_topic_is_said_and_a_run_without_validation_reports_its_train_loss(tmp_path, shapes_data, tiny_text_model,
                                                                              tiny_vision_model, capsys, caplog):
    from dualsearch.cli import main

    captions, root = shapes_data
    assert main(["train", "--captions", str(captions), "--images", str(root), "--out", str(tmp_path / "m"),
                 "--image-tower", f"hf:{tiny_vision_model}", "--text-tower", f"hf:{tiny_text_model}",
                 "--embed-dim", "16", "--epochs", "1", "--batch-size", "256", "--val-fraction", "0",
                 "--ensemble", "1", "--topic-batches", "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "(120 train / 0 val images)" in out and "best train loss" in out and "val loss" not in out
    assert "--topic-batches: 120 training items fill about one batch of 256, so there is one topic" in caplog.text


def test_a_validation_set_of_one_image_is_dropped_with_a_warning(tmp_path, shapes_data, tiny_text_model,
                                                                tiny_vision_model, capsys, caplog):
    """One held-out image gives a contrastive loss of 0 every epoch: early stopping on it would keep
    epoch 1, so training monitors the training loss instead, and says so."""
    import json

    from dualsearch.cli import main

    captions, root = shapes_data
    doc = json.loads(captions.read_text())
    one = tmp_path / "one.json"
    first = doc["images"][0]["id"]
    one.write_text(json.dumps({"images": doc["images"][:1],
                               "annotations": [a for a in doc["annotations"] if a["image_id"] == first]}))
    assert main(["train", "--captions", str(captions), "--images", str(root), "--out", str(tmp_path / "m"),
                 "--val-captions", str(one), "--val-images", str(root),
                 "--image-tower", f"hf:{tiny_vision_model}", "--text-tower", f"hf:{tiny_text_model}",
                 "--embed-dim", "16", "--epochs", "2", "--batch-size", "64", "--ensemble", "1",
                 "--cache-dir", str(tmp_path / "c")]) == 0
    assert "1 usable validation image(s): a contrastive loss needs 2" in caplog.text
    assert "best train loss" in capsys.readouterr().out
