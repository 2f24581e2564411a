"""ONNX Runtime sessions, made one way everywhere (torch-free: Spark executors and the search
path import this without torch)."""
from __future__ import annotations

import os


def onnx_available() -> bool:
    """Whether ``onnxruntime`` imports."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def ort_session(path: str | os.PathLike, threads: int | None = None, gpu: bool = False):
    """An ONNX Runtime ``InferenceSession`` for the model at ``path``, quiet below errors;
    ``threads`` intra-op threads (ONNX Runtime's default where None); ``gpu``: the CUDA provider
    first where onnxruntime-gpu has it. Raises onnxruntime's own errors for a damaged file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if gpu else ("CPUExecutionProvider",)
    providers = [p for p in wanted if p in ort.get_available_providers()]
    return ort.InferenceSession(str(path), opts, providers=providers)
