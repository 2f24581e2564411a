"""The dual encoder: two towers, two projection heads, one embedding space.

A model folder holds ``config.json`` (everything needed to rebuild it) and ``model.safetensors``
(heads, temperature, and the weights of any tower that was trained). Frozen pretrained towers are
rebuilt from their spec; their fingerprints are recorded so that a changed tower is detected.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import MAX_ENSEMBLE, ModelConfig, from_dict, to_dict
from ..storage import atomic_path, write_text
from .folder import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, ModelError, read_model_config
from .heads import EnsembleHead, ProjectionHead
from .losses import clip_loss, clip_variant_loss, seed_loss, siglip_loss
from .prior import CLASSES, FusedTextHead, PriorHead, class_text_embeddings, parse_prior
from .towers import ImageTower, TextTower, build_image_tower, build_text_tower

log = logging.getLogger(__name__)

class DualEncoder(nn.Module):
    """``encode_image(pixels [B,3,H,W]) -> [B,D]``, ``encode_text(tokens) -> [B,D]``."""

    def __init__(self, config: ModelConfig, image_tower: ImageTower | None = None,
                 text_tower: TextTower | None = None, folder: str | os.PathLike | None = None,
                 fill_prior: bool = True):
        super().__init__()
        self.config = config
        self.image_tower = image_tower or build_image_tower(resolve_spec(config.image_tower, folder))
        self.text_tower = text_tower or build_text_tower(resolve_spec(config.text_tower, folder), config.text_pooling,
                                                         config.max_text_length)
        self.image_tower.set_trainable(config.image_trainable)
        self.text_tower.set_trainable(config.text_trainable)
        d = config.embed_dim
        n = config.ensemble
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_ENSEMBLE:
            raise ModelError(f"ensemble must be a whole number of heads per side from 1 to {MAX_ENSEMBLE}, got {n!r}")
        if n > 1 and config.head != "projection":
            raise ModelError(f"an ensemble averages projection heads: not with head {config.head!r}")
        if config.head == "identity":  # CLIP-like towers already end in their projection
            for tower in (self.image_tower, self.text_tower):
                if tower.output_dim != d:
                    raise ModelError(f"head 'identity' needs towers of dimension {d}; {tower.spec} gives "
                                     f"{tower.output_dim}")
            self.image_head, self.text_head = nn.Identity(), nn.Identity()
        elif config.head == "projection":
            self.image_head, self.text_head = self._heads(config, fill_prior)
        else:
            raise ModelError(f"unknown head {config.head!r}: use projection or identity")
        init_scale = math.log(1.0 / config.temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init_scale), requires_grad=config.learn_temperature)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0 if config.loss == "siglip" else 0.0),
                                       requires_grad=config.loss == "siglip")

    def _heads(self, config: ModelConfig, fill_prior: bool) -> tuple[nn.Module, nn.Module]:
        """The projection heads; with ``config.image_prior`` the image head sits behind a
        :class:`PriorHead` (its buffers filled from the tower and the class names, or left for a
        saved model's weights when not ``fill_prior``), and a fused prior keeps the text tower's
        feature beside the text head's output: the heads then project to ``embed_dim`` minus the
        text tower's dimension."""
        top, weight = parse_prior(config.image_prior)
        dim, text_dim = self.image_tower.output_dim, self.text_tower.output_dim
        d = config.embed_dim - (text_dim if weight else 0)
        if d < 1:
            raise ModelError(f"the image prior {config.image_prior!r} keeps the text tower's {text_dim} dimensions "
                             f"beside the heads': embed_dim must be over {text_dim}, got {config.embed_dim}")
        text_head = projection_head(text_dim, d, config)
        if not top:
            return projection_head(dim, d, config), text_head
        if fill_prior:
            w, b = self.image_tower.imagenet_classifier()
            names = class_text_embeddings(self.text_tower)
        else:
            w, b, names = torch.zeros(CLASSES, dim), torch.zeros(CLASSES), torch.ones(CLASSES, text_dim)
        head = projection_head(dim + text_dim, d, config)
        return (PriorHead(head, w, b, names, top, weight),
                FusedTextHead(text_head, weight) if weight else text_head)

    # ------------------------------------------------------------------ encoding
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_tower(pixels))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text_head(self.text_tower(tokens))

    def loss(self, image_emb: torch.Tensor, text_emb: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
        """The configured loss of image ``[B, D]`` and text ``[M, D]`` embeddings; ``owner [M]``: the
        image of each caption when a batch holds all captions of its images (``--pairs grouped``;
        multi-positive), else None (``M == B``, pairs on the diagonal)."""
        if self.config.loss == "seed":
            if owner is not None:
                raise ModelError("the seed loss takes one caption per image in a batch: use --pairs all or sample")
            return seed_loss(image_emb, text_emb, self.config.temperature)
        if self.config.loss == "clip":
            if self.config.soft_targets or self.config.hard_negatives:
                if owner is not None:
                    raise ModelError("--soft-targets and --hard-negatives take one caption per image: not with "
                                     "--pairs grouped")
                return clip_variant_loss(image_emb, text_emb, self.logit_scale, self.config.soft_targets,
                                         self.config.hard_negatives)
            return clip_loss(image_emb, text_emb, self.logit_scale, owner)
        if self.config.loss == "siglip":
            return siglip_loss(image_emb, text_emb, self.logit_scale, self.logit_bias, owner)
        raise ModelError(f"unknown loss {self.config.loss!r}: use seed, clip or siglip")

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Strings -> L2-normalised float32 embeddings ``[N, D]``."""
        self.eval()
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.text_tower.tokenize(list(texts[i:i + batch_size]))
            tokens = {k: v.to(self.device) for k, v in tokens.items()}
            out.append(F.normalize(self.encode_text(tokens).float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed pixels ``[B,3,S,S]`` -> L2-normalised float32 embeddings ``[B, D]``."""
        self.eval()
        pixels = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
        return F.normalize(self.encode_image(pixels).float(), dim=-1).cpu().numpy()

    def embed_images(self, images: Iterable, batch_size: int = 64) -> np.ndarray:
        """PIL images -> L2-normalised embeddings ``[N, D]``."""
        batch, out = [], []
        for img in images:
            batch.append(self.image_tower.preprocess(img))
            if len(batch) == batch_size:
                out.append(self.embed_pixels(torch.stack(batch)))
                batch = []
        if batch:
            out.append(self.embed_pixels(torch.stack(batch)))
        return np.concatenate(out) if out else np.zeros((0, self.config.embed_dim), np.float32)

    # ------------------------------------------------------------------ persistence
    def _saved_state(self) -> dict[str, torch.Tensor]:
        """Heads and temperature always; a tower's weights only when it was trained."""
        keep = ["image_head.", "text_head.", "logit_scale", "logit_bias"]
        if self.config.image_trainable != "frozen":
            keep.append("image_tower.")
        if self.config.text_trainable != "frozen":
            keep.append("text_tower.")
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()
                if any(k.startswith(p) for p in keep)}

    def save(self, folder: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the model folder atomically (temp files renamed into place)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._carry_local_towers(folder)
        doc = {"format_version": FORMAT_VERSION, "model": to_dict(self.config),
               "fingerprints": {"image_tower": self.image_tower.fingerprint()
                                if self.config.image_trainable == "frozen" else None,
                                "text_tower": self.text_tower.fingerprint()
                                if self.config.text_trainable == "frozen" else None},
               **(extra or {})}
        state = self._saved_state()
        # tied or shared tensors must be cloned for safetensors
        state = {k: v.clone() for k, v in state.items()}
        with atomic_path(folder / WEIGHTS_FILE) as tmp_weights:
            save_file(state, str(tmp_weights))
        write_text(folder / CONFIG_FILE, json.dumps(doc, indent=2, sort_keys=True))
        return folder

    def _carry_local_towers(self, folder: Path) -> None:
        """A tower spec ``hf:./sub`` lives inside the model folder: copy it along to a new folder."""
        source = getattr(self, "folder", None)
        for spec in {self.config.image_tower, self.config.text_tower}:
            if spec.startswith("hf:./") and source is not None:
                src, dst = Path(source) / spec[5:], folder / spec[5:]
                if src.resolve() != dst.resolve() and not dst.exists():
                    shutil.copytree(src, dst)

    @classmethod
    def load(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
             verify_towers: bool = False) -> "DualEncoder":
        """Rebuild a saved model; ``verify_towers`` checks frozen towers against their fingerprints."""
        from safetensors.torch import load_file

        folder = Path(folder)
        doc = read_model_config(folder)
        config = from_dict(ModelConfig, doc["model"])
        model = cls(config, folder=folder, fill_prior=False)
        try:
            state = load_file(str(folder / WEIGHTS_FILE))
        except (OSError, Exception) as e:  # safetensors raises its own error type
            raise ModelError(f"{folder / WEIGHTS_FILE}: cannot read weights ({e})") from e
        missing, unexpected = model.load_state_dict(state, strict=False)
        needed = [k for k in missing if k in model._saved_state()]
        if needed or unexpected:
            raise ModelError(f"{folder}: weights do not match the config (missing {needed[:3]}, "
                             f"unexpected {unexpected[:3]})")
        if verify_towers:
            for name in ("image_tower", "text_tower"):
                want = doc.get("fingerprints", {}).get(name)
                got = getattr(model, name).fingerprint()
                if want and want != got:
                    raise ModelError(f"{folder}: the {name.replace('_', ' ')} {getattr(config, name)!r} "
                                     f"is not the one this model was trained with")
        model.folder = folder
        return model.to(device).eval()


def projection_head(in_dim: int, dim: int, config: ModelConfig) -> nn.Module:
    """One side's projection head ``[B, in_dim] -> [B, dim]``, or with ``config.ensemble`` N > 1 an
    :class:`EnsembleHead` of N of them (their rotations set by :func:`dualsearch.model.ensemble.merge`)."""
    heads = [ProjectionHead(in_dim, dim, config.head_layers, config.dropout) for _ in range(config.ensemble)]
    return heads[0] if len(heads) == 1 else EnsembleHead(heads, dim)


def resolve_spec(spec: str, folder: str | os.PathLike | None) -> str:
    """``hf:./sub`` names a folder inside the model folder (an imported model travels with it)."""
    if spec.startswith("hf:./") and folder is not None:
        return "hf:" + str((Path(folder) / spec[5:]).resolve())
    return spec

