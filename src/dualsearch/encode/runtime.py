"""ONNX Runtime sessions, made one way everywhere, and the record of a verified export (torch-free:
Spark executors, the search path and torch-free indexing import this without torch).

A verified export is ``<cache root>/onnx/<key>.onnx`` beside ``<key>.json``: the SHA-256 of the
ONNX file, the largest difference from torch found when it was checked, and the preprocessing its
pixels need. Whoever holds the record can embed images with ONNX Runtime alone.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import ConfigError


def onnx_available() -> bool:
    """Whether ``onnxruntime`` imports."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


ENGINES = ("auto", "torch", "onnx")  # image encoder runtimes of `dualsearch index --engine`


def wants_onnx(engine: str, device: str) -> bool:
    """Whether ``engine`` on ``device`` runs the ONNX export. Raises ``ConfigError`` for an unknown
    engine, or ``onnx`` without onnxruntime."""
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}: choose one of {', '.join(ENGINES)}")
    if engine == "onnx" and not onnx_available():
        raise ConfigError("engine onnx needs onnxruntime: pip install onnxruntime")
    return engine == "onnx" or (engine == "auto" and device == "cpu" and onnx_available())


def ort_session(path: str | os.PathLike, threads: int | None = None, gpu: bool = False, spin: bool = True):
    """An ONNX Runtime ``InferenceSession`` for the model at ``path``, quiet below errors;
    ``threads`` intra-op threads (ONNX Runtime's default where None); ``gpu``: the CUDA provider
    first where onnxruntime-gpu has it; ``spin=False``: idle intra-op threads sleep instead of
    spinning (``session.intra_op.allow_spinning``), leaving the cores to decoders sharing them.
    Raises onnxruntime's own errors for a damaged file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if gpu else ("CPUExecutionProvider",)
    providers = [p for p in wanted if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), opts, providers=providers)


def onnx_file(cache_root: str | os.PathLike, key: str) -> Path:
    """Where the verified export of ``key`` lives under a cache root."""
    return Path(cache_root) / "onnx" / f"{key}.onnx"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes. Raises ``OSError``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_record(onnx_path: Path, **facts) -> None:
    """Record that ``onnx_path`` was verified (``facts``: ``max_diff``, ``image`` preprocessing,
    ``dim``...) beside it, bound to its bytes by SHA-256. Raises ``StorageError``."""
    from ..storage import write_text

    doc = {"sha256": file_sha256(onnx_path), **facts}
    write_text(onnx_path.with_suffix(".json"), json.dumps(doc, indent=2, sort_keys=True))


def read_record(onnx_path: Path) -> dict | None:
    """The record of a verified ``onnx_path`` when its bytes are still those verified; None when
    there is none, it is damaged, or the file changed since."""
    try:
        doc = json.loads(onnx_path.with_suffix(".json").read_text())
        if isinstance(doc, dict) and doc.get("sha256") == file_sha256(onnx_path):
            return doc
    except (OSError, ValueError):
        pass
    return None
