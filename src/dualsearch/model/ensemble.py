"""Ensembles of projection heads: N models trained apart on the same frozen towers, merged into
one model whose heads average the members' aligned outputs (:class:`~.heads.EnsembleHead`).

Members trained from different random initialisations agree on which images and captions are
close, but each expresses it in its own coordinates: their spaces differ by (nearly) an orthogonal
map. :func:`procrustes` finds that map from the members' outputs on the training pairs, and
:func:`merge` averages the rotated outputs. In a probe (BENCHMARKS.md, "Ensemble of heads") the
aligned average matched concatenating the members' embeddings (the exact average of their
similarities) while keeping one member's dimension; ``bench/quality.py`` measures the default's
3 heads against one.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .dual_encoder import DualEncoder
from .folder import ModelError
from .heads import EnsembleHead
from .prior import parse_prior


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The orthogonal ``R [D, D]`` minimising ``||source @ R - target||_F`` for ``source, target
    [N, D]`` (orthogonal Procrustes, Schönemann 1966: ``R = U V^T`` from the SVD ``U S V^T`` of
    ``source^T target``). Raises :class:`ModelError` when the shapes differ."""
    if source.shape != target.shape or source.ndim != 2:
        raise ModelError(f"procrustes needs two [N, D] arrays of one shape, got {source.shape} and {target.shape}")
    u, _, vt = np.linalg.svd(source.astype(np.float64).T @ target.astype(np.float64))
    return (u @ vt).astype(np.float32)


def head_dim(model: DualEncoder) -> int:
    """The dimension of the projection heads' output: ``embed_dim``, less the text tower's features
    that a fused prior (``conse:T:W``) keeps beside it."""
    weight = parse_prior(model.config.image_prior)[1] if model.config.head == "projection" else 0.0
    return model.config.embed_dim - (model.text_tower.output_dim if weight else 0)


def head_outputs(model: DualEncoder, embeddings: np.ndarray) -> np.ndarray:
    """The unit head outputs ``[N, head_dim]`` inside a model's unit embeddings ``[N, embed_dim]``:
    a fused prior's embedding is ``[unit(head), sqrt(W) unit(zero-shot)] / sqrt(1 + W)``
    (:func:`dualsearch.model.prior.fused`), so its first ``head_dim`` columns, rescaled to unit
    length, are the head's output; without one the embedding is the head's output."""
    part = np.asarray(embeddings, np.float32)[:, :head_dim(model)]
    return part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


def _projection(head: nn.Module) -> nn.Module:
    """A side's trainable projection: the head itself, or the one inside a prior or fused head."""
    return head.head if hasattr(head, "head") else head


def merge(members: Sequence[DualEncoder], outputs: Sequence[np.ndarray]) -> DualEncoder:
    """One model from ``members`` (N >= 2 single-head models of one config, same towers): its heads
    are :class:`EnsembleHead`\\ s of the members' heads, rotated onto the first member's space by
    :func:`procrustes` over ``outputs[i]`` (member i's unit head outputs ``[M, head_dim]`` on the
    same M training images and captions, image and text rows stacked; :func:`head_outputs`); its
    logit scale and bias are the members' means; the prior's buffers are the first member's.
    Raises :class:`ModelError` for fewer than 2 members or members of different configs."""
    first = members[0]
    if len(members) < 2 or len(outputs) != len(members):
        raise ModelError(f"an ensemble merges 2 or more members with their outputs, got {len(members)} and "
                         f"{len(outputs)}")
    if any(m.config != first.config or m.config.ensemble != 1 for m in members):
        raise ModelError("ensemble members must share one config with a single head per side")
    config = replace(first.config, ensemble=len(members))
    merged = DualEncoder(config, image_tower=first.image_tower, text_tower=first.text_tower, fill_prior=False)
    own = {k: v for k, v in first.state_dict().items() if not k.startswith(("image_tower.", "text_tower."))}
    merged.load_state_dict(own, strict=False)  # the prior's buffers (the heads are replaced below)
    rotations = torch.from_numpy(np.stack([procrustes(o, outputs[0]) for o in outputs]))
    with torch.no_grad():
        for side in ("image_head", "text_head"):
            ensemble: EnsembleHead = _projection(getattr(merged, side))
            for slot, member in zip(ensemble.members, members):
                slot.load_state_dict(_projection(getattr(member, side)).state_dict())
            ensemble.rotations.copy_(rotations)
        merged.logit_scale.copy_(torch.stack([m.logit_scale.detach() for m in members]).mean())
        merged.logit_bias.copy_(torch.stack([m.logit_bias.detach() for m in members]).mean())
    return merged.eval()
