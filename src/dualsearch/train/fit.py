"""Training runs with PyTorch Lightning.

Each side of a pair comes from one of two paths, chosen per tower:
  - cached: the tower is frozen (and, for images, inputs are not augmented) -> its features are
    computed once (and cached on disk), and training runs only its projection head on them;
  - raw: images are decoded / captions tokenised and the tower runs every step (a trainable tower,
    augmentation, or the reference's behaviour, for the speed benchmark).
The run writes a model folder: config.json, model.safetensors, loss_history.csv, loss.png.
"""
from __future__ import annotations

import csv
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ModelConfig, TrainConfig, to_dict
from ..data.images import ImageLoadError, load_image
from ..data.records import ImageCaption
from ..model.dual_encoder import DualEncoder
from .features import default_workers

log = logging.getLogger(__name__)

RECIPES: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # The reference, exactly: soft-target loss, fixed temperature 0.05, unnormalised embeddings,
    # 2 captions per image as separate pairs, one projection layer of 256.
    "seed": (ModelConfig(loss="seed", temperature=0.05, learn_temperature=False, embed_dim=256,
                         head_layers=1, dropout=0.1),
             TrainConfig(recipe="seed", epochs=30, batch_size=256, lr=1e-3, weight_decay=1e-3,
                         plateau_factor=0.2, plateau_patience=3, early_stop_patience=5,
                         captions_per_image=2, pairs="all")),
    # Ours, chosen from held-out measurements (see README, "Choosing the default recipe").
    "default": (ModelConfig(loss="clip", temperature=0.07, learn_temperature=True, embed_dim=256,
                            head_layers=2, dropout=0.1),
                TrainConfig(recipe="default", epochs=60, batch_size=256, lr=1e-3, weight_decay=0.1,
                            plateau_factor=0.2, plateau_patience=3, early_stop_patience=6,
                            captions_per_image=None, pairs="sample")),
}


