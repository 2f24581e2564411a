"""Inference backends for encoders: torch, or ONNX Runtime on CPU.

On these CPUs ONNX Runtime runs EfficientNet-Lite0 several times faster than eager torch, with
the same outputs within 1e-5 (bench/index_speed.py), so ``engine="auto"`` uses it on CPU when
onnxruntime is installed, and torch on GPU. A module is exported once per key into
``<cache root>/onnx/``, checked against torch on a sample batch, and reused; a module that does
not export, or whose export differs from torch, falls back to torch with a warning.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch
from torch import nn

from .export import export_image_onnx, export_text_onnx
from .runtime import ENGINES, onnx_file, ort_session, read_record, wants_onnx, write_record

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], np.ndarray]
TextForward = Callable[[dict], np.ndarray]


__all__ = ["ENGINES", "image_forward", "onnx_file", "text_forward", "torch_forward", "verified_onnx", "wants_onnx"]


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def torch_forward(module: nn.Module, device: str = "cpu") -> Forward:
    """``pixels [B,3,S,S] -> [B,D]`` float32 numpy through ``module`` in inference mode."""
    module.eval().to(device)

    @torch.inference_mode()
    def run(pixels: torch.Tensor) -> np.ndarray:
        x = pixels.to(device).contiguous(memory_format=torch.channels_last)
        return module(x).float().cpu().numpy()

    return run


def _image_facts(module: nn.Module) -> dict:
    """What a torch-free runner needs besides the ONNX file: the preprocessing of the module's
    image tower (``module.tower`` or the module itself) and the output dimension."""
    tower = getattr(module, "tower", module)
    prep = tower.preprocessor() if hasattr(tower, "preprocessor") else None
    return {"image": {"size": prep.size, "mean": list(prep.mean), "std": list(prep.std), "resize": prep.resize}} \
        if prep is not None else {}


def verified_onnx(module: nn.Module, key: str, image_size: int, cache_root: str | os.PathLike,
                  atol: float = 1e-3):
    """-> (ONNX file, session) of an image module equal to ``module`` within ``atol`` (max abs
    difference on a seeded random batch), exported once per ``key`` under ``cache_root``; None
    where export or the check fails. A passed check is recorded beside the file
    (:func:`~dualsearch.encode.runtime.write_record`, with the tower's preprocessing), so that later
    runs use the file without torch and without checking again."""
    path = onnx_file(cache_root, key)
    try:
        recorded = read_record(path) is not None
        if not recorded:  # none yet, or a file changed since it was checked: export afresh
            export_image_onnx(module, path, image_size)
        session = ort_session(path, torch.get_num_threads(), gpu=True)
        if recorded:
            return path, session
        sample = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want = module.eval()(sample).float().numpy()
        got = session.run(None, {"pixels": sample.numpy()})[0]
    except Exception as e:  # export or runtime failure of an exotic model: fall back to torch
        log.warning("ONNX export of %s failed (%s); using torch", key, _first_line(e))
        return None
    diff = float(np.abs(got - want).max())
    if diff > atol:
        log.warning("ONNX output of %s differs from torch by %.2g; using torch", key, diff)
        return None
    write_record(path, max_diff=diff, atol=atol, dim=int(want.shape[1]), **_image_facts(module))
    return path, session


def image_forward(module: nn.Module, key: str, image_size: int, cache_root: str | os.PathLike,
                  engine: str = "auto", device: str = "cpu") -> tuple[Forward, str]:
    """-> (forward over pixels ``[B,3,S,S]`` -> ``[B,D]``, engine used: "onnx" or "torch").
    ``module`` maps preprocessed pixels to vectors; ONNX exports go under ``cache_root``.
    Raises :class:`~dualsearch.errors.ConfigError` for an unknown engine."""
    if wants_onnx(engine, device):
        verified = verified_onnx(module, key, image_size, cache_root)
        if verified is not None:
            session = verified[1]
            return (lambda pixels: session.run(None, {"pixels": pixels.cpu().numpy()})[0]), "onnx"
    return torch_forward(module, device), "torch"


def text_forward(tower: nn.Module, key: str, cache_root: str | os.PathLike, engine: str = "auto",
                 device: str = "cpu", atol: float = 1e-3) -> tuple[TextForward, str]:
    """-> (forward over a token dict of ``[B,T]`` tensors -> ``[B,F]``, engine used), as
    :func:`image_forward` for a text tower (``tower.tokenize`` makes the inputs)."""
    tower.eval().to(device)

    @torch.inference_mode()
    def run_torch(tokens: dict) -> np.ndarray:
        return tower({k: v.to(device) for k, v in tokens.items()}).float().cpu().numpy()

    if not wants_onnx(engine, device):
        return run_torch, "torch"
    path = onnx_file(cache_root, f"text-{key}")
    try:
        if not path.is_file():
            export_text_onnx(tower, tower.tokenize, path)
        session = ort_session(path, torch.get_num_threads())
        check = tower.tokenize(["two green squares on the left", "one", "a large yellow star on a dark background"])
        got = session.run(None, {k: v.numpy() for k, v in check.items()})[0]
        diff = float(np.abs(got - run_torch(check)).max())
    except Exception as e:  # export or runtime failure of an exotic model: fall back to torch
        log.warning("ONNX export of text tower %s failed (%s); using torch", key, _first_line(e))
        return run_torch, "torch"
    if diff > atol:
        log.warning("ONNX output of text tower %s differs from torch by %.2g; using torch", key, diff)
        return run_torch, "torch"
    return (lambda tokens: session.run(None, {k: v.cpu().numpy() for k, v in tokens.items()})[0]), "onnx"
