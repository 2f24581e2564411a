"""Cached partial fine-tuning (``last:N``): the split towers, training on cut-point activations, the
cache key, and the fall-back to raw mode (issue 15, item 8)."""
import logging
import sqlite3
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualsearch.config import ModelConfig, TrainConfig
from dualsearch.data.readers import read_dataset
from dualsearch.encode.activations import image_activations, text_activations
from dualsearch.encode.features import flatten_captions
from dualsearch.model.dual_encoder import DualEncoder
from dualsearch.model.towers import build_image_tower, build_text_tower
from dualsearch.train.fit import choose_sides, fit
from tests.conftest import WORDS

CAPTIONS = ["a red circle", "two blue squares above a large green triangle on a gray background"]


@pytest.fixture(scope="module")
def towers3(tmp_path_factory):
    """A 3-layer tiny ViT and a 3-layer tiny BERT (local HF folders): cut points 1 and 2 exist."""
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTImageProcessor, ViTModel

    d = tmp_path_factory.mktemp("towers3")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True).save_pretrained(d / "bert")
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d / "bert")
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(d / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(d / "vit")
    return f"hf:{d / 'vit'}", f"hf:{d / 'bert'}"


def _pixels(tower, shapes_data, n=4):
    """The first ``n`` images, decoded and preprocessed as training decodes them."""
    from dualsearch.data.images import load_image

    records = read_dataset(*shapes_data).records[:n]
    return torch.stack([tower.preprocess(load_image(r.image, target_size=tower.image_size)) for r in records])


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


# ============================================================================ 1. the split at initialisation
@pytest.mark.parametrize("which", ["efficientnet-lite0", "vit", "bert"])
def test_cut_point_path_equals_the_full_tower(which, towers3, shapes_data):
    if which == "bert":
        tower = build_text_tower(towers3[1], pooling="mean")
        inputs = tower.tokenize(CAPTIONS)  # padded: the mask must travel with the states
    else:
        tower = build_image_tower(which if which.startswith("eff") else towers3[0])
        inputs = _pixels(tower, shapes_data, 2)
    tower.eval()
    n_blocks = len(list(tower.blocks()))
    for n in (1, 2):
        tower.set_trainable(f"last:{n}")
        cut = tower.cut_point()
        assert cut == n_blocks - n and tower.cut_problem(cut) is None
        with torch.no_grad():
            full = tower(inputs)
            acts = tower.forward_to(cut, inputs)
            torch.testing.assert_close(tower.forward_from(cut, acts), full, rtol=1e-5, atol=1e-5)
            half = (acts[0].half().float(), acts[1]) if which == "bert" else acts.half().float()
            assert _cos(tower.forward_from(cut, half), full).min() >= 0.999
    if which == "efficientnet-lite0":
        tower.set_trainable("last:1")
        assert tower.activation_shape(tower.cut_point()) == (320, 7, 7)


# ============================================================================ 2. training on cached activations
def test_last_n_trains_only_its_blocks_and_the_saved_model_matches_the_cached_path(tmp_path, towers3, shapes_data,
                                                                                    caplog):
    vit, bert = towers3
    mcfg = ModelConfig(image_tower=vit, text_tower=bert, embed_dim=16, head_layers=1,
                       image_trainable="last:1", text_trainable="last:1")
    records = read_dataset(*shapes_data).records
    torch.manual_seed(0)
    model = DualEncoder(mcfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="dualsearch"):
        res = fit(mcfg, TrainConfig(epochs=2, batch_size=16, lr=1e-2, tower_lr=1e-2), records[:48], records[48:60],
                  tmp_path / "m", cache_dir=tmp_path / "c", progress=False, num_workers=0, init_model=model)
    assert "image tower last:1: cached activations at block 2" in caplog.text
    assert "text tower last:1: cached activations at block 2" in caplog.text
    assert "(image cached activations at block 2, text cached activations at block 2)" in caplog.text
    after = res.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    last_image = f"image_tower.model.{'layers' if hasattr(model.image_tower.model, 'layers') else 'encoder.layer'}.2."
    last_text = "text_tower.model.encoder.layer.2."
    trainable = (last_image, last_text, "image_head.", "text_head.", "logit_scale")
    assert changed and all(k.startswith(trainable) for k in changed), sorted(changed)[:5]
    assert any(k.startswith(last_image) for k in changed) and any(k.startswith(last_text) for k in changed)
    assert any(k.startswith("image_head.") for k in changed) and any(k.startswith("text_head.") for k in changed)

    # the saved model runs whole towers (no cache); the cached path gives the same embeddings
    loaded = DualEncoder.load(tmp_path / "m")
    test = records[60:70]
    kept, acts = image_activations(loaded.image_tower, 2, test, tmp_path / "c", show_progress=False)
    assert len(kept) == len(test)
    with torch.no_grad():
        cached_img = loaded.image_head(loaded.image_tower.forward_from(2, torch.from_numpy(acts).float()))
    full_img = torch.from_numpy(loaded.embed_pixels(_pixels(loaded.image_tower, shapes_data, 70)[60:]))
    assert _cos(cached_img, full_img).min() >= 0.999
    texts = flatten_captions(test)[0][:8]
    states = [torch.from_numpy(a).float() for a in text_activations(loaded.text_tower, 2, texts, tmp_path / "c",
                                                                    show_progress=False)]
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in states], batch_first=True)
    with torch.no_grad():
        cached_txt = loaded.text_head(loaded.text_tower.forward_from(
            2, (torch.nn.utils.rnn.pad_sequence(states, batch_first=True), mask)))
    assert _cos(cached_txt, torch.from_numpy(loaded.embed_texts(texts))).min() >= 0.999


