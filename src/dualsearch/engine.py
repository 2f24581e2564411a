"""Inference engines for image encoders: torch, or ONNX Runtime on CPU.

On these CPUs ONNX Runtime runs EfficientNet-Lite0 several times faster than eager torch, with
the same outputs within 1e-5 (see bench/index_speed.py), so ``engine="auto"`` uses it on CPU when
onnxruntime is installed, and torch on GPU. The ONNX file is exported once per module (keyed by a
fingerprint), stored in the cache folder, checked against torch on a sample batch, and reused.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .runtime import ort_session

log = logging.getLogger(__name__)

ENGINES = ("auto", "torch", "onnx")
Forward = Callable[[torch.Tensor], np.ndarray]


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def torch_forward(module: nn.Module, device: str = "cpu") -> Forward:
    module.eval().to(device)

    @torch.inference_mode()
    def run(pixels: torch.Tensor) -> np.ndarray:
        x = pixels.to(device).contiguous(memory_format=torch.channels_last)
        return module(x).float().cpu().numpy()

    return run


def export_onnx(module: nn.Module, path: Path, image_size: int) -> None:
    """Export ``module`` (pixels [B,3,S,S] -> [B,D]) with a dynamic batch axis, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")
    dummy = torch.zeros(2, 3, image_size, image_size)
    module = module.eval().cpu()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (dummy,), str(tmp), input_names=["pixels"], output_names=["embedding"],
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                          dynamo=False)
    os.replace(tmp, path)


def verified_onnx(module: nn.Module, key: str, image_size: int, cache_dir: str | os.PathLike,
                  atol: float = 1e-3):
    """-> (ONNX file, session) equal to ``module`` within ``atol`` (exported once per key into
    ``cache_dir``), or None where export or the check fails."""
    path = Path(cache_dir) / "onnx" / f"{key}.onnx"
    try:
        if not path.is_file():
            export_onnx(module, path, image_size)
        session = ort_session(path, torch.get_num_threads(), gpu=True)
        sample = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            want = module.eval()(sample).float().numpy()
        got = session.run(None, {"pixels": sample.numpy()})[0]
    except Exception as e:  # export or runtime failure of an exotic model: fall back to torch
        log.warning("ONNX export of %s failed (%s); using torch", key, str(e).splitlines()[0] if str(e) else e)
        return None
    diff = float(np.abs(got - want).max())
    if diff > atol:
        log.warning("ONNX output of %s differs from torch by %.2g; using torch", key, diff)
        return None
    return path, session


def onnx_forward(module: nn.Module, key: str, image_size: int, cache_dir: str | os.PathLike,
                 atol: float = 1e-3) -> Forward | None:
    """An ONNX Runtime forward equal to ``module`` within ``atol``, or None where that fails."""
    verified = verified_onnx(module, key, image_size, cache_dir, atol)
    if verified is None:
        return None
    session = verified[1]

    def run(pixels: torch.Tensor) -> np.ndarray:
        return session.run(None, {"pixels": pixels.cpu().numpy()})[0]

    return run


def image_forward(module: nn.Module, key: str, image_size: int, engine: str = "auto", device: str = "cpu",
                  cache_dir: str | os.PathLike | None = None) -> tuple[Forward, str]:
    """-> (forward, engine used). ``module`` maps preprocessed pixels to vectors."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    want_onnx = engine == "onnx" or (engine == "auto" and device == "cpu" and onnx_available())
    if want_onnx:
        if not onnx_available():
            raise ValueError("engine onnx needs onnxruntime: pip install onnxruntime")
        from .train.features import default_cache_dir

        fwd = onnx_forward(module, key, image_size, cache_dir or default_cache_dir())
        if fwd is not None:
            return fwd, "onnx"
    return torch_forward(module, device), "torch"


# ----------------------------------------------------------------------------- text
TextForward = Callable[[dict], np.ndarray]


class _TokenInputs(nn.Module):
    """Positional-argument wrapper so that a module over a token dict exports with named inputs."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.module(dict(zip(self.names, tensors)))


def export_text_onnx(module: nn.Module, tokenize: Callable, path: Path) -> list[str]:
    """Export ``module`` (token dict -> [B, D]) with the token inputs ``tokenize`` produces, dynamic
    batch and sequence axes, atomically. Returns the input names."""
    sample = tokenize(["a small red circle above two blue stars", "a picture"])
    names = list(sample)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["embedding"] = {0: "batch"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # the wrapper is put in eval mode too: export restores its mode onto the module afterwards
        torch.onnx.export(_TokenInputs(module, names).eval(), tuple(sample[n] for n in names), str(tmp),
                          input_names=names, output_names=["embedding"], dynamic_axes=axes, opset_version=17,
                          dynamo=False)
    os.replace(tmp, path)
    return names


def text_forward(tower, key: str, engine: str = "auto", device: str = "cpu",
                 cache_dir: str | os.PathLike | None = None, atol: float = 1e-3) -> tuple[TextForward, str]:
    """-> (forward over tokenised batches, engine used), as :func:`image_forward` for text towers."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    tower.eval().to(device)

    @torch.inference_mode()
    def run_torch(tokens: dict) -> np.ndarray:
        return tower({k: v.to(device) for k, v in tokens.items()}).float().cpu().numpy()

    if not (engine == "onnx" or (engine == "auto" and device == "cpu" and onnx_available())):
        return run_torch, "torch"
    from .train.features import default_cache_dir

    path = Path(cache_dir or default_cache_dir()) / "onnx" / f"text-{key}.onnx"
    try:
        if not path.is_file():
            export_text_onnx(tower, tower.tokenize, path)
        session = ort_session(path, torch.get_num_threads())
        check = tower.tokenize(["two green squares on the left", "one", "a large yellow star on a dark background"])
        got = session.run(None, {k: v.numpy() for k, v in check.items()})[0]
        diff = float(np.abs(got - run_torch(check)).max())
    except Exception as e:  # export or runtime failure of an exotic model: fall back to torch
        log.warning("ONNX export of text tower %s failed (%s); using torch", key, str(e).splitlines()[0] if str(e) else e)
        return run_torch, "torch"
    if diff > atol:
        log.warning("ONNX output of text tower %s differs from torch by %.2g; using torch", key, diff)
        return run_torch, "torch"

    def run_onnx(tokens: dict) -> np.ndarray:
        return session.run(None, {k: v.cpu().numpy() for k, v in tokens.items()})[0]

    return run_onnx, "onnx"


class NormalizedTextEncoder(nn.Module):
    """Text tower + head + L2 normalisation over a token dict (what queries are embedded with)."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.text_tower
        self.head = model.text_head

    def forward(self, tokens: dict) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.tower(tokens)), dim=-1)


class NormalizedImageEncoder(nn.Module):
    """Tower + head + L2 normalisation as one module (what an index stores)."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.image_tower
        self.head = model.image_head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head(self.tower(pixels)), dim=-1)
