"""compressor: an ONNX model-compression compiler.

ONNX in -> graph passes (cleanup, sparsity, pruning, quantization) -> per-target
compilation (TVM Relax for x86 / aarch64 / CUDA) -> a verified bundle out.
"""
from __future__ import annotations

__version__ = "0.1.0"

# The Python API (compressor/api.py, docs/python-api.md), loaded on first use: importing a core module
# (compressor.errors, compressor.ir, ...) must not pull in the pipeline, the passes and the targets.
_API = ("compress", "run", "run_recipe", "load_recipe", "register_pass", "register_target", "Result", "Options")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from compressor import api

        return getattr(api, name)
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")
