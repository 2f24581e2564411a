"""The Lightning module that trains a dual encoder, and the per-epoch history and progress callbacks."""
from __future__ import annotations

import logging
import math
import time

import lightning.pytorch as pl
import torch

from ..config import TrainConfig
from ..errors import DualsearchError
from ..logs import on_terminal, progress, quiet_libraries, say
from ..model.dual_encoder import DualEncoder
from .pairs import Side

# Lightning sets its loggers to INFO on import; keep its tips and banners out of our output
if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
    quiet_libraries()


class TrainingError(DualsearchError):
    """Training that cannot go on: the loss, a weight or the temperature stopped being finite
    (the run diverged)."""


class DualEncoderModule(pl.LightningModule):
    """Trains ``model`` on batches of (image side, text side), each as its :class:`Side` says: a
    cached tower feature ``[B, F]`` (``features``: only its head runs), cached activations at the
    tower's cut point (``activations``: images ``[B,C,H,W]``, captions (``[B,L,D]``, mask ``[B,L]``),
    float16; the tower's blocks from the cut on, its pooling and its head run) or raw input
    (pixels ``[B,3,S,S]`` / token dicts: the tower runs every step). The loss is the model's own
    (seed, CLIP or SigLIP); the learning rate falls on plateaus of ``monitor`` ("val_loss", or
    "train_loss" without validation)."""

    def __init__(self, model: DualEncoder, tcfg: TrainConfig, sides: tuple[Side, Side], monitor: str = "val_loss"):
        super().__init__()
        self.model = model
        self.tcfg = tcfg
        self.sides = sides
        self.monitor = monitor
        self.strict_loading = False

    def on_train_epoch_start(self):
        # heads and trainable blocks train; frozen towers and blocks stay in eval mode (no dropout, fixed BN)
        self.model.train()
        for tower in (self.model.image_tower, self.model.text_tower):
            tower.train_parts()

    def _embed(self, batch):
        a, b = batch[:2]
        image, text = self.sides
        m = self.model
        if image.kind == "activations":
            img = m.image_head(m.image_tower.forward_from(image.cut, a.float()))
        else:
            img = m.image_head(a) if image.kind == "features" else m.encode_image(
                a.contiguous(memory_format=torch.channels_last))
        if text.kind == "activations":
            txt = m.text_head(m.text_tower.forward_from(text.cut, (b[0].float(), b[1])))
        else:
            txt = m.text_head(b) if text.kind == "features" else m.encode_text(b)
        return img, txt

    def diverged(self, what: str) -> TrainingError:
        """The error that stops a diverging run: names the (1-based) epoch and suggests a lower lr."""
        return TrainingError(f"training diverged in epoch {self.current_epoch + 1}: {what}; try a lower "
                             f"learning rate (--lr, now {self.tcfg.lr:g})")

    def check_finite(self) -> None:
        """Raise :class:`TrainingError` if a trainable weight holds NaN/inf, or if the temperature
        ``1 / exp(logit_scale)`` is not a finite positive number (the logit scale itself included)."""
        scale = self.model.logit_scale.detach().float()
        temperature = torch.exp(-scale)
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        flags = torch.stack([torch.isfinite(p.detach()).all() for _, p in params]
                            + [torch.isfinite(temperature) & (temperature > 0)])
        if bool(flags.all()):
            return
        bad = [n for (n, _), ok in zip(params, flags[:-1].tolist()) if not ok]
        if bad:
            raise self.diverged(f"{len(bad)} weight tensors hold NaN or inf (first: {bad[0]})")
        raise self.diverged(f"the temperature is {temperature.item():g} (logit scale {scale.item():g})")

    def training_step(self, batch, _):
        if batch is None:  # every image of the batch failed to decode
            return None
        img, txt = self._embed(batch)
        loss = self.model.loss(img, txt, _owner(batch))
        if not bool(torch.isfinite(loss.detach())):
            raise self.diverged(f"the loss is {loss.item()}")
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(img))
        self.log("temperature", 1.0 / self.model.logit_scale.exp(), on_step=False, on_epoch=True, batch_size=len(img))
        return loss

    def on_train_start(self):
        self.check_finite()  # a starting model (--init) with broken weights

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # after the optimizer step: an epoch whose weights end non-finite never reaches a checkpoint
        self.check_finite()

    def validation_step(self, batch, _):
        if batch is None:
            return
        img, txt = self._embed(batch)
        self.log("val_loss", self.model.loss(img, txt, _owner(batch)), on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=len(img))

    def configure_optimizers(self):
        """AdamW: heads with weight decay; biases, norms and the logit scale without (as CLIP);
        trainable tower parameters at ``tower_lr``. ReduceLROnPlateau on the monitored loss."""
        heads, towers, no_decay = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith(("image_tower.", "text_tower.")):
                towers.append(p)
            elif p.dim() < 2:
                no_decay.append(p)
            else:
                heads.append(p)
        t = self.tcfg
        groups = [{"params": heads, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        if towers:
            groups.append({"params": towers, "lr": t.tower_lr, "weight_decay": t.weight_decay})
        opt = torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=t.plateau_factor,
                                                           patience=t.plateau_patience)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor}}

    def on_save_checkpoint(self, checkpoint):
        # frozen towers are rebuilt from their spec: keep checkpoints small
        keep = set(self.model._saved_state())
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.removeprefix("model.") in keep}


