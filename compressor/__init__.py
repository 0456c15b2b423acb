"""compressor: an ONNX model-compression compiler.

ONNX in -> graph passes (cleanup, sparsity, pruning, quantization) -> per-target
compilation (TVM Relax for x86 / aarch64 / CUDA) -> a verified bundle out.
"""
from __future__ import annotations

__version__ = "0.1.0"