# ============================================================================ 3. the cache key holds the cut point
def _rows(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM features").fetchone()[0]


def test_activation_cache_key_includes_the_cut_point(tmp_path, towers3, shapes_data):
    records = read_dataset(*shapes_data).records[:6]
    tower = build_image_tower(towers3[0])
    files = tmp_path / "features"
    tower.set_trainable("last:1")
    _, at2 = image_activations(tower, tower.cut_point(), records, tmp_path, num_workers=0, show_progress=False)
    assert sorted(p.name for p in files.glob("*.sqlite")) == [f"{tower.fingerprint()}-cut2.sqlite"]
    tower.set_trainable("last:2")  # same activation shape ([17, 32]): a reused file would go unnoticed
    _, at1 = image_activations(tower, tower.cut_point(), records, tmp_path, num_workers=0, show_progress=False)
    assert _rows(files / f"{tower.fingerprint()}-cut1.sqlite") == len(records)
    with torch.no_grad(), torch.inference_mode():
        fresh = tower.eval().forward_to(1, _pixels(tower, shapes_data, len(records)))
    np.testing.assert_allclose(at1.astype(np.float32), fresh.numpy(), atol=2e-3, rtol=2e-3)
    assert not np.allclose(at1, at2, atol=1e-2)
    # texts too, keyed by the cut point
    text = build_text_tower(towers3[1])
    for n in (1, 2):
        text.set_trainable(f"last:{n}")
        text_activations(text, text.cut_point(), CAPTIONS, tmp_path, show_progress=False)
    assert {p.name for p in files.glob(f"{text.fingerprint()}-cut*.sqlite")} == {
        f"{text.fingerprint()}-cut1.sqlite", f"{text.fingerprint()}-cut2.sqlite"}


# ============================================================================ 4. raw mode, said so
def test_augmented_inputs_and_all_fall_back_to_raw_mode_saying_so(tmp_path, towers3, shapes_data, caplog):
    vit, bert = towers3
    mcfg = ModelConfig(image_tower=vit, text_tower=bert, embed_dim=16, head_layers=1, image_trainable="last:1",
                       text_trainable="all")
    model = DualEncoder(mcfg)
    with caplog.at_level(logging.INFO, logger="dualsearch"):
        sides = choose_sides(model, TrainConfig(augment=True))
    assert [s.kind for s in sides] == ["raw", "raw"]
    assert "image tower last:1: its inputs are augmented on the fly (--augment); the whole tower runs every step " \
           "(raw mode)" in caplog.text
    assert "text tower all: all trains every block; the whole tower runs every step (raw mode)" in caplog.text
    assert [s.kind for s in choose_sides(model, TrainConfig())] == ["activations", "raw"]
    assert [s.kind for s in choose_sides(model, TrainConfig(), cache_activations=False)] == ["raw", "raw"]
    caplog.clear()
    records = read_dataset(*shapes_data).records
    with caplog.at_level(logging.INFO, logger="dualsearch"):
        fit(replace(mcfg, text_trainable="frozen"), TrainConfig(epochs=1, batch_size=8, augment=True), records[:16],
            [], None, cache_dir=tmp_path / "c", progress=False, num_workers=0)
    assert "(image tower every step, text cached features)" in caplog.text
    assert not list((tmp_path / "c" / "features").glob("*-cut*.sqlite"))


def test_cli_train_with_last_n_names_the_mode_and_the_model_embeds_without_the_cache(tmp_path, towers3, shapes_data,
                                                                                    caplog, capsys):
    from dualsearch.cli import main

    captions, root = shapes_data
    out = tmp_path / "m"
    with caplog.at_level(logging.INFO, logger="dualsearch"):
        assert main(["train", "--captions", str(captions), "--images", str(root), "--cache-dir", str(tmp_path / "c"),
                     "--out", str(out), "--recipe", "clip", "--epochs", "1", "--batch-size", "32",
                     "--image-tower", towers3[0], "--text-tower", towers3[1], "--image-trainable", "last:2",
                     "--workers", "0"]) == 0
    assert "image tower last:2: cached activations at block 1" in caplog.text
    assert "(image cached activations at block 1, text cached features)" in caplog.text
    assert list((tmp_path / "c" / "features").glob("*-cut1.sqlite"))
    assert DualEncoder.load(out).embed_texts(["a red circle"]).shape == (1, 256)


def test_a_tower_that_cannot_be_cut_falls_back_to_raw_mode_saying_so(tmp_path, towers3, caplog):
    from transformers import BertTokenizerFast, CLIPConfig, CLIPModel

    tok = BertTokenizerFast.from_pretrained(towers3[1][3:])
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3}
    ids = {"eos_token_id": tok.sep_token_id, "pad_token_id": 0, "bos_token_id": tok.cls_token_id}
    cfg = CLIPConfig(text_config={**tiny, **ids, "vocab_size": tok.vocab_size, "max_position_embeddings": 32},
                     vision_config={**tiny, "image_size": 32, "patch_size": 8}, projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    model = DualEncoder(ModelConfig(image_tower=towers3[0], text_tower=f"hf:{tmp_path / 'clip'}", embed_dim=16,
                                    head_layers=1, text_trainable="last:1"))
    assert model.text_tower.cut_point() == 2
    with caplog.at_level(logging.INFO, logger="dualsearch"):
        sides = choose_sides(model, TrainConfig())
    assert [s.kind for s in sides] == ["features", "raw"]
    assert ("text tower last:1: a CLIP-like or SigLIP text tower cannot be cut between blocks; the whole tower runs "
            "every step (raw mode)") in caplog.text
