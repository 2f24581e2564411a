"""Ensembles of projection heads (--ensemble N): members trained with different seeds, their spaces
aligned by orthogonal Procrustes and averaged into one model of the members' dimension."""
import csv
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from dualsearch.cli import main
from dualsearch.config import ModelConfig, TrainConfig
from dualsearch.data.readers import read_dataset
from dualsearch.data.split import split_records
from dualsearch.encode.features import embed_records, tower_features
from dualsearch.errors import Interrupted, UsageError
from dualsearch.model.dual_encoder import DualEncoder, ModelError
from dualsearch.model.ensemble import head_outputs, merge, procrustes
from dualsearch.model.heads import EnsembleHead
from dualsearch.train.fit import ENSEMBLE_SEED_STRIDE, fit


def _parts(shapes_data):
    ds = read_dataset(*shapes_data)
    return split_records(ds.records, {"train": 0.8, "val": 0.2}, seed=0)


def test_procrustes_recovers_a_rotation_and_refuses_bad_shapes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 12)).astype(np.float32)
    q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    r = procrustes(x, x @ q)
    np.testing.assert_allclose(r, q, atol=1e-4)
    np.testing.assert_allclose(r @ r.T, np.eye(12), atol=1e-5)
    with pytest.raises(ModelError, match="one shape"):
        procrustes(x, x[:, :5])


