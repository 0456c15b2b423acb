"""Model statistics for the before/after table: parameters, non-zero
parameters, bytes, multiply-accumulates and op-type counts.

MACs are computed from shape-inferred tensors:
  Conv / ConvTranspose: prod(out_shape) * (C_in / groups) * prod(kernel)
  Gemm / MatMul:        prod(out_shape) * K   (K = reduction length)
  GRU / LSTM / RNN:     seq * batch * dirs * gates * hidden * (input + hidden)
Other ops are counted as 0 MACs (they are memory-bound).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class ModelStats:
    params: int
    nonzero_params: int
    bytes_on_disk: int
    macs: int
    op_counts: dict[str, int] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = round(self.sparsity, 6)
        return d


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):  # no shape: rank unknown
            shapes[vi.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def node_macs(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    op = node.op_type
    out = shapes.get(node.output[0]) if node.output else None
    if op in ("Conv", "ConvTranspose", "ConvInteger", "QLinearConv"):
        w_idx = 3 if op == "QLinearConv" else 1
        w = shapes.get(node.input[w_idx])
        if out is None or w is None:
            return 0
        if op == "ConvTranspose":
            x = shapes.get(node.input[0])
            return int(np.prod(x)) * int(np.prod(w[1:])) if x else 0
        return int(np.prod(out)) * int(np.prod(w[1:]))
    if op in ("Gemm", "MatMul", "MatMulInteger", "QLinearMatMul"):
        a = shapes.get(node.input[0])
        if out is None or not a:
            return 0
        k = a[-1]
        if op == "Gemm" and _attr(node, "transA", 0):
            k = a[0]
        return int(np.prod(out)) * int(k)
    if op in ("GRU", "LSTM", "RNN"):
        x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
        r = shapes.get(node.input[2])
        if x is None or w is None or r is None:
            return 0
        seq, batch = (x[1], x[0]) if _attr(node, "layout", 0) else (x[0], x[1])
        # W: [dirs, gates*hidden, input], R: [dirs, gates*hidden, hidden]
        return int(seq * batch * w[0] * w[1] * (w[2] + r[2]))
    return 0


def compute(model: onnx.ModelProto, bytes_on_disk: int) -> ModelStats:
    params = nnz = 0
    for init in model.graph.initializer:
        if init.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                                  onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                                  onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
            continue  # shape/index constants are not parameters
        arr = numpy_helper.to_array(init)
        params += arr.size
        nnz += int(np.count_nonzero(arr))
    shapes = _shapes(model)
    macs = sum(node_macs(n, shapes) for n in model.graph.node)
    ops = Counter(n.op_type for n in model.graph.node)
    return ModelStats(params, nnz, bytes_on_disk, macs, dict(sorted(ops.items())))
