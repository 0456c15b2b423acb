"""A small ONNX -> torch converter (an interpreter module), for recovery fine-tuning.

``OnnxModule(model)`` is an ``nn.Module`` whose ``forward`` evaluates the ONNX
graph node by node with torch ops, so autograd flows through it.  Float
initializers with more than one element become ``nn.Parameter``s (weights,
biases, norm scales) except those that feed statistics (BatchNormalization
mean/var), which stay buffers like every other constant.  The mapping from ONNX
initializer name to parameter is kept, so trained values can be written back
into the *same* graph (``write_back``): the topology the rest of the pipeline
sees does not change, only the constants.

Supported ops (default domain): see ``HANDLERS``.  Anything else raises a
UsageError listing the unsupported ops, before anything runs.  ``export_onnx``
re-exports the module with ``torch.onnx.export(dynamo=False)`` under the
original input/output names, for users who want a fresh graph instead.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from compressor import ir
from compressor.errors import UsageError

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Handler = Callable[[list[Any], dict[str, Any]], list[Tensor]]

_ONNX_TO_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.INT16: torch.int16,
}

# (op, input index) whose float constants are statistics, not trainable
_NOT_TRAINABLE = {("BatchNormalization", 3), ("BatchNormalization", 4)}


def _ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def _spatial_pads(pads: list[int] | None, n: int) -> tuple[list[int], list[int]]:
    pads = list(pads or [0] * (2 * n))
    return pads[:n], pads[n:]


def _torch_pad(begin: list[int], end: list[int]) -> list[int]:
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _auto_pad(x: Tensor, a: dict, kernel: list[int], strides: list[int], dilations: list[int]) -> tuple[list[int], list[int]]:
    mode = a.get("auto_pad", "NOTSET")
    n = len(kernel)
    if mode in ("NOTSET", ""):
        return _spatial_pads(a.get("pads"), n)
    if mode == "VALID":
        return [0] * n, [0] * n
    begin, end = [], []
    for i in range(n):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin, end


def _conv(i: list[Any], a: dict) -> list[Tensor]:
    x, w = i[0], i[1]
    b = i[2] if len(i) > 2 else None
    n = w.dim() - 2
    strides = a.get("strides", [1] * n)
    dil = a.get("dilations", [1] * n)
    begin, end = _auto_pad(x, a, list(w.shape[2:]), strides, dil)
    if begin == end:
        pad: Any = begin
    else:
        x = F.pad(x, _torch_pad(begin, end))
        pad = 0
    fn = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    return [fn(x, w, b, stride=strides, padding=pad, dilation=dil, groups=a.get("group", 1))]


def _gemm(i: list[Any], a: dict) -> list[Tensor]:
    A = i[0].t() if a.get("transA", 0) else i[0]
    B = i[1].t() if a.get("transB", 0) else i[1]
    y = a.get("alpha", 1.0) * (A @ B)
    if len(i) > 2 and i[2] is not None:
        y = y + a.get("beta", 1.0) * i[2]
    return [y]


def _div(i: list[Any], a: dict) -> list[Tensor]:
    if not i[0].is_floating_point():
        return [torch.div(i[0], i[1], rounding_mode="trunc")]
    return [i[0] / i[1]]


def _clip(i: list[Any], a: dict) -> list[Tensor]:
    x = i[0]
    lo = i[1] if len(i) > 1 and i[1] is not None else None
    hi = i[2] if len(i) > 2 and i[2] is not None else None
    return [torch.clamp(x, min=lo, max=hi)]


def _batchnorm(i: list[Any], a: dict) -> list[Tensor]:
    x, scale, bias, mean, var = i[:5]
    return [F.batch_norm(x, mean, var, scale, bias, training=False, eps=a.get("epsilon", 1e-5))]


def _pool(kind: str) -> Handler:
    def run(i: list[Any], a: dict) -> list[Tensor]:
        x = i[0]
        k = a["kernel_shape"]
        n = len(k)
        strides = a.get("strides", [1] * n)
        dil = a.get("dilations", [1] * n)
        begin, end = _auto_pad(x, a, k, strides, dil)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            if begin != end:
                x = F.pad(x, _torch_pad(begin, end), value=float("-inf"))
                begin = [0] * n
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
            return [fn(x, k, strides, begin, dil, ceil_mode=ceil)]
        include = bool(a.get("count_include_pad", 0))
        if begin != end:
            if not include:
                raise UsageError("AveragePool with asymmetric pads and count_include_pad=0 is not supported")
            x = F.pad(x, _torch_pad(begin, end))
            begin = [0] * n
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
        return [fn(x, k, strides, begin, ceil_mode=ceil, count_include_pad=include)]

    return run


def _flatten(i: list[Any], a: dict) -> list[Tensor]:
    x = i[0]
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    lead = int(np.prod(x.shape[:axis])) if axis > 0 else 1
    return [x.reshape(lead, -1)]


def _reshape(i: list[Any], a: dict) -> list[Tensor]:
    x, shape = i[0], _ints(i[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[j] if s == 0 else s for j, s in enumerate(shape)]
    mode = a.get(_BATCH_DIM0)
    if mode == "count":  # a constant [1, ...] target: dim 0 from the element count (exactly 1 at batch 1)
        shape = [-1, *shape[1:]]
    elif mode == "copy" and x.dim():  # [1, ..., -1, ...] on an input whose dim 0 is 1: dim 0 follows the input's
        shape = [x.shape[0], *shape[1:]]
    return [x.reshape(shape)]


_BATCH_DIM0 = "_compressor_batch_dim0"  # internal attribute (not ONNX): see batch_1_reshapes


def batch_1_reshapes(model: onnx.ModelProto) -> dict[str, str]:
    """The Reshapes (by output) whose constant target starts with 1: the exporter baked batch 1 in. With
    samples stacked on dim 0, dim 0 of the target becomes -1 when the target has no other -1 (``count``:
    inferred from the element count, exactly 1 at batch 1), else the input's dim 0 when that is 1 in the
    static shapes (``copy``). Both equal the original at batch 1; the batched run is checked against single
    samples before it is used."""
    try:
        inferred = ir.inferred_structure(model)
    except Exception:  # noqa: BLE001 - no static shapes: only the count rule applies
        inferred = model
    dim0 = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims:
            dim0[vi.name] = dims[0].dim_value if dims[0].HasField("dim_value") else None
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    out: dict[str, str] = {}
    for n in model.graph.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[1] not in consts:
            continue
        target = np.asarray(consts[n.input[1]]).ravel()
        if target.size < 2 or int(target[0]) != 1:
            continue
        if -1 not in target.tolist():
            out[n.output[0]] = "count"
        elif dim0.get(n.input[0]) == 1:
            out[n.output[0]] = "copy"
    return out


def _layernorm(i: list[Any], a: dict) -> list[Tensor]:
    x = i[0]
    axis = a.get("axis", -1)
    axis = axis + x.dim() if axis < 0 else axis
    bias = i[2] if len(i) > 2 else None
    return [F.layer_norm(x, tuple(x.shape[axis:]), i[1], bias, eps=a.get("epsilon", 1e-5))]


def _axes(i: list[Any], a: dict) -> list[int] | None:
    if "axes" in a:
        return list(a["axes"])
    return _ints(i[1]) if len(i) > 1 and i[1] is not None else None


def _reduce(fn: str) -> Handler:
    def run(i: list[Any], a: dict) -> list[Tensor]:
        x = i[0]
        axes = _axes(i, a)
        keep = bool(a.get("keepdims", 1))
        if axes is None or axes == []:
            if a.get("noop_with_empty_axes", 0) and axes == []:
                return [x]
            axes = list(range(x.dim()))
        if fn == "mean":
            return [x.mean(dim=axes, keepdim=keep)]
        if fn == "sum":
            return [x.sum(dim=axes, keepdim=keep)]
        y = x
        for ax in sorted((d % x.dim() for d in axes), reverse=True):
            y = y.amax(dim=ax, keepdim=keep) if fn == "max" else y.amin(dim=ax, keepdim=keep)
        return [y]

    return run


def _shape(i: list[Any], a: dict) -> list[Tensor]:
    s = list(i[0].shape)
    start, end = a.get("start", 0), a.get("end", len(s))
    return [torch.tensor(s[start:end], dtype=torch.int64)]


def _gather(i: list[Any], a: dict) -> list[Tensor]:
    x, idx = i[0], i[1].long()
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = x.index_select(axis, idx.reshape(-1))
    return [out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


def _unsqueeze(i: list[Any], a: dict) -> list[Tensor]:
    x = i[0]
    axes = _axes(i, a) or []
    rank = x.dim() + len(axes)
    for ax in sorted(d % rank for d in axes):
        x = x.unsqueeze(ax)
    return [x]


def _squeeze(i: list[Any], a: dict) -> list[Tensor]:
    x = i[0]
    axes = _axes(i, a)
    if axes is None:
        return [x.squeeze()]
    for ax in sorted((d % x.dim() for d in axes), reverse=True):
        x = x.squeeze(ax)
    return [x]


def _expand(i: list[Any], a: dict) -> list[Tensor]:
    shape = np.broadcast_shapes(tuple(i[0].shape), tuple(_ints(i[1])))
    return [i[0].expand(shape)]


def _constant(i: list[Any], a: dict) -> list[Tensor]:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            v = a[key]
            return [v if isinstance(v, Tensor) else torch.tensor(v)]
    raise UsageError(f"Constant with attributes {sorted(a)} is not supported")


def _constant_of_shape(i: list[Any], a: dict) -> list[Tensor]:
    v = a.get("value", torch.zeros(1))
    return [torch.full(tuple(_ints(i[0])), v.reshape(-1)[0].item(), dtype=v.dtype)]


def _slice(i: list[Any], a: dict) -> list[Tensor]:
    x = i[0]
    starts, ends = _ints(i[1]), _ints(i[2])
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
    steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    idx: list[Any] = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st <= 0:
            raise UsageError("Slice with non-positive steps is not supported")
        idx[ax % x.dim()] = slice(s, e, st)
    return [x[tuple(idx)]]


def _split(i: list[Any], a: dict) -> list[Tensor]:
    x = i[0]
    axis = a.get("axis", 0)
    split = _ints(i[1]) if len(i) > 1 and i[1] is not None else a.get("split")
    n = a.get("num_outputs")
    if split is None:
        n = n or a["_n_outputs"]
        size = math.ceil(x.shape[axis] / n)
        return list(torch.split(x, size, dim=axis))
    return list(torch.split(x, list(split), dim=axis))


def _cast(i: list[Any], a: dict) -> list[Tensor]:
    return [i[0].to(_ONNX_TO_TORCH_DTYPE[a["to"]])]


def _gelu(i: list[Any], a: dict) -> list[Tensor]:
    return [F.gelu(i[0], approximate=a.get("approximate", "none"))]


def _rnn_common(i: list[Any], a: dict) -> tuple[int, str]:
    if a.get("layout", 0) != 0:
        raise UsageError("recurrent ops with layout=1 are not supported")
    if len(i) > 4 and i[4] is not None:
        lens = i[4]
        if not bool((lens == i[0].shape[0]).all()):
            raise UsageError("recurrent ops with sequence_lens shorter than the sequence are not supported")
    if a.get("clip") is not None:
        raise UsageError("recurrent ops with clip are not supported")
    return a["hidden_size"], a.get("direction", "forward")


def _gru(i: list[Any], a: dict) -> list[Tensor]:
    """ONNX GRU (gates z, r, h; default sigmoid/tanh activations)."""
    X, W, R = i[0], i[1], i[2]
    H, direction = _rnn_common(i, a)
    nd = W.shape[0]
    B = i[3] if len(i) > 3 and i[3] is not None else torch.zeros(nd, 6 * H, dtype=X.dtype)
    h0 = i[5] if len(i) > 5 and i[5] is not None else torch.zeros(nd, X.shape[1], H, dtype=X.dtype)
    lbr = a.get("linear_before_reset", 0)
    ys, hs = [], []
    for d in range(nd):
        reverse = direction == "reverse" or d == 1
        wz, wr, wh = W[d].split(H, 0)
        rz, rr, rh = R[d].split(H, 0)
        wbz, wbr, wbh, rbz, rbr, rbh = B[d].split(H)
        h = h0[d]
        steps = range(X.shape[0] - 1, -1, -1) if reverse else range(X.shape[0])
        out = [None] * X.shape[0]
        for t in steps:
            x = X[t]
            z = torch.sigmoid(x @ wz.t() + h @ rz.t() + wbz + rbz)
            r = torch.sigmoid(x @ wr.t() + h @ rr.t() + wbr + rbr)
            if lbr:
                hh = torch.tanh(x @ wh.t() + r * (h @ rh.t() + rbh) + wbh)
            else:
                hh = torch.tanh(x @ wh.t() + (r * h) @ rh.t() + rbh + wbh)
            h = (1 - z) * hh + z * h
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
    return [torch.stack(ys, 1), torch.stack(hs)]


def _lstm(i: list[Any], a: dict) -> list[Tensor]:
    """ONNX LSTM (gates i, o, f, c; default activations; optional peepholes P)."""
    X, W, R = i[0], i[1], i[2]
    H, direction = _rnn_common(i, a)
    if a.get("input_forget", 0):
        raise UsageError("LSTM with input_forget=1 is not supported")
    nd = W.shape[0]
    B = i[3] if len(i) > 3 and i[3] is not None else torch.zeros(nd, 8 * H, dtype=X.dtype)
    h0 = i[5] if len(i) > 5 and i[5] is not None else torch.zeros(nd, X.shape[1], H, dtype=X.dtype)
    c0 = i[6] if len(i) > 6 and i[6] is not None else torch.zeros(nd, X.shape[1], H, dtype=X.dtype)
    P = i[7] if len(i) > 7 and i[7] is not None else torch.zeros(nd, 3 * H, dtype=X.dtype)
    ys, hs, cs = [], [], []
    for d in range(nd):
        reverse = direction == "reverse" or d == 1
        b = B[d][:4 * H] + B[d][4 * H:]
        pi, po, pf = P[d].split(H)
        h, c = h0[d], c0[d]
        steps = range(X.shape[0] - 1, -1, -1) if reverse else range(X.shape[0])
        out = [None] * X.shape[0]
        for t in steps:
            g = X[t] @ W[d].t() + h @ R[d].t() + b  # gate order i, o, f, c
            gi, go, gf, gc = g.split(H, -1)
            it = torch.sigmoid(gi + pi * c)
            ft = torch.sigmoid(gf + pf * c)
            c = ft * c + it * torch.tanh(gc)
            ot = torch.sigmoid(go + po * c)
            h = ot * torch.tanh(c)
            out[t] = h
        ys.append(torch.stack(out))
        hs.append(h)
        cs.append(c)
    return [torch.stack(ys, 1), torch.stack(hs), torch.stack(cs)]


def _unary(fn: Callable[[Tensor], Tensor]) -> Handler:
    return lambda i, a: [fn(i[0])]


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    return lambda i, a: [fn(i[0], i[1])]


def _softmax(log_: bool) -> Handler:
    def run(i: list[Any], a: dict) -> list[Tensor]:
        axis = a.get("axis", -1)
        return [F.log_softmax(i[0], axis) if log_ else F.softmax(i[0], axis)]
    return run


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Handler:
    def run(i: list[Any], a: dict) -> list[Tensor]:
        y = i[0]
        for x in i[1:]:
            y = fn(y, x)
        return [y]
    return run


def _reduce_l2(i: list[Any], a: dict) -> list[Tensor]:
    x = i[0]
    axes = _axes(i, a)
    if not axes:
        axes = list(range(x.dim()))
    return [torch.sqrt((x * x).sum(dim=axes, keepdim=bool(a.get("keepdims", 1))))]


def _pad(i: list[Any], a: dict) -> list[Tensor]:
    x = i[0]
    pads = _ints(i[1]) if len(i) > 1 and i[1] is not None else list(a.get("pads", []))
    value = float(i[2].reshape(-1)[0]) if len(i) > 2 and i[2] is not None and i[2].numel() else float(a.get("value", 0.0))
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(x.dim()))
    axes = [d % x.dim() for d in axes]
    n = len(axes)
    begin, end = [0] * x.dim(), [0] * x.dim()
    for k, ax in enumerate(axes):
        begin[ax], end[ax] = pads[k], pads[n + k]
    mode = a.get("mode", "constant")
    flat = _torch_pad(begin, end)
    if mode == "constant":
        return [F.pad(x, flat, mode="constant", value=value)]
    # reflect / replicate / wrap: torch pads only the trailing 1-3 axes, given as few pairs as needed
    first = next((k for k in range(x.dim()) if begin[k] or end[k]), x.dim())
    if first == x.dim():
        return [x]
    if x.dim() - first > 3:
        raise UsageError(f"Pad mode {mode} over more than the last 3 axes is not supported for fine-tuning")
    flat = flat[: 2 * (x.dim() - first)]
    torch_mode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    y = x
    while y.dim() < x.dim() - first + 1:  # torch wants k+1 or k+2 axes to pad the last k
        y = y.unsqueeze(0)
    out = F.pad(y, flat, mode=torch_mode)
    return [out.reshape(out.shape[y.dim() - x.dim():])]


def _identity(i: list[Any], a: dict) -> list[Tensor]:
    return [i[0]] + ([torch.ones_like(i[0], dtype=torch.bool)] if a.get("_n_outputs", 1) > 1 else [])


HANDLERS: dict[str, Handler] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _binary(torch.pow),
    "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh), "Erf": _unary(torch.erf),
    "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal), "Gelu": _gelu,
    "LeakyRelu": lambda i, a: [F.leaky_relu(i[0], a.get("alpha", 0.01))],
    "HardSigmoid": lambda i, a: [torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0, 1)],
    "HardSwish": _unary(F.hardswish),
    "Clip": _clip, "BatchNormalization": _batchnorm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda i, a: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda i, a: [i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "Flatten": _flatten, "Reshape": _reshape,
    "Concat": lambda i, a: [torch.cat(list(i), dim=a["axis"])],
    "Transpose": lambda i, a: [i[0].permute(a["perm"]) if "perm" in a else i[0].permute(*reversed(range(i[0].dim())))],
    "Softmax": _softmax(False), "LogSoftmax": _softmax(True), "LayerNormalization": _layernorm,
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"), "ReduceMin": _reduce("min"),
    "Identity": _identity, "Dropout": _identity,
    "Shape": _shape, "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Expand": _expand,
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Slice": _slice, "Split": _split, "Cast": _cast,
    "GRU": _gru, "LSTM": _lstm,
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge), "LessOrEqual": _binary(torch.le),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Not": _unary(torch.logical_not),
    "Where": lambda i, a: [torch.where(i[0].bool(), i[1], i[2])], "ReduceL2": _reduce_l2, "Pad": _pad,
}


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for at in node.attribute:
        v = helper.get_attribute_value(at)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, onnx.TensorProto):
            v = torch.from_numpy(numpy_helper.to_array(v).copy())
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [s.decode() for s in v]
        out[at.name] = v
    out["_n_outputs"] = len(node.output)
    return out


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types (with non-default domains named) that ``OnnxModule`` cannot run."""
    bad = set()
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            bad.add(f"{n.domain}.{n.op_type}")
        elif n.op_type not in HANDLERS:
            bad.add(n.op_type)
    return sorted(bad)


