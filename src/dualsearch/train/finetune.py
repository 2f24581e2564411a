"""Fine-tuning policy: how a saved model is prepared to be trained further."""
from __future__ import annotations

import logging
import os
from dataclasses import replace

from ..model.dual_encoder import DualEncoder

log = logging.getLogger(__name__)


def load_for_finetuning(folder: str | os.PathLike, image_trainable: str | None = None,
                        text_trainable: str | None = None) -> DualEncoder:
    """A saved model to start training from. A CLIP-like (identity-head) model defaults to a locked
    image tower (its features are cached: LiT, Zhai et al. 2022) and its text tower's last 2
    blocks trained; other models keep their saved settings unless ``*_trainable`` is given
    ("frozen", "all" or "last:N"). Raises ``ModelError`` / ``TowerError``."""
    model = DualEncoder.load(folder)
    if model.config.head == "identity" and not image_trainable and not text_trainable:
        image_trainable, text_trainable = "frozen", "last:2"
        log.info("fine-tuning %s: image tower frozen, last 2 text blocks trained (set --image-trainable / "
                 "--text-trainable to change)", folder)
    image_trainable = image_trainable or model.config.image_trainable
    text_trainable = text_trainable or model.config.text_trainable
    model.config = replace(model.config, image_trainable=image_trainable, text_trainable=text_trainable)
    model.image_tower.set_trainable(image_trainable)
    model.text_tower.set_trainable(text_trainable)
    return model
