"""Helpers shared by the Relax ONNX frontend converters of the hand-scheduled CPU kernels
(targets/dense_kernels.py, targets/conv_kernels.py): read a constant input, and hand a node
the kernels do not take back to the frontend's own converter."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def model_opset(model: Any, default: int = 17) -> int:
    """The default-domain opset of an ONNX model (``default`` without a model)."""
    if model is None:
        return default
    return next((int(i.version) for i in model.opset_import if i.domain in ("", "ai.onnx")), default)


def const_array(e: Any) -> np.ndarray | None:
    """The value of a Relax constant (weights are embedded as constants), else None."""
    from tvm.ir import expr as tvm_ir_expr

    return e.value.numpy() if isinstance(e, tvm_ir_expr.Constant) else None


def frontend_converter(opset: int) -> Callable[..., Any]:
    """``original(op, bb, inputs, attr, params)``: the frontend's own converter of ``op``."""
    from tvm.relax.frontend.onnx import onnx_frontend

    def original(op: str, bb, inputs, attr, params):
        return getattr(onnx_frontend, op).get_converter(opset)(bb, inputs, attr, params)

    return original
