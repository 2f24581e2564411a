"""The training recipes: the reference's ("seed") and ours ("default"). Light to import (no torch,
no Lightning), so that the command line checks options before anything heavy loads."""
from __future__ import annotations

from dataclasses import replace

from ..config import ModelConfig, TrainConfig
from ..errors import ConfigError

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
    """A recipe's configs, with ``overrides`` (None values ignored) applied to whichever config has
    that field. Raises :class:`~dualsearch.errors.ConfigError` for an unknown name."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    mcfg, tcfg = RECIPES[name]
    mf = {k: v for k, v in overrides.items() if v is not None and hasattr(mcfg, k)}
    tf = {k: v for k, v in overrides.items() if v is not None and hasattr(tcfg, k)}
    return replace(mcfg, **mf), replace(tcfg, **tf)