_RNN_DEFAULT_ACTS = {"GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}


class OnnxModule(nn.Module):
    """Evaluates an ONNX graph with torch ops; float initializers are trainable parameters."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        bad = unsupported_ops(model)
        if bad:
            raise UsageError(f"cannot convert the ONNX model to torch: unsupported op(s) {', '.join(bad)}",
                             hint=f"supported: {', '.join(sorted(HANDLERS))}")
        g = model.graph
        for n in g.node:
            if n.op_type in _RNN_DEFAULT_ACTS:
                acts = [s.decode() for s in next((a.strings for a in n.attribute if a.name == "activations"), [])]
                if acts and acts[:len(_RNN_DEFAULT_ACTS[n.op_type])] != _RNN_DEFAULT_ACTS[n.op_type]:
                    raise UsageError(f"{n.op_type} node {n.name!r} with activations {acts} is not supported")
        init_names = {t.name for t in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in init_names]
        self.output_names = [o.name for o in g.output]
        frozen = {n.input[k] for n in g.node for k in range(len(n.input)) if (n.op_type, k) in _NOT_TRAINABLE}
        self.params = nn.ParameterDict()
        self.key_of: dict[str, str] = {}  # onnx initializer name -> attribute key
        self.trainable: dict[str, str] = {}  # onnx initializer name -> key in self.params
        for j, t in enumerate(g.initializer):
            arr = numpy_helper.to_array(t).copy()
            key = f"t{j}"
            ten = torch.from_numpy(arr) if arr.dtype != np.uint16 else torch.from_numpy(arr.astype(np.float32))
            if ten.is_floating_point() and ten.numel() > 1 and t.name not in frozen:
                self.params[key] = nn.Parameter(ten)
                self.trainable[t.name] = key
            else:
                self.register_buffer(f"c_{key}", ten, persistent=False)
            self.key_of[t.name] = key
        follow = batch_1_reshapes(model)
        self.nodes = [(n.op_type, list(n.input), list(n.output),
                       {**_attrs(n), _BATCH_DIM0: follow[n.output[0]]} if n.op_type == "Reshape" and n.output[0] in follow
                       else _attrs(n),
                       n.name) for n in g.node]

    def tensor(self, onnx_name: str) -> Tensor:
        key = self.key_of[onnx_name]
        return self.params[key] if onnx_name in self.trainable else getattr(self, f"c_{key}")

    def named_onnx_parameters(self) -> dict[str, nn.Parameter]:
        return {name: self.params[key] for name, key in self.trainable.items()}

    def forward(self, *args: Tensor, **kwargs: Tensor):
        env: dict[str, Any] = {"": None}
        for name, v in zip(self.input_names, args):
            env[name] = v
        env.update(kwargs)
        missing = [n for n in self.input_names if n not in env]
        if missing:
            raise UsageError(f"missing input(s) {missing}")
        for name in self.key_of:
            if name not in env:
                env[name] = self.tensor(name)
        for op, ins, outs, attrs, name in self.nodes:
            try:
                res = HANDLERS[op]([env[i] for i in ins], attrs)
            except UsageError:
                raise
            except Exception as exc:
                raise RuntimeError(f"{op} node {name!r}: {type(exc).__name__}: {exc}") from exc
            for o, r in zip(outs, res):
                if o:
                    env[o] = r
        res = tuple(env[o] for o in self.output_names)
        return res[0] if len(res) == 1 else res

    @torch.no_grad()
    def state_arrays(self) -> dict[str, np.ndarray]:
        """Current values of the trainable initializers, by ONNX name."""
        return {name: p.detach().cpu().numpy().copy() for name, p in self.named_onnx_parameters().items()}

    def write_back(self, graph: Any) -> int:
        """Copy the trained values into an onnx-graphsurgeon graph's constants of the same names
        (dtype kept); returns how many constants were written."""
        import onnx_graphsurgeon as gs

        consts = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
        n = 0
        for name, arr in self.state_arrays().items():
            c = consts.get(name)
            if c is None:
                raise UsageError(f"write_back: graph has no constant {name!r}")
            old = np.asarray(c.values)
            if old.shape != arr.shape:
                raise UsageError(f"write_back: {name!r} has shape {list(old.shape)} in the graph, {list(arr.shape)} trained")
            c.values = arr.astype(old.dtype)
            n += 1
        return n


def convert(model: onnx.ModelProto | str | Path) -> OnnxModule:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    return OnnxModule(model)


def export_onnx(module: OnnxModule, example: dict[str, np.ndarray], path: Path | str, opset: int = 17) -> None:
    """Re-export with torch.onnx.export (TorchScript exporter, dynamo=False) under the
    original input/output names and the example inputs' shapes."""
    import warnings

    args = tuple(torch.from_numpy(np.asarray(example[n])) for n in module.input_names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is asked for on purpose
        torch.onnx.export(module, args, str(path), input_names=module.input_names, output_names=module.output_names,
                          opset_version=opset, dynamo=False, do_constant_folding=True)