def test_ensemble_trains_members_aligns_them_and_saves_one_model(tmp_path, shapes_data, tiny_model_config):
    parts = _parts(shapes_data)
    tcfg = TrainConfig(epochs=2, batch_size=32, lr=3e-3, seed=7)
    res = fit(replace(tiny_model_config, ensemble=3), tcfg, parts["train"], parts["val"], tmp_path / "m",
              cache_dir=tmp_path / "c", progress=False)
    model = res.model
    assert model.config.ensemble == 3 and isinstance(model.image_head, EnsembleHead)
    rows = list(csv.DictReader(open(tmp_path / "m" / "loss_history.csv")))
    assert [(r["member"], r["epoch"]) for r in rows] == [(m, e) for m in "123" for e in "12"]
    assert (tmp_path / "m" / "loss.png").stat().st_size > 0
    rot = model.image_head.rotations
    torch.testing.assert_close(rot[0], torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(16).expand(3, 16, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.text_head.rotations, rot)

    # member 1 is the single model of the same seed; member 2 the single model of seed + 1000
    single = fit(tiny_model_config, replace(tcfg, seed=7 + ENSEMBLE_SEED_STRIDE), parts["train"], parts["val"],
                 None, cache_dir=tmp_path / "c", progress=False).model
    feats = torch.randn(5, model.text_tower.output_dim)
    with torch.no_grad():
        torch.testing.assert_close(model.text_head.members[1](feats), single.text_head(feats))

    # the rotations line the members' spaces up: aligned outputs agree better than raw ones
    f = torch.from_numpy(tower_features(model, parts["val"], tmp_path / "c", show_progress=False).image)
    with torch.no_grad():
        a = torch.nn.functional.normalize(model.image_head.members[0](f), dim=-1)
        b = torch.nn.functional.normalize(model.image_head.members[1](f), dim=-1)
        aligned, unaligned = (a * (b @ rot[1])).sum(-1).mean(), (a * b).sum(-1).mean()
    assert aligned > unaligned + 0.2, (float(aligned), float(unaligned))

    val = embed_records(model, parts["val"], tmp_path / "c", show_progress=False)
    loaded = DualEncoder.load(tmp_path / "m")
    again = embed_records(loaded, parts["val"], tmp_path / "c", show_progress=False)
    assert again.image_emb.shape == (len(parts["val"]), 16)
    np.testing.assert_allclose(again.image_emb, val.image_emb, atol=1e-5)
    np.testing.assert_allclose(again.text_emb, val.text_emb, atol=1e-5)


def test_merge_of_identical_members_is_the_member(tmp_path, shapes_data, tiny_model_config):
    parts = _parts(shapes_data)
    one = fit(tiny_model_config, TrainConfig(epochs=1, batch_size=32), parts["train"], [], None,
              cache_dir=tmp_path / "c", progress=False).model
    emb = embed_records(one, parts["train"], tmp_path / "c", show_progress=False)
    out = head_outputs(one, np.concatenate([emb.image_emb, emb.text_emb]))
    merged = merge([one, one], [out, out])
    val = embed_records(merged, parts["val"], tmp_path / "c", show_progress=False)
    ref = embed_records(one, parts["val"], tmp_path / "c", show_progress=False)
    np.testing.assert_allclose(val.image_emb, ref.image_emb, atol=1e-5)
    np.testing.assert_allclose(val.text_emb, ref.text_emb, atol=1e-5)
    with pytest.raises(ModelError, match="2 or more members"):
        merge([one], [out])
    with pytest.raises(ModelError, match="share one config"):
        merge([one, merged], [out, out])


def test_fused_prior_head_outputs_are_the_head_part():
    """head_outputs undoes :func:`dualsearch.model.prior.fused`: its first columns are the head's."""
    from dualsearch.model.prior import fused

    class Fake:
        config = ModelConfig(image_prior="conse:5:0.5", embed_dim=8 + 6)
        text_tower = type("T", (), {"output_dim": 6})()

    head, zs = torch.randn(4, 8), torch.randn(4, 6)
    emb = fused(head, zs, 0.5).numpy()
    np.testing.assert_allclose(head_outputs(Fake(), emb), torch.nn.functional.normalize(head, dim=-1).numpy(),
                               atol=1e-6)


def test_ensemble_refuses_what_it_cannot_train(tmp_path, shapes_data, tiny_model_config, tiny_model, capsys):
    parts = _parts(shapes_data)
    with pytest.raises(UsageError, match="frozen towers"):
        fit(replace(tiny_model_config, ensemble=2, text_trainable="last:1"), TrainConfig(epochs=1),
            parts["train"], [], None, progress=False)
    captions, root = shapes_data
    base = ["train", "--captions", str(captions), "--images", str(root), "--out", str(tmp_path / "m")]
    with pytest.raises(SystemExit) as e:
        main(base + ["--ensemble", "0"])
    assert e.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    assert main(base + ["--ensemble", "2", "--init", str(tiny_model)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dualsearch: error: --ensemble trains new heads: it does not go with --init (fine-tuning one "
                   "model)"], err
    assert not (tmp_path / "m").exists()


def test_interrupted_ensemble_keeps_the_members_so_far(tmp_path, shapes_data, tiny_model_config, monkeypatch):
    """Ctrl-C in member 2 of 3: member 1 and member 2's best epoch are merged and written."""
    import dualsearch.train.fit as fit_module

    calls = {"n": 0}
    real = fit_module._train

    def second_member_stops(module, tcfg, *args, **kwargs):
        calls["n"] += 1
        outcome = real(module, tcfg, *args, **kwargs)
        if calls["n"] == 2:
            outcome.stopped_in = outcome.best_epoch + 1
        return outcome

    monkeypatch.setattr(fit_module, "_train", second_member_stops)
    parts = _parts(shapes_data)
    with pytest.raises(Interrupted, match="stopped in ensemble member 2 of 3; the 2 members trained so far "
                                          "\\(the last at its best epoch\\) were merged and written to") as e:
        fit(replace(tiny_model_config, ensemble=3), TrainConfig(epochs=1, batch_size=32), parts["train"],
            parts["val"], tmp_path / "m", cache_dir=tmp_path / "c", progress=False)
    assert calls["n"] == 2
    loaded = DualEncoder.load(tmp_path / "m")
    assert loaded.config.ensemble == 2 and e.value.result.model.config.ensemble == 2


def test_ctrl_c_before_a_member_trains_or_while_merging_keeps_trained_members(tmp_path, shapes_data,
                                                                               tiny_model_config, monkeypatch):
    """A Ctrl-C that reaches the ensemble outside Lightning (member 2 still reading its features, or
    the final merge) writes what was trained, in one line, instead of losing it."""
    import dualsearch.train.fit as fit_module

    parts, calls = _parts(shapes_data), {"n": 0}
    real = fit_module.build_loaders

    def second_member_ctrl_c(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "build_loaders", second_member_ctrl_c)
    cfg, tcfg = replace(tiny_model_config, ensemble=3), TrainConfig(epochs=1, batch_size=32)
    with pytest.raises(Interrupted, match="^stopped in ensemble member 2 of 3; the member trained so far was "
                                          "written to"):
        fit(cfg, tcfg, parts["train"], parts["val"], tmp_path / "a", cache_dir=tmp_path / "c", progress=False)
    assert DualEncoder.load(tmp_path / "a").config.ensemble == 1

    monkeypatch.setattr(fit_module, "build_loaders", real)
    monkeypatch.setattr(fit_module, "_merged", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(Interrupted, match="^stopped while merging the 3 members; member 1 alone of the 3 trained "
                                          "\\(merging was stopped\\) was written to"):
        fit(cfg, tcfg, parts["train"], parts["val"], tmp_path / "b", cache_dir=tmp_path / "c", progress=False)
    assert DualEncoder.load(tmp_path / "b").config.ensemble == 1


@pytest.mark.parametrize("size", [2.0, "2", True, 0, 17])
def test_ensemble_size_is_a_whole_number_in_range(size, shapes_data, tiny_model_config):
    parts = _parts(shapes_data)
    with pytest.raises(UsageError, match="--ensemble must be a whole number from 1 to 16, got"):
        fit(replace(tiny_model_config, ensemble=size), TrainConfig(epochs=1), parts["train"], [], None,
            progress=False)
    with pytest.raises(ModelError, match="ensemble must be a whole number of heads per side from 1 to 16"):
        DualEncoder(replace(tiny_model_config, ensemble=size))


def test_cli_trains_an_ensemble_and_indexes_with_it(tmp_path, shapes_data, tiny_text_model, tiny_vision_model):
    """The command line: --ensemble 2 trains, writes one model, and an index built with it searches
    (the ONNX encoders export and verify the ensemble's heads, and the image encoder quantises to INT8)."""
    captions, root = shapes_data
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "dualsearch.cli", "train", "--captions", str(captions), "--images", str(root),
           "--out", str(out), "--image-tower", f"hf:{tiny_vision_model}", "--text-tower", f"hf:{tiny_text_model}",
           "--embed-dim", "16", "--epochs", "2", "--batch-size", "32", "--workers", "0", "--ensemble", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 2 members, 4 epochs in all" in done.stdout
    tuned = tmp_path / "ft"  # fine-tuning the ensemble trains its heads together, as one model
    done = subprocess.run(cmd[:cmd.index("--out")] + ["--out", str(tuned), "--init", str(out), "--epochs", "1",
                                                      "--batch-size", "32", "--workers", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 1 epochs (" in done.stdout and DualEncoder.load(tuned).config.ensemble == 2
    index = tmp_path / "i"
    done = subprocess.run([sys.executable, "-m", "dualsearch.cli", "index", str(root), "--model", str(out),
                           "--out", str(index), "--workers", "1", "--precision", "int8"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    done = subprocess.run([sys.executable, "-m", "dualsearch.cli", "search", str(index), "a red circle", "-k", "3",
                           "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("/") >= 3
