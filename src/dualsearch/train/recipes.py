"""The training recipes: the reference's ("seed") and ours ("default"). Light to import (no torch,
no Lightning), so that the command line checks options before anything heavy loads."""
from __future__ import annotations

from dataclasses import replace

from ..config import MAX_ENSEMBLE, ModelConfig, TrainConfig
from ..errors import ConfigError, UsageError

MINILM_DIM = 384  # minilm-l6's features, kept beside the heads' output by a fused prior ("conse:T:W")

RECIPES: dict[str, tuple[ModelConfig, TrainConfig]] = {
    # The reference, exactly: soft-target loss, fixed temperature 0.05, unnormalised embeddings,
    # 2 captions per image as separate pairs, one projection layer of 256.
    "seed": (ModelConfig(loss="seed", temperature=0.05, learn_temperature=False, embed_dim=256,
                         head_layers=1, dropout=0.1),
             TrainConfig(recipe="seed", epochs=30, batch_size=256, lr=1e-3, weight_decay=1e-3,
                         plateau_factor=0.2, plateau_patience=3, early_stop_patience=5,
                         captions_per_image=2, pairs="all")),
    # The textbook CLIP recipe (the default until the conse prior): InfoNCE on unit vectors, learned
    # temperature, every caption, 2 head layers, weight decay 0.1.
    "clip": (ModelConfig(loss="clip", temperature=0.07, learn_temperature=True, embed_dim=256,
                         head_layers=2, dropout=0.1),
             TrainConfig(recipe="clip", epochs=60, batch_size=256, lr=1e-3, weight_decay=0.1,
                         plateau_factor=0.2, plateau_patience=3, early_stop_patience=6,
                         captions_per_image=None, pairs="sample")),
}
# Ours, chosen from held-out measurements on real sets (see README, "Choosing the default recipe"):
# "clip" plus the ConSE prior (the image tower's ImageNet top-20 classes as text features), as an
# input of the image head and as a zero-shot similarity added with weight 0.5 (the embeddings keep
# MiniLM's 384 dimensions beside the heads' 256).
# An ensemble of 3 heads per side (seeds s, s + 1000, s + 2000), aligned and averaged (model/ensemble.py):
# 3x the training, the same embedding.
RECIPES["default"] = (replace(RECIPES["clip"][0], image_prior="conse:20:0.5", embed_dim=256 + MINILM_DIM,
                              ensemble=3),
                      replace(RECIPES["clip"][1], recipe="default"))


def _prior_fits(mcfg: ModelConfig, overrides: dict) -> ModelConfig:
    """The conse prior needs an EfficientNet-Lite tower (its ImageNet classifier) and, fused, the
    minilm-l6 text tower: with other towers the recipe drops it (the "clip" settings). A fused
    prior's ``embed_dim`` override is the heads' dimension (MiniLM's 384 are added)."""
    if mcfg.image_prior == "none":
        return mcfg
    fused = mcfg.image_prior.count(":") == 2
    if not mcfg.image_tower.startswith("efficientnet-lite") or (fused and mcfg.text_tower != "minilm-l6"):
        return replace(mcfg, image_prior="none", embed_dim=overrides.get("embed_dim") or RECIPES["clip"][0].embed_dim)
    if fused and overrides.get("embed_dim"):
        return replace(mcfg, embed_dim=overrides["embed_dim"] + MINILM_DIM)
    return mcfg


def recipe(name: str, **overrides) -> tuple[ModelConfig, TrainConfig]:
    """A recipe's configs, with ``overrides`` (None values ignored) applied to whichever config has
    that field (an image prior is dropped with towers it does not fit: :func:`_prior_fits`; the
    recipe's ensemble, unless asked for, with a trainable tower: :func:`check_ensemble`).
    Raises :class:`~dualsearch.errors.ConfigError` for an unknown name."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    mcfg, tcfg = RECIPES[name]
    mf = {k: v for k, v in overrides.items() if v is not None and hasattr(mcfg, k)}
    tf = {k: v for k, v in overrides.items() if v is not None and hasattr(tcfg, k)}
    mcfg = _prior_fits(replace(mcfg, **mf), mf)
    trains_a_tower = mcfg.image_trainable != "frozen" or mcfg.text_trainable != "frozen"
    if trains_a_tower and "ensemble" not in mf:
        mcfg = replace(mcfg, ensemble=1)  # a recipe's ensemble shares frozen towers: one model trains a tower
    return mcfg, replace(tcfg, **tf)


def check_ensemble(mcfg: ModelConfig, fine_tuning: bool) -> None:
    """An ensemble (``mcfg.ensemble`` > 1) trains new heads on frozen towers, its members sharing
    one copy of each tower: raises :class:`~dualsearch.errors.UsageError` for a size that is not a
    whole number from 1 to ``MAX_ENSEMBLE``, and for more than one head with ``fine_tuning`` (an
    existing model) or a trainable tower."""
    n = mcfg.ensemble
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_ENSEMBLE:
        raise UsageError(f"--ensemble must be a whole number from 1 to {MAX_ENSEMBLE}, got {n!r}")
    if n == 1:
        return
    if fine_tuning:
        raise UsageError("--ensemble trains new heads: it does not go with --init (fine-tuning one model)")
    if mcfg.image_trainable != "frozen" or mcfg.text_trainable != "frozen":
        raise UsageError("--ensemble trains heads on frozen towers (its members share each tower): not with "
                         "--image-trainable or --text-trainable")