def _owner(batch):
    """The image of each caption in a grouped batch (``pairs="grouped"``), else None."""
    return batch[2] if len(batch) == 3 else None


class History(pl.Callback):
    """Appends one row an epoch to ``rows``: epoch, train_loss, val_loss, lr, temperature, seconds."""

    def __init__(self, rows: list[dict]):
        self.rows = rows
        self.t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, module):
        self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        m = trainer.callback_metrics
        self.rows.append({"epoch": trainer.current_epoch + 1,
                          "train_loss": float(m.get("train_loss", float("nan"))),
                          "val_loss": float(m.get("val_loss", float("nan"))),
                          "lr": trainer.optimizers[0].param_groups[0]["lr"],
                          "temperature": float(m.get("temperature", float("nan"))),
                          "seconds": time.perf_counter() - self.t0})


def epoch_line(row: dict, epochs: int) -> str:
    """``epoch 3/60: train loss 1.2345, val loss 1.4567 (2.1 s)`` (no val part without validation)."""
    val = f", val loss {row['val_loss']:.4f}" if math.isfinite(row["val_loss"]) else ""
    return f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}{val} ({row['seconds']:.1f} s)"


class EpochProgress(pl.Callback):
    """Training progress, from the rows :class:`History` appends (list it after History): on a
    terminal a tqdm bar over epochs with the last losses as postfix, elsewhere one line per
    epoch (:func:`epoch_line`) on stderr; nothing when not ``enabled``. Epochs are 1-based, as in
    ``loss_history.csv``."""

    def __init__(self, rows: list[dict], epochs: int, enabled: bool = True):
        self.rows, self.epochs = rows, epochs
        self.enabled = enabled
        self.bar = None

    def on_train_start(self, trainer, module):
        if self.enabled and on_terminal():
            self.bar = progress(self.epochs, "training", "epoch", "epochs")

    def on_train_epoch_end(self, trainer, module):
        if not self.enabled or not self.rows:
            return
        row = self.rows[-1]
        if self.bar is None:
            say(epoch_line(row, self.epochs))
            return
        val = f", val {row['val_loss']:.4f}" if math.isfinite(row["val_loss"]) else ""
        self.bar.set_postfix_str(f"train {row['train_loss']:.4f}{val}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        """Leave the bar as it is (early stopping ends before the last epoch)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_end(self, trainer, module):
        self.close()

    def on_exception(self, trainer, module, exception):
        self.close()
