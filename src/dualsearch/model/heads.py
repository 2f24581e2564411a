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
