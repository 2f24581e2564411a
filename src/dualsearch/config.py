"""Small frozen dataclasses saved with every model and index (as JSON)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a dual encoder."""

    image_tower: str = "efficientnet-lite0"
    text_tower: str = "minilm-l6"
    text_pooling: str = "auto"
    max_text_length: int = 64
    embed_dim: int = 256
    head: str = "projection"  # projection (the reference's heads) | identity (towers already project: CLIP)
    head_layers: int = 1
    dropout: float = 0.1
    loss: str = "clip"  # seed (soft targets, fixed temperature) | clip (InfoNCE) | siglip
    temperature: float = 0.05  # fixed (seed) or initial (clip, siglip) temperature
    learn_temperature: bool = True
    image_prior: str = "none"  # none | conse:T (ImageNet class names in text space, top T; model/prior.py)
    image_trainable: str = "frozen"  # frozen | all | last:N
    text_trainable: str = "frozen"
    soft_targets: float = 0.0  # clip loss: weight of the reference's soft targets blended into the diagonal
    hard_negatives: float = 0.0  # clip loss: HN-NCE's beta (0: plain InfoNCE)
    ensemble: int = 1  # projection heads per side (1..MAX_ENSEMBLE), trained with different seeds and averaged

    @property
    def normalize(self) -> bool:
        """Embeddings are L2-normalised inside the loss (CLIP, SigLIP), not in the seed recipe."""
        return self.loss != "seed"


MAX_ENSEMBLE = 16  # heads per side in one model (--ensemble)


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained."""

    recipe: str = "default"
    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-3
    plateau_factor: float = 0.2
    plateau_patience: int = 3
    early_stop_patience: int = 5
    captions_per_image: int | None = None  # None: all
    pairs: str = "sample"  # all: every (image, caption) pair each epoch; sample: one caption per image;
    # grouped: each image with all its captions in one batch (multi-positive InfoNCE)
    val_fraction: float = 0.1
    seed: int = 0
    augment: bool = False
    tower_lr: float = 1e-5
    topic_batches: bool = False  # each batch from one k-means cluster of captions (mined hard negatives; TAS)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def from_dict(cls, data: dict):
    """Build a dataclass from a dict, ignoring unknown keys (forward compatibility)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def dumps(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=2, sort_keys=True)
