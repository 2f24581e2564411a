import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if "DUALSEARCH_CACHE" not in os.environ:  # keep the tests' ONNX exports and features out of ~/.cache
    import atexit
    import tempfile

    os.environ["DUALSEARCH_CACHE"] = tempfile.mkdtemp(prefix="dualsearch-test-cache-")
    # removed when the run ends: CI machines share /tmp, and 400 leftover runs filled a disk
    atexit.register(shutil.rmtree, os.environ["DUALSEARCH_CACHE"], ignore_errors=True)

import pytest

WORDS = ("a an the one two three four small large red green blue yellow purple orange black white circle "
         "circles square squares triangle triangles star stars diamond diamonds hexagon hexagons on in of "
         "and above below over to left right top bottom center corner picture image showing there is are "
         "here scene with shape shapes background gray beige dark pale pink drawn , :").split()


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory):
    """A tiny BERT built from a config + word-piece vocab, saved as a local HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(d)
    import torch

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_vision_model(tmp_path_factory):
    """A tiny ViT built from a config, with its image processor, saved as a local HF folder."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    d = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64)
    ViTModel(cfg).save_pretrained(d)
    ViTImageProcessor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """120 generated images (5 captions each), COCO format."""
    from dualsearch.data.shapes import generate_shapes

    d = tmp_path_factory.mktemp("shapes")
    captions = generate_shapes(d, 120, seed=3, size=64, progress=False)
    return captions, d


@pytest.fixture(scope="session")
def tiny_model_config(tiny_text_model, tiny_vision_model):
    from dualsearch.config import ModelConfig

    return ModelConfig(image_tower=f"hf:{tiny_vision_model}", text_tower=f"hf:{tiny_text_model}",
                       embed_dim=16, head_layers=1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, shapes_data, tiny_model_config):
    """A tiny dual encoder trained for 2 epochs on the generated data (a saved model folder)."""
    from dualsearch.config import TrainConfig
    from dualsearch.data.readers import read_dataset
    from dualsearch.train.fit import fit

    captions, root = shapes_data
    ds = read_dataset(captions, root)
    d = tmp_path_factory.mktemp("tiny-model")
    fit(tiny_model_config, TrainConfig(epochs=2, batch_size=32), ds.records[:100], ds.records[100:], d / "m",
        cache_dir=None, use_cache=False, progress=False, num_workers=0)
    return d / "m"


@pytest.fixture()
def collection(tmp_path, shapes_data):
    """A folder of 24 generated images (8 in a subfolder) and a hidden folder that is skipped."""
    _, root = shapes_data
    col = tmp_path / "col"
    (col / "sub").mkdir(parents=True)
    srcs = sorted((root / "images").glob("*.jpg"))[:24]
    for i, p in enumerate(srcs):
        shutil.copy(p, (col / "sub" if i % 3 == 0 else col) / p.name)
    (col / ".hidden").mkdir()
    shutil.copy(srcs[0], col / ".hidden" / "x.jpg")
    return col