def recipe(name: str, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """A recipe's configs, with ``overrides`` applied to whichever config has that field."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    mcfg, tcfg = RECIPES[name]
    mf = {k: v for k, v in overrides.items() if v is not None and hasattr(mcfg, k)}
    tf = {k: v for k, v in overrides.items() if v is not None and hasattr(tcfg, k)}
    return replace(mcfg, **mf), replace(tcfg, **tf)


# ============================================================================ datasets
class Pairs(Dataset):
    """(image item, caption item) pairs. Each side is either a cached tower feature (a tensor) or a
    raw input (preprocessed pixels; a caption string, tokenised by the collate), so that a frozen
    tower uses its cache even when the other tower trains.

    ``pairs="all"``: every (image, caption) pair once an epoch (the reference);
    ``pairs="sample"``: one item per image, its caption drawn at random each time (so a batch never
    holds the same image twice); ``fixed=True`` draws caption 0 (for validation)."""

    def __init__(self, records: Sequence[ImageCaption], pairs: str, image_feats: np.ndarray | None = None,
                 text_feats: np.ndarray | None = None, preprocess=None, target_size: int = 224,
                 fixed: bool = False, augment: bool = False):
        self.records = list(records)
        counts = np.array([len(r.captions) for r in self.records])
        self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self.counts = counts
        self.owner = np.repeat(np.arange(len(self.records)), counts)
        self.pairs = pairs
        self.img = torch.from_numpy(image_feats) if image_feats is not None else None
        self.txt = torch.from_numpy(text_feats) if text_feats is not None else None
        self.preprocess = preprocess
        self.target_size = target_size
        self.fixed = fixed
        self.augment = augment

    def __len__(self) -> int:
        return len(self.owner) if self.pairs == "all" else len(self.records)

    def __getitem__(self, k: int):
        if self.pairs == "all":
            i, c = int(self.owner[k]), k
        else:
            i = k
            c = int(self.starts[i]) + (0 if self.fixed else random.randrange(self.counts[i]))
        text = self.txt[c] if self.txt is not None else self.records[i].captions[c - self.starts[i]]
        if self.img is not None:
            return self.img[i], text
        try:
            img = load_image(self.records[i].image, target_size=self.target_size)
        except ImageLoadError:
            return None
        if self.augment:
            img = _augment(img)
        return self.preprocess(img), text


def _augment(img):
    """Light, caption-safe augmentation: random resized crop keeping most of the scene, colour jitter
    of brightness only (colour words in captions must stay true; no flips: captions say left/right)."""
    from PIL import ImageEnhance

    w, h = img.size
    s = random.uniform(0.85, 1.0)
    cw, ch = int(w * s), int(h * s)
    x, y = random.randint(0, w - cw), random.randint(0, h - ch)
    img = img.crop((x, y, x + cw, y + ch))
    return ImageEnhance.Brightness(img).enhance(random.uniform(0.85, 1.15))


class PairCollate:
    """Stacks tensors, tokenises caption strings, drops images that failed to decode."""

    def __init__(self, tokenize):
        self.tokenize = tokenize

    def __call__(self, batch):
        batch = [b for b in batch if b is not None]
        images = torch.stack([b[0] for b in batch])
        texts = [b[1] for b in batch]
        return images, (torch.stack(texts) if isinstance(texts[0], torch.Tensor) else self.tokenize(texts))


# ============================================================================ the module
def _lightning():
    import lightning.pytorch as pl  # imported here: it takes seconds

    # Lightning sets its loggers to INFO on import; keep its tips and banners out of our output
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return pl


def make_module(model: DualEncoder, tcfg: TrainConfig, cached: tuple[bool, bool]):
    pl = _lightning()

    class DualEncoderModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.cached = cached
            self.strict_loading = False

        def on_train_epoch_start(self):
            # heads (and trainable towers) train; frozen towers stay in eval mode (no dropout, fixed BN)
            self.model.train()
            for tower in (self.model.image_tower, self.model.text_tower):
                if tower.is_frozen:
                    tower.eval()

        def _embed(self, batch):
            a, b = batch
            image_cached, text_cached = self.cached
            img = (self.model.image_head(a) if image_cached
                   else self.model.encode_image(a.contiguous(memory_format=torch.channels_last)))
            txt = self.model.text_head(b) if text_cached else self.model.encode_text(b)
            return img, txt

        def training_step(self, batch, _):
            img, txt = self._embed(batch)
            loss = self.model.loss(img, txt)
            self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(img))
            self.log("temperature", 1.0 / self.model.logit_scale.exp(), on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, _):
            img, txt = self._embed(batch)
            self.log("val_loss", self.model.loss(img, txt), on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=len(img))

        def configure_optimizers(self):
            heads, towers, no_decay = [], [], []
            for name, p in self.model.named_parameters():
                if not p.requires_grad:
                    continue
                if name.startswith(("image_tower.", "text_tower.")):
                    towers.append(p)
                elif p.dim() < 2:  # biases, LayerNorm, temperature: no weight decay (as CLIP)
                    no_decay.append(p)
                else:
                    heads.append(p)
            groups = [{"params": heads, "weight_decay": tcfg.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
            if towers:
                groups.append({"params": towers, "lr": tcfg.tower_lr, "weight_decay": tcfg.weight_decay})
            opt = torch.optim.AdamW(groups, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=tcfg.plateau_factor,
                                                               patience=tcfg.plateau_patience)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor}}

        monitor = "val_loss"

        def on_save_checkpoint(self, checkpoint):
            # frozen towers are rebuilt from their spec: keep checkpoints small
            keep = set(self.model._saved_state())
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                        if k.removeprefix("model.") in keep}

    return DualEncoderModule()


def make_history_callback(rows: list[dict]):
    pl = _lightning()

    class History(pl.Callback):
        """One row an epoch: epoch, train_loss, val_loss, lr, temperature, seconds."""

        def on_train_epoch_start(self, trainer, module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            m = trainer.callback_metrics
            rows.append({"epoch": trainer.current_epoch + 1,
                         "train_loss": float(m.get("train_loss", float("nan"))),
                         "val_loss": float(m.get("val_loss", float("nan"))),
                         "lr": trainer.optimizers[0].param_groups[0]["lr"],
                         "temperature": float(m.get("temperature", float("nan"))),
                         "seconds": time.perf_counter() - self.t0})

    return History()


# ============================================================================ the run
@dataclass
class FitResult:
    model: DualEncoder
    folder: Path | None
    history: list[dict]
    best_val_loss: float | None


def build_loaders(model: DualEncoder, tcfg: TrainConfig, train: Sequence[ImageCaption],
                  val: Sequence[ImageCaption], cached: tuple[bool, bool], cache_dir, device: str,
                  num_workers: int | None):
    """DataLoaders; a side whose tower is frozen (and, for images, not augmented) reads features
    computed once through the cache, the other side reads raw inputs."""
    from ..embed import tower_features

    image_cached, text_cached = cached

    def dataset(records, fixed):
        img_f = txt_f = None
        if image_cached or text_cached:
            records, img_f, txt_f, _, _ = tower_features(model, records, cache_dir, device, num_workers,
                                                         images=image_cached, texts=text_cached)
        return Pairs(records, tcfg.pairs, img_f, txt_f, model.image_tower.preprocessor(),
                     model.image_tower.image_size, fixed=fixed, augment=tcfg.augment and not fixed)

    train_ds = dataset(train, False)
    val_ds = dataset(val, True) if val else None
    workers = 0 if image_cached else (default_workers() if num_workers is None else num_workers)
    # no persistent workers: a fresh iterator each epoch draws its seeds as the cached path's
    # does, so both paths see the same batches in every epoch
    kw = {"num_workers": workers, "collate_fn": PairCollate(model.text_tower.tokenize)}
    g = torch.Generator().manual_seed(tcfg.seed)
    train_dl = DataLoader(train_ds, batch_size=tcfg.batch_size, shuffle=True, drop_last=len(train_ds) > tcfg.batch_size,
                          generator=g, **kw)
    val_dl = DataLoader(val_ds, batch_size=tcfg.batch_size, shuffle=False, **kw) if val_ds is not None else None
    return train_dl, val_dl


def fit(mcfg: ModelConfig, tcfg: TrainConfig, train: Sequence[ImageCaption], val: Sequence[ImageCaption],
        out: str | os.PathLike | None, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
        accelerator: str = "auto", devices: int | str = "auto", num_workers: int | None = None,
        init_model: DualEncoder | None = None, progress: bool = True, extra: dict | None = None) -> FitResult:
    """Train a dual encoder and (if ``out``) write its model folder."""
    pl = _lightning()
    pl.seed_everything(tcfg.seed, workers=True, verbose=False)
    if tcfg.captions_per_image:
        train = [ImageCaption(r.image, r.captions[:tcfg.captions_per_image]) for r in train]
        val = [ImageCaption(r.image, r.captions[:tcfg.captions_per_image]) for r in val]
    if not train:
        raise ValueError("no training records")
    model = init_model or DualEncoder(mcfg)
    cached = (use_cache and model.image_tower.is_frozen and not tcfg.augment,
              use_cache and model.text_tower.is_frozen)
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    device = "cuda" if on_gpu else "cpu"
    train_dl, val_dl = build_loaders(model, tcfg, train, val, cached, cache_dir if use_cache else None,
                                     device, num_workers)
    # computing features draws from the global RNG (DataLoader seeds): seed again so that both
    # paths start training from the same random state (same dropout masks, same batches)
    pl.seed_everything(tcfg.seed, workers=True, verbose=False)
    module = make_module(model, tcfg, cached)
    module.monitor = "val_loss" if val_dl is not None else "train_loss"
    history: list[dict] = []
    ckpt_dir = tempfile.mkdtemp(prefix="dualsearch-ckpt-")
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, monitor=module.monitor, mode="min", save_top_k=1)
    callbacks = [checkpoint, make_history_callback(history),
                 pl.callbacks.EarlyStopping(monitor=module.monitor, mode="min", patience=tcfg.early_stop_patience)]
    trainer = pl.Trainer(max_epochs=tcfg.epochs, accelerator=accelerator, devices=devices,
                         precision="bf16-mixed" if on_gpu else "32-true", callbacks=callbacks, logger=False,
                         enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1, deterministic=False)
    t0 = time.perf_counter()
    trainer.fit(module, train_dl, val_dl)
    log.info("trained %d epochs in %.1f s (image %s, text %s)", len(history), time.perf_counter() - t0,
             *("cached features" if c else "tower every step" for c in cached))
    best = checkpoint.best_model_score
    if checkpoint.best_model_path:  # restore the best weights, as EarlyStopping(restore_best_weights)
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state, strict=False)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    model = module.model.cpu().eval()
    folder = None
    if out is not None:
        folder = model.save(out, extra={"train": to_dict(tcfg),
                                        "data": {"train_images": len(train), "val_images": len(val),
                                                 **(extra or {})}})
        model.folder = folder
        write_history(history, folder)
    return FitResult(model, folder, history, float(best) if best is not None else None)


def write_history(history: list[dict], folder: Path) -> None:
    """loss_history.csv and loss.png (train and validation loss per epoch, as the reference plots)."""
    if not history:
        return
    with open(folder / "loss_history.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(epochs, [r["train_loss"] for r in history], marker="o", label="train")
    if any(np.isfinite(r["val_loss"]) for r in history):
        ax.plot(epochs, [r["val_loss"] for r in history], marker="o", label="valid")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png")
    plt.close(fig)
