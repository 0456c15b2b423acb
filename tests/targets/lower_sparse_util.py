"""Shared helpers for the lower.sparse tests: run the pass, run a model in onnxruntime
(optimizations off), and check the TVM x86 build of a lowered model against a reference."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from compressor.pass_base import PassContext
from targets.lower_sparse import LowerSparse, LowerSparseConfig

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}


class Spec:
    tvm_target = X86
    family = "x86"


def lower(model: onnx.ModelProto, spec=Spec, **cfg):
    graph = gs.import_onnx(model)
    ctx = PassContext(target=spec(), opset=17, template=model)
    res = LowerSparse(LowerSparseConfig(**cfg)).run(graph, ctx)
    return res, ctx.export(graph)


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def check_tvm_build(lowered: onnx.ModelProto, x: np.ndarray, ref: np.ndarray, tmp_path: Path, kernel: str) -> None:
    """Import the lowered model for x86, assert a function named like ``kernel`` (the BSR
    kernel) is in the module, compile it and compare its output with ``ref``."""
    from targets import tvm_backend

    path = tmp_path / "m.onnx"
    onnx.save(lowered, str(path))
    mod = tvm_backend.import_onnx(path, target=X86)
    assert any(kernel in str(g) for g in mod.functions)
    tvm_backend.compile_library(mod, X86, tmp_path / "m.so")
    np.testing.assert_allclose(tvm_backend.run_library(tmp_path / "m.so", {"x": x})[0], ref, rtol=1e-4, atol=1e-4)
