"""INT8 copies of ONNX encoders, made with ONNX Runtime's quantisation tools (torch-free).

The image encoder is quantised statically (QDQ format, per-channel INT8 weights, UINT8
activations) with a calibration sample drawn from the collection being indexed: dynamic
quantisation turns convolutions into ConvInteger, which ONNX Runtime runs slower than fp32. On
x86 CPUs without VNNI, ONNX Runtime's UINT8 x INT8 kernels (VPMADDUBSW) can saturate, so weights
are then quantised to 7 bits (``reduce_range``), as ONNX Runtime's documentation advises. The copy
is cached beside the fp32 export (``<key>.int8.onnx``) with a record of its agreement with fp32
(cosine of the embeddings of the calibration images), and reused by later runs.
The text encoder (a transformer: MatMul-bound) is quantised dynamically.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ..data.images import ImagePreprocessor
from ..storage import atomic_path
from .pipeline import decode
from .runtime import ort_session, read_record, write_record

log = logging.getLogger(__name__)

CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 8
MIN_COSINE = 0.95  # below this mean cosine to fp32 a warning says that INT8 vectors drift


def has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (AVX512-VNNI or AVX-VNNI: INT8 dot products without
    saturation); False where /proc/cpuinfo is not there."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def calibration_pixels(srcs: Sequence, preprocess: ImagePreprocessor, n: int = CALIBRATION_IMAGES,
                       max_pixels: int | None = None) -> np.ndarray:
    """Up to ``n`` images spread evenly over ``srcs``, decoded and preprocessed: ``[N,3,S,S]``
    float32 (undecodable ones are left out; N may be 0)."""
    step = max(1, len(srcs) // n)
    arrays = [px for px, _ in (decode(s, preprocess, max_pixels) for s in list(srcs)[::step][:n]) if px is not None]
    size = preprocess.size
    return np.stack(arrays) if arrays else np.zeros((0, 3, size, size), np.float32)


def quantize_image_static(fp32: str | os.PathLike, out: str | os.PathLike, pixels: np.ndarray,
                          reduce_range: bool | None = None) -> None:
    """Write a static INT8 (QDQ) copy of the image encoder ``fp32`` (input ``pixels [B,3,S,S]``)
    to ``out`` atomically, calibrated (min-max) on ``pixels``. ``reduce_range``: 7-bit weights
    (None: where the CPU lacks VNNI). Raises ``StorageError``, onnxruntime's errors."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixels": pixels[i:i + CALIBRATION_BATCH]}
                                 for i in range(0, len(pixels), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as work, atomic_path(out) as tmp:
        pre = Path(work) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # folds, fuses, infers shapes
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=not has_vnni() if reduce_range is None else reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        extra_options={"CalibTensorRangeSymmetric": False})


def cosine_agreement(a_path: str | os.PathLike, b_path: str | os.PathLike, pixels: np.ndarray) -> tuple[float, float]:
    """-> (mean, min) cosine between two image encoders' embeddings of ``pixels``."""
    a = ort_session(a_path, 1).run(None, {"pixels": pixels})[0]
    b = ort_session(b_path, 1).run(None, {"pixels": pixels})[0]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return float(cos.mean()), float(cos.min())


def int8_image_encoder(fp32: str | os.PathLike, srcs: Sequence, preprocess: ImagePreprocessor,
                       max_pixels: int | None = None) -> str:
    """-> the INT8 copy of the verified image encoder ``fp32`` (``<key>.int8.onnx`` beside it),
    made now from a calibration sample of ``srcs`` (image paths or refs) unless a recorded one is
    there. Its agreement with fp32 is logged, with a warning below a mean cosine of 0.95.
    Raises ``StorageError``, :class:`~dualsearch.errors.ConfigError` when no image of ``srcs`` decodes."""
    from ..errors import ConfigError

    fp32 = Path(fp32)
    out = fp32.with_name(f"{fp32.stem}.int8.onnx")
    record = read_record(out)
    if record is None or record.get("source_sha256") != (read_record(fp32) or {}).get("sha256"):
        pixels = calibration_pixels(srcs, preprocess, max_pixels=max_pixels)
        if not len(pixels):
            raise ConfigError("--precision int8 calibrates on the images being indexed, and none of them decodes")
        log.info("quantising the image encoder to INT8 (calibration: %d images)", len(pixels))
        quantize_image_static(fp32, out, pixels)
        mean, low = cosine_agreement(fp32, out, pixels[:32])
        write_record(out, source_sha256=(read_record(fp32) or {}).get("sha256"), cosine_mean=mean, cosine_min=low,
                     calibration_images=len(pixels), reduce_range=not has_vnni())
        record = read_record(out) or {}
    if record.get("cosine_mean", 1.0) < MIN_COSINE:
        log.warning("the INT8 image encoder's vectors agree with fp32 at a mean cosine of %.3f (min %.3f); "
                    "--precision fp32 keeps full quality", record["cosine_mean"], record["cosine_min"])
    return str(out)


def quantize_text_dynamic(fp32: str | os.PathLike, out: str | os.PathLike) -> None:
    """Write a dynamically quantised (INT8 weights of MatMul/Gemm) copy of a text encoder
    ``fp32`` to ``out`` atomically. Raises ``StorageError``, onnxruntime's errors."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(out) as tmp:
        quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
