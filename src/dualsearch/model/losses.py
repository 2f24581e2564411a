"""Contrastive losses as pure functions of embeddings. Shapes: ``image, text: [B, D]``."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned log-scale so the scale stays <= 100


def seed_loss(image: torch.Tensor, text: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """The reference's soft-target loss on unnormalised embeddings.

    logits = text @ image.T / T; targets = softmax((text@text.T + image@image.T) / (2T)) row-wise;
    loss = mean((CE(targets, logits) + CE(targets.T, logits.T)) / 2).
    """
    logits = text @ image.T / temperature
    targets = F.softmax((text @ text.T + image @ image.T) / (2 * temperature), dim=-1)
    captions_loss = -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
    images_loss = -(targets.T * F.log_softmax(logits.T, dim=-1)).sum(-1)
    return ((captions_loss + images_loss) / 2).mean()


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              owner: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on L2-normalised embeddings; ``logit_scale`` is log(1/T), clamped.

    ``owner [M]`` (text ``[M, D]`` against image ``[B, D]``): the image of each caption, for batches
    that hold every caption of their images (multi-positive InfoNCE): text->image is the usual
    cross-entropy against the caption's own image; image->text averages ``-log softmax`` over the
    image's own captions (SupCon's L_out, Khosla et al. 2020). ``owner=None`` means ``arange(B)``
    (one caption per image), where both forms are CLIP's loss."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image @ text.T  # [B, M]
    if owner is None:
        labels = torch.arange(len(image), device=image.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    own = (owner[None, :] == torch.arange(len(image), device=image.device)[:, None]).to(logits.dtype)
    image_to_text = -(F.log_softmax(logits, dim=-1) * own).sum(-1) / own.sum(-1).clamp(min=1)
    return (image_to_text.mean() + F.cross_entropy(logits.T, owner)) / 2


def _blended_ce(logits: torch.Tensor, soft: torch.Tensor | None, soft_weight: float,
                log_weights: torch.Tensor | None) -> torch.Tensor:
    """Row-wise cross-entropy of ``logits [B, B]`` against the diagonal blended with ``soft``
    targets, over a softmax whose off-diagonal terms are re-weighted by ``exp(log_weights)``."""
    if log_weights is not None:
        eye = torch.eye(len(logits), device=logits.device, dtype=torch.bool)
        logits = logits + log_weights.masked_fill(eye, 0.0)
    logp = F.log_softmax(logits, dim=-1)
    target = torch.eye(len(logits), device=logits.device, dtype=logits.dtype)
    if soft is not None:
        target = (1 - soft_weight) * target + soft_weight * soft
    return -(target * logp).sum(-1).mean()


def _hard_negative_weights(logits: torch.Tensor, beta: float) -> torch.Tensor:
    """HN-NCE's log importance weights of the negatives (Radenovic et al., CVPR 2023): ``w_ij =
    (B-1) exp(beta l_ij) / sum_{k!=i} exp(beta l_ik)``, constants to the gradient."""
    eye = torch.eye(len(logits), device=logits.device, dtype=torch.bool)
    z = (beta * logits.detach()).masked_fill(eye, float("-inf"))
    return math.log(max(len(logits) - 1, 1)) + z - torch.logsumexp(z, dim=-1, keepdim=True)


def clip_variant_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                      soft_targets: float = 0.0, hard_negatives: float = 0.0) -> torch.Tensor:
    """:func:`clip_loss` (one caption per image) with two options of issue 15's item 4.

    ``soft_targets`` (weight in [0, 1]): the targets are the diagonal blended with the reference's
    soft targets, ``softmax(scale * (text.text^T + image.image^T) / 2)`` of the unit embeddings
    (the seed recipe's targets, here on unit vectors at the learned scale; constants to the
    gradient). ``hard_negatives`` (beta >= 0): HN-NCE, each negative in a softmax's denominator
    weighted by its :func:`_hard_negative_weights` at ``beta``. Both 0: :func:`clip_loss`."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    logits = scale * image @ text.T
    soft = None
    if soft_targets:
        with torch.no_grad():
            soft = F.softmax(scale * (text @ text.T + image @ image.T) / 2, dim=-1)
    rows = _hard_negative_weights(logits, hard_negatives) if hard_negatives else None
    cols = _hard_negative_weights(logits.T, hard_negatives) if hard_negatives else None
    return (_blended_ce(logits, soft, soft_targets, rows) + _blended_ce(logits.T, soft, soft_targets, cols)) / 2


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, owner: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss: -sum(log sigmoid(z_ij * (s * x_i.y_j + b))) / B, z = +1 for an
    image and its own caption, -1 elsewhere. ``owner [M]``: the image of each caption, when a
    batch holds every caption of its images; None: one caption per image, on the diagonal."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale.exp() * image @ text.T + logit_bias
    if owner is None:
        owner = torch.arange(len(text), device=image.device)
    z = 2 * (owner[None, :] == torch.arange(len(image), device=image.device)[:, None]).to(logits.dtype) - 1
    return -F.logsigmoid(z * logits).sum() / len(image)
