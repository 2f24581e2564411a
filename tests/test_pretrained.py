"""Pretrained CLIP-family models as ready-made dual encoders (tiny random models built from configs)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualsearch.cli import main
from dualsearch.model.dual_encoder import DualEncoder
from dualsearch.model.hf_import import import_hf
from dualsearch.search import Searcher

from .conftest import WORDS

# one transformer size for the text and vision towers of the tiny CLIP and SigLIP
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_VISION = {**TINY, "image_size": 32, "patch_size": 8}


def _bert_tokenizer(d, max_len):
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True, model_max_length=max_len)
    return tok, len(vocab)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    d = tmp_path_factory.mktemp("tiny-clip")
    tok, vocab = _bert_tokenizer(d, 16)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={**TINY, "vocab_size": vocab, "max_position_embeddings": 16,
                                  "eos_token_id": tok.sep_token_id, "pad_token_id": 0,
                                  "bos_token_id": tok.cls_token_id},
                     vision_config=TINY_VISION, projection_dim=24)
    CLIPModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    d = tmp_path_factory.mktemp("tiny-siglip")
    tok, vocab = _bert_tokenizer(d, 12)
    torch.manual_seed(1)
    cfg = SiglipConfig(text_config={**TINY, "vocab_size": vocab, "max_position_embeddings": 12},
                       vision_config=TINY_VISION)
    SiglipModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
    return d


TEXTS = ["a red circle", "two blue stars above a green square on a pink background", "a star"]


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_import_parity_with_transformers(tmp_path, which, tiny_clip, tiny_siglip):
    from transformers import AutoModel, AutoTokenizer

    src = tiny_clip if which == "clip" else tiny_siglip
    model = import_hf(f"hf:{src}", tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())["model"]
    assert cfg["head"] == "identity" and cfg["loss"] == which and cfg["image_tower"] == "hf:./hf"
    ref = AutoModel.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    loaded = DualEncoder.load(tmp_path / "m")
    kw = {"padding": "max_length", "max_length": 12} if which == "siglip" else {"padding": True}
    tokens = tok(TEXTS, return_tensors="pt", truncation=True, **kw)
    if which == "siglip":
        tokens = {"input_ids": tokens["input_ids"]}
    with torch.no_grad():
        want_t = F.normalize(ref.get_text_features(**tokens).pooler_output, dim=-1).numpy()
        pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        want_i = F.normalize(ref.get_image_features(pixel_values=pixels).pooler_output, dim=-1).numpy()
    for m in (model, loaded):
        np.testing.assert_allclose(m.embed_texts(TEXTS), want_t, atol=1e-5)
        np.testing.assert_allclose(m.embed_pixels(pixels), want_i, atol=1e-5)
    assert float(loaded.logit_scale) == pytest.approx(float(ref.logit_scale), rel=1e-6)
    if which == "siglip":
        assert float(loaded.logit_bias) == pytest.approx(float(ref.logit_bias), rel=1e-6)


def test_long_queries_are_truncated_with_a_warning(tmp_path, tiny_siglip, caplog):
    model = import_hf(f"hf:{tiny_siglip}", tmp_path / "m")
    long = " ".join(["red circle"] * 40)
    with caplog.at_level("WARNING"):
        v = model.embed_texts([long])
    assert v.shape == (1, model.config.embed_dim)
    assert "truncated" in caplog.text


def test_import_rejects_a_single_tower_model(tmp_path, tiny_text_model, capsys):
    assert main(["model", "import", f"hf:{tiny_text_model}", "--out", str(tmp_path / "m")]) == 2
    assert "not a CLIP-like dual encoder" in capsys.readouterr().err


def test_imported_model_indexes_and_searches_via_cli(tmp_path, tiny_clip, shapes_data, capsys):
    captions, root = shapes_data
    out = tmp_path / "m"
    assert main(["-q", "model", "import", f"hf:{tiny_clip}", "--out", str(out)]) == 0
    assert main(["-q", "index", str(root / "images"), "--model", str(out), "--out", str(tmp_path / "idx"),
                 "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["-q", "search", str(tmp_path / "idx"), "a red circle", "-k", "3", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    img = sorted((root / "images").glob("*.jpg"))[5]
    top = Searcher.open(tmp_path / "idx").search(image=str(img), k=1)[0]
    assert top.path == str(img) and top.score == pytest.approx(1.0, abs=1e-4)
    assert main(["-q", "eval", "--model", str(out), "--captions", str(captions), "--images", str(root),
                 "--json", "--cache-dir", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 120


def test_finetune_from_imported_model(tmp_path, tiny_clip, shapes_data, capsys):
    captions, root = shapes_data
    base = tmp_path / "base"
    import_hf(f"hf:{tiny_clip}", base)
    common = ["--captions", str(captions), "--images", str(root), "--cache-dir", str(tmp_path / "c")]
    assert main(["-q", "train", *common, "--init", str(base), "--out", str(tmp_path / "ft"), "--epochs", "3",
                 "--batch-size", "32", "--workers", "0"]) == 0
    capsys.readouterr()
    hist = (tmp_path / "ft" / "loss_history.csv").read_text().splitlines()[1:]
    losses = [float(line.split(",")[1]) for line in hist]
    assert losses[-1] < losses[0]
    doc = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert doc["model"]["text_trainable"] == "last:2" and doc["model"]["image_trainable"] == "frozen"
    assert (tmp_path / "ft" / "hf" / "config.json").is_file()  # the HF files travel with the folder
    ft = DualEncoder.load(tmp_path / "ft")
    b = DualEncoder.load(base)
    assert not np.allclose(ft.embed_texts(TEXTS), b.embed_texts(TEXTS), atol=1e-4)
    pixels = torch.randn(2, 3, 32, 32)
    np.testing.assert_allclose(ft.embed_pixels(pixels), b.embed_pixels(pixels), atol=1e-5)  # image locked
    for m in (base, tmp_path / "ft"):
        assert main(["-q", "eval", "--model", str(m), *common, "--json"]) == 0
        assert "text_to_image" in json.loads(capsys.readouterr().out)
