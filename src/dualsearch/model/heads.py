"""Projection heads, exactly as the reference builds them."""
from __future__ import annotations

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """Dense(in -> D) gives the projected embedding; then, per layer: GELU, Dense(D), Dropout,
    residual Add with the projected embedding, LayerNorm.  ``[B, in] -> [B, D]``."""

    def __init__(self, in_dim: int, dim: int = 256, layers: int = 1, dropout: float = 0.1):
        super().__init__()
        self.project = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(dim, dim), "drop": nn.Dropout(dropout), "norm": nn.LayerNorm(dim)})
            for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.project(x)
        for block in self.blocks:
            x = block["fc"](nn.functional.gelu(projected))
            x = block["drop"](x)
            x = block["norm"](x + projected)
            projected = x
        return projected


class EnsembleHead(nn.Module):
    """Heads trained apart (different seeds) as one: ``[B, in] -> [B, D]``,
    ``unit(mean_i unit(head_i(x)) @ R_i)``. ``rotations [N, D, D]`` are orthogonal maps of each
    member's space onto the first member's (``R_0 = I``), fitted by orthogonal Procrustes
    (:func:`dualsearch.model.ensemble.procrustes`): members trained from different random
    initialisations learn the same geometry in arbitrarily rotated spaces, so plain averaging would
    mix unrelated coordinates. The image and text sides use the same ``R_i``, so each member's
    image-text dot products are kept, and the output keeps one member's dimension (unlike
    concatenation, which multiplies the index's size by N)."""

    def __init__(self, heads: list[nn.Module], dim: int):
        super().__init__()
        self.members = nn.ModuleList(heads)
        self.register_buffer("rotations", torch.eye(dim).expand(len(heads), dim, dim).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([nn.functional.normalize(h(x), dim=-1) for h in self.members])  # [N, B, D]
        mean = torch.einsum("nbd,nde->be", outs, self.rotations.to(outs.dtype)) / len(self.members)
        return nn.functional.normalize(mean, dim=-1)
