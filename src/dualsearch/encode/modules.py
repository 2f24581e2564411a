"""A model's tower + head + L2 normalisation as one module: what an index stores and what queries
are embedded with (exported to ONNX as such)."""
from __future__ import annotations

import torch
from torch import nn


class NormalizedImageEncoder(nn.Module):
    """``pixels [B,3,S,S] -> unit embeddings [B,D]`` of a dual encoder's image side."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.image_tower
        self.head = model.image_head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.tower(pixels)), dim=-1)


class NormalizedTextEncoder(nn.Module):
    """``token dict of [B,T] -> unit embeddings [B,D]`` of a dual encoder's text side."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.text_tower
        self.head = model.text_head

    def forward(self, tokens: dict) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.tower(tokens)), dim=-1)


class TokenInputs(nn.Module):
    """Positional-argument wrapper so that a module over a token dict exports with named inputs."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.module(dict(zip(self.names, tensors)))
