"""``lower.sparse``: rewrite sparse constant-weight Gemm/MatMul and 1x1 Conv layers into BSR ops.

For every ``Gemm`` (transA = 0) and ``MatMul`` whose second input is a constant 2-D float
weight, the weight is written as ``W[n, k]`` (output x input features; MatMul's ``B`` is
``W^T``, Gemm's ``alpha`` is folded into ``W`` and ``beta * C`` into the bias) and stored in
BSR form (:mod:`targets.sparse_kernels`) with block shape

* ``block="auto"``: the largest of 16x1, 8x1, 4x1, 1x4, 1x1 under which the weight's zeros
  are exactly block structured (``detect_block``), i.e. what the sparsifier produced;
* ``block="RxC"``: that shape (blocks holding any non-zero are stored whole).

The node becomes ``compressor::SparseMatMul(X, data, indices, indptr, bias)`` computing
``Y = X @ W^T + bias`` (``compressor::SparseMatMulRelu`` when the node's only consumer is
a ``Relu``, which is folded in; a following ``Add`` of a constant ``[N]`` vector is folded
into ``bias``).

1x1 convolutions (stride 1, no padding, group 1, NCHW ``X [B, I, H, W]``, constant
``W [O, I, 1, 1]``) are a matrix product over channels per pixel,
``Y[b, :, p] = W[O, I] @ X[b, :, p]``: the node becomes
``compressor::SparseConv1x1[Relu](X, data, indices, indptr, bias)`` with ``W[O, I]`` in BSR
form (Conv's bias input as ``bias``, a following ``Relu`` fused). Decision: a dedicated op
rather than ``SparseMatMul`` wrapped in Transpose/Reshape, because NCHW already has every
input channel contiguous over pixels -- the channel-major kernel
(``targets.sparse_kernels.make_conv1x1_primfunc``) streams ``X``'s rows as they are, where a
``[B*H*W, I]`` view would cost two full transposes per layer. Its reference body ends in a
standard ``Conv(X, Unsqueeze(W, [2, 3]), bias)``. Strided, padded, grouped and KxK convs
stay dense with a warning when their weight is sparse enough to be a candidate.

Targets: x86 and aarch64 (CPU kernels) and CUDA (one thread block per block row for
SparseMatMul, one thread per pixel for SparseConv1x1; ``tirx.is_scheduled`` so the cuda
target's dlight rules leave them alone). CUDA decisions use a bandwidth prior, not
measurements (no GPU on the dev host; ``bench/cuda_check.py`` measures on one), and the
CUDA SparseMatMul kernel needs ``R x batch <= 256``.

Why a model-local ONNX function (decision): the op must keep running under onnxruntime so
that the pipeline verifies the *lowered* graph like any other pass output. Both op types
are defined as model-local functions (domain ``compressor``) whose body is a dense
reference built only from standard ops: the block-row id of every stored block is the
``CumSum`` of a ``ScatterElements`` of ones at ``indptr[1:-1]``; ``ScatterND`` places the
blocks into a zero ``[N/R, K/C, R, C]`` tensor (coordinates are unique by construction),
``Transpose`` + ``Reshape`` give ``W``, then ``MatMul(X, W^T) + bias`` (+ ``Relu``).
onnxruntime inlines the function, so verification reads the BSR arrays themselves (a
wrong ``indptr`` changes the outputs). The TVM backend never inlines it: its ONNX importer
gets a converter for the two op types (``targets.tvm_backend.sparse_converters``) that
emits a ``call_tir`` to the hand-written TIR kernel. Requires default-domain opset >= 16
(``ScatterElements`` reduction); below that every layer stays dense with a warning.

Cost model (per layer, decides sparse vs dense): measured ratios ``R90`` of our kernel vs
onnxruntime dense MatMul at 90% sparsity, N = K = 4096 (``bench/sparse_kernels.py`` on
the dev host, AMD EPYC Zen 4 AVX-512, 2 shared cores, conservative values of repeated
runs), by block class and batch::

    t_dense  = N*K*M / DENSE_MACS_PER_S                      (memory-bound GEMV, measured)
    t_sparse = t_dense * (stored_density / 0.1) / R90 + T_CALL
    ratio    = t_dense / t_sparse

1x1 Conv: the same form with ``R90_CONV`` (``bench/sparse_kernels.py --conv1x1``: our
channel-major kernel vs onnxruntime Conv, channels 64..1024, M = H*W in 49..3136, bucketed
by M) and ``DENSE_CONV_MACS_PER_S``; measured at 90% (conservative): unstructured 2-3x,
4x1/8x1 2.8-4x. The sparse time is scaled linearly with stored density, which under-predicts
at lower sparsity (the kernel's fixed cost of streaming X and Y) -- conservative.

A layer is lowered when ``ratio >= min_speedup``; every layer left dense is a warning
with its predicted ratio.

Shared weights: nodes that read the same constant weight (``lower.rnn`` emits one
recurrent ``H_{t-1} @ R^T`` MatMul per time step, all on one ``R^T``) share one set of
BSR ``data``/``indices``/``indptr`` constants (only the fused bias is per node), so an
unrolled S-step GRU stores its recurrent weight once, not S - 1 times. Stats count
``bsr_shared`` nodes that reused another node's arrays.
"""
from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

DOMAIN = "compressor"
OP = "SparseMatMul"
OP_RELU = "SparseMatMulRelu"
OP_CONV = "SparseConv1x1"
OP_CONV_RELU = "SparseConv1x1Relu"
MIN_OPSET = 16

# --- cost model table (see module docstring for how it was measured) ------------------
# R90[block class][batch bucket]: speed-up over onnxruntime dense at 90% sparsity.
R90: dict[str, dict[int, float]] = {
    "1x1": {1: 2.0, 4: 2.0, 16: 1.5},
    "1xC": {1: 2.4, 4: 2.0, 16: 1.5},
    "4x1": {1: 4.0, 4: 4.5, 16: 3.0},
    "8x1": {1: 6.0, 4: 8.0, 16: 5.0},
    "16x1": {1: 7.0, 4: 10.0, 16: 6.0},
}
DENSE_MACS_PER_S = 7.3e9  # onnxruntime dense 4096x4096 GEMV, batch 1 (2.3 ms)
T_CALL = 5e-6  # fixed cost of one sparse kernel call (thread-pool launch), seconds


def block_class(block: tuple[int, int]) -> str:
    r, c = block
    if r == 1:
        return "1x1" if c == 1 else "1xC"
    return "4x1" if r < 8 else ("8x1" if r < 16 else "16x1")


def predicted_ratio(n: int, k: int, m: int, stored_density: float, block: tuple[int, int]) -> float:
    """Predicted onnxruntime-dense time / sparse-kernel time for one layer."""
    table = R90[block_class(block)]
    bucket = 1 if m < 4 else (4 if m < 16 else 16)
    t_dense = n * k * m / DENSE_MACS_PER_S
    t_sparse = t_dense * (max(stored_density, 1e-6) / 0.1) / table[bucket] + T_CALL
    return t_dense / t_sparse


# 1x1 convolutions (NCHW, batch 1), ``bench/sparse_kernels.py --conv1x1`` on the same host:
# our channel-major kernel vs onnxruntime Conv at 90% sparsity, channels 64..1024, by block
# class and pixel-count bucket (M = H*W: < 128 | < 1024 | >= 1024). Conservative: the
# lower values of 0.8/0.9 runs (onnxruntime's Conv timings on the shared cores are noisy
# upwards; we took rows where onnxruntime ran at its typical ~35 GMAC/s).
R90_CONV: dict[str, dict[int, float]] = {
    "1x1": {64: 2.0, 256: 3.0, 1024: 2.5},
    "1xC": {64: 2.0, 256: 3.0, 1024: 2.5},
    "4x1": {64: 4.0, 256: 3.2, 1024: 2.8},
    "8x1": {64: 4.0, 256: 3.0, 1024: 2.8},
    "16x1": {64: 4.0, 256: 3.0, 1024: 2.8},
}
DENSE_CONV_MACS_PER_S = 3.5e10  # onnxruntime 1x1 Conv, 12.8 M MACs in 0.33-0.39 ms (64..512 channels)
# CUDA: no GPU on the dev host, so no measured ratios yet. Prior: a bandwidth-bound kernel
# reaching CUDA_PRIOR_EFFICIENCY of the ideal 1/stored_density speed-up; both sides pay a launch.
# Every CUDA layer record says cost_model="cuda prior"; bench/cuda_check.py measures it.
CUDA_PRIOR_EFFICIENCY = 0.3
CUDA_T_LAUNCH = 5e-6
CUDA_DENSE_MACS_PER_S = 5e11  # order of magnitude of a fp32 GEMV/GEMM on an sm_80 GPU
# the SparseMatMul CUDA kernel keeps R x M partial sums per thread and reduces them through
# [32, R x M] floats of shared memory (48 KiB without opt-in): R x M <= 256
CUDA_MAX_RM = 256


def predict(op: str, n: int, k: int, m: int, bsz: int, stored_density: float, block: tuple[int, int],
            family: str) -> tuple[float, str]:
    """(predicted dense/sparse time ratio, basis) for one layer. ``m``: rows of the SpMM
    (batch for Gemm/MatMul, H*W pixels for a 1x1 Conv with ``bsz`` images)."""
    d = max(stored_density, 1e-6)
    if family == "cuda":
        if op != "Conv" and block[0] * m * bsz > CUDA_MAX_RM:
            return 0.0, f"cuda kernel needs block rows x batch <= {CUDA_MAX_RM}"
        t_work = n * k * m * bsz / CUDA_DENSE_MACS_PER_S
        t_dense = t_work + CUDA_T_LAUNCH  # both paths pay one launch
        t_sparse = t_work * d / CUDA_PRIOR_EFFICIENCY + CUDA_T_LAUNCH
        return t_dense / t_sparse, "cuda prior"
    if op == "Conv":
        table = R90_CONV[block_class(block)]
        bucket = 64 if m < 128 else (256 if m < 1024 else 1024)
        t_dense = n * k * m * bsz / DENSE_CONV_MACS_PER_S
        t_sparse = t_dense * (d / 0.1) / table[bucket] + T_CALL
        return t_dense / t_sparse, "x86 conv1x1 measured"
    return predicted_ratio(n, k, m * bsz, d, block), "x86 measured"


@dataclass(frozen=True)
class LowerSparseConfig:
    block: str = "auto"  # "auto" | "unstructured" | "RxC"
    min_sparsity: float = 0.5  # layers below this fraction of zeros are not considered
    min_speedup: float = 1.2  # predicted ratio needed to lower a layer
    fuse_activation: bool = True
    ignore: tuple[str, ...] = ()

    def __post_init__(self):
        if self.block != "auto":
            from targets.sparse_kernels import parse_block

            try:
                parse_block(self.block)
            except ValueError as exc:
                raise UsageError(f"lower.sparse block: {exc}", hint="use auto, unstructured or RxC, e.g. 8x1") from None
        if not 0.0 <= self.min_sparsity < 1.0:
            raise UsageError(f"min_sparsity must be in [0, 1), got {self.min_sparsity}")
        if self.min_speedup <= 0:
            raise UsageError(f"min_speedup must be > 0, got {self.min_speedup}")


# ------------------------------------------------------------------ reference function


def reference_function(op: str, opset: int) -> onnx.FunctionProto:
    """Dense reference body of ``compressor::<op>`` from standard ops (see module docstring).
    ``SparseConv1x1[Relu]``: ``K`` is X's dim 1 (NCHW) and the end is
    ``Conv(X, Unsqueeze(W, [2, 3]), bias)``."""
    conv = op in (OP_CONV, OP_CONV_RELU)
    i64 = lambda name, vals: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(vals)], vals))
    nodes = [
        i64("c0", [0]), i64("c1", [1]), i64("c2", [2]), i64("c3", [3]), i64("cm1", [-1]),
        helper.make_node("Shape", ["data"], ["dshape"]),
        helper.make_node("Slice", ["dshape", "c0", "c1"], ["nnzb"]),
        helper.make_node("Slice", ["dshape", "c1", "c3"], ["rc"]),
        helper.make_node("Slice", ["dshape", "c1", "c2"], ["r"]),
        helper.make_node("Slice", ["dshape", "c2", "c3"], ["c"]),
        helper.make_node("Shape", ["indptr"], ["ipshape"]),
        helper.make_node("Sub", ["ipshape", "c1"], ["nbr"]),
        helper.make_node("Shape", ["X"], ["xshape"]),
        (helper.make_node("Slice", ["xshape", "c1", "c2"], ["kdim"]) if conv  # channels of NCHW X
         else helper.make_node("Slice", ["xshape", "cm1", "cbig"], ["kdim"])),  # last dim of X
    ]
    nodes.insert(0, i64("cbig", [2**62]))
    nodes += [
        helper.make_node("Div", ["kdim", "c"], ["nbc"]),
        # block-row id of every stored block
        helper.make_node("Add", ["nnzb", "c1"], ["nnzb1"]),
        helper.make_node("ConstantOfShape", ["nnzb1"], ["zeros1"],
                         value=helper.make_tensor("z", TensorProto.INT64, [1], [0])),
        helper.make_node("Slice", ["indptr", "c1", "cm1"], ["starts32"]),
        helper.make_node("Cast", ["starts32"], ["starts"], to=TensorProto.INT64),
        helper.make_node("Shape", ["starts"], ["sshape"]),
        helper.make_node("ConstantOfShape", ["sshape"], ["ones"],
                         value=helper.make_tensor("o", TensorProto.INT64, [1], [1])),
        helper.make_node("ScatterElements", ["zeros1", "starts", "ones"], ["marks"], axis=0, reduction="add"),
        helper.make_node("CumSum", ["marks", "c0"], ["rows1"]),
        helper.make_node("Slice", ["rows1", "c0", "nnzb"], ["rows"]),
        helper.make_node("Cast", ["indices"], ["cols"], to=TensorProto.INT64),
        helper.make_node("Unsqueeze", ["rows", "c1"], ["rows2"]),
        helper.make_node("Unsqueeze", ["cols", "c1"], ["cols2"]),
        helper.make_node("Concat", ["rows2", "cols2"], ["coords"], axis=1),
        helper.make_node("Concat", ["nbr", "nbc", "rc"], ["bshape"], axis=0),
        helper.make_node("ConstantOfShape", ["bshape"], ["bzeros"],
                         value=helper.make_tensor("f", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ScatterND", ["bzeros", "coords", "data"], ["blocks"]),
        helper.make_node("Transpose", ["blocks"], ["blocks_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["nbr", "r"], ["ndim"]),
        helper.make_node("Concat", ["ndim", "kdim"], ["wshape"], axis=0),
        helper.make_node("Reshape", ["blocks_t", "wshape"], ["W"]),
    ]
    if conv:
        nodes += [helper.make_node("Concat", ["c2", "c3"], ["hw_axes"], axis=0),
                  helper.make_node("Unsqueeze", ["W", "hw_axes"], ["W4"])]
        if op == OP_CONV_RELU:
            nodes += [helper.make_node("Conv", ["X", "W4", "bias"], ["pre"]), helper.make_node("Relu", ["pre"], ["Y"])]
        else:
            nodes.append(helper.make_node("Conv", ["X", "W4", "bias"], ["Y"]))
        return helper.make_function(DOMAIN, op, ["X", "data", "indices", "indptr", "bias"], ["Y"], nodes,
                                    [helper.make_opsetid("", opset)])
    nodes += [
        helper.make_node("Transpose", ["W"], ["WT"], perm=[1, 0]),
        helper.make_node("MatMul", ["X", "WT"], ["XW"]),
    ]
    if op == OP_RELU:
        nodes += [helper.make_node("Add", ["XW", "bias"], ["pre"]), helper.make_node("Relu", ["pre"], ["Y"])]
    else:
        nodes.append(helper.make_node("Add", ["XW", "bias"], ["Y"]))
    return helper.make_function(DOMAIN, op, ["X", "data", "indices", "indptr", "bias"], ["Y"], nodes,
                                [helper.make_opsetid("", opset)])


def _ensure_function(graph: gs.Graph, op: str, opset: int) -> None:
    if any(f.name == op and f.domain == DOMAIN for f in graph.functions):
        return
    fproto = reference_function(op, opset)
    tmp = helper.make_model(helper.make_graph([], "tmp", [], []), functions=[fproto],
                            opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)])
    graph.functions.append(gs.import_onnx(tmp).functions[0])
    doms = list(graph.import_domains or [])
    if DOMAIN not in {d.domain for d in doms}:
        doms.append(helper.make_opsetid(DOMAIN, 1))
        graph.import_domains = doms


# ------------------------------------------------------------------ the pass


def _consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def _inferred_shapes(graph: gs.Graph, ctx: PassContext) -> dict[str, list]:
    """Tensor name -> shape from ONNX shape inference on the current graph."""
    if ctx.template is None:
        return {}
    try:
        model = onnx.shape_inference.infer_shapes(ctx.export(graph))
    except Exception as exc:  # pragma: no cover - defensive: shapes then come from the graph
        log.debug("shape inference failed: %s", exc)
        return {}
    out = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return out


def _static_m(x: gs.Tensor, shapes: dict[str, list]) -> int | None:
    shape = getattr(x, "shape", None) or shapes.get(x.name)
    if not shape or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in shape[:-1]):
        return None
    return int(np.prod(shape[:-1])) if len(shape) > 1 else 1


def _conv1x1_weight(node: gs.Node, shapes: dict[str, list]) -> tuple[np.ndarray | None, str | None, list[int] | None]:
    """(W[O, I], why-not, static NCHW input shape) for a Conv node; W None when the node is
    not a lowerable 1x1 convolution (why-not then says why, or is None for a non-candidate)."""
    w = node.inputs[1]
    x = node.inputs[0]
    if not isinstance(w, gs.Constant) or isinstance(x, gs.Constant):
        return None, None, None
    wv = np.asarray(w.values)
    if wv.ndim != 4 or wv.dtype != np.float32:
        return None, None, None
    a = node.attrs
    if tuple(wv.shape[2:]) != (1, 1):
        return None, f"{wv.shape[2]}x{wv.shape[3]} Conv (only 1x1 convolutions have a BSR kernel)", None
    if int(a.get("group", 1)) != 1:
        return None, f"grouped Conv (group={a.get('group')})", None
    if any(int(v) != 1 for v in a.get("strides", [1, 1])):
        return None, f"Conv strides {list(a.get('strides'))}", None
    if any(int(v) != 0 for v in a.get("pads", [0, 0, 0, 0])) or str(a.get("auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
        return None, "padded 1x1 Conv", None
    shape = getattr(x, "shape", None) or shapes.get(x.name)
    if not shape or len(shape) != 4 or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in shape):
        return None, f"input {x.name} has no static NCHW shape", None
    return np.ascontiguousarray(wv[:, :, 0, 0]), None, [int(d) for d in shape]


class LowerSparse(Pass):
    name = "lower.sparse"
    description = ("rewrite sparse constant-weight Gemm/MatMul and 1x1 Conv into compressor::SparseMatMul / "
                   "SparseConv1x1 (BSR) when a cost model predicts a speed-up")
    Config = LowerSparseConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from targets import sparse_kernels as sk

        cfg: LowerSparseConfig = self.config
        warnings: list[str] = []
        layers: list[dict] = []
        if ctx.opset < MIN_OPSET:
            warnings.append(f"lower.sparse: opset {ctx.opset} < {MIN_OPSET} (no onnxruntime reference for the BSR op): all layers kept dense")
            return PassResult(False, {"lowered": 0, "layers": []}, warnings)
        tvm_target = getattr(ctx.target, "tvm_target", None) or "x86"
        family = sk.target_family(tvm_target)
        outputs = {t.name for t in graph.outputs}
        shapes = _inferred_shapes(graph, ctx)
        lowered = 0
        shared = 0
        # (weight name, op, Gemm transB/alpha, block) -> (BSR matrix, [data, indices, indptr] constants)
        bsr_cache: dict[tuple, tuple] = {}
        for node in list(graph.nodes):
            if node.op not in ("Gemm", "MatMul", "Conv") or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            x = node.inputs[0]
            if not isinstance(w, gs.Constant) or isinstance(x, gs.Constant):
                continue
            wv = np.asarray(w.values)
            label = node.name or node.outputs[0].name
            if any(fnmatch.fnmatch(label, p) or fnmatch.fnmatch(w.name, p) for p in cfg.ignore):
                continue
            if wv.dtype != np.float32 or wv.ndim not in (2, 4) or wv.size == 0:
                continue
            zeros = 1.0 - np.count_nonzero(wv) / wv.size
            if zeros < cfg.min_sparsity:
                continue
            bias = None
            conv = node.op == "Conv"
            if conv:
                w_nk, why, xshape = _conv1x1_weight(node, shapes)
                if w_nk is None:
                    if why:
                        warnings.append(f"{label}: kept dense ({why}; {zeros:.0%} zeros)")
                    continue
                bsz, m = xshape[0], xshape[2] * xshape[3]
                if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
                    if not isinstance(node.inputs[2], gs.Constant):
                        warnings.append(f"{label}: Conv with a non-constant bias not lowered, kept dense")
                        continue
                    bias = np.asarray(node.inputs[2].values, dtype=np.float32).reshape(-1).copy()
            elif node.op == "Gemm":
                if wv.ndim != 2:
                    continue
                a = node.attrs
                if int(a.get("transA", 0)) != 0:
                    warnings.append(f"{label}: Gemm transA=1 not lowered, kept dense")
                    continue
                w_nk = wv if int(a.get("transB", 0)) else wv.T
                w_nk = (w_nk * np.float32(a.get("alpha", 1.0))).astype(np.float32)
                if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
                    cin = node.inputs[2]
                    if not isinstance(cin, gs.Constant):
                        warnings.append(f"{label}: Gemm with a non-constant C not lowered, kept dense")
                        continue
                    cv = np.asarray(cin.values, dtype=np.float32) * np.float32(a.get("beta", 1.0))
                    if cv.size not in (1, w_nk.shape[0]) or (cv.ndim == 2 and cv.shape[0] != 1):
                        warnings.append(f"{label}: Gemm C of shape {cv.shape} is not a per-output bias, kept dense")
                        continue
                    bias = np.broadcast_to(cv.reshape(-1), (w_nk.shape[0],)).astype(np.float32)
            else:
                if wv.ndim != 2:
                    continue
                w_nk = np.ascontiguousarray(wv.T)
            n, k = w_nk.shape
            if not conv:
                bsz = 1
                m = _static_m(x, shapes)
                if m is None:
                    warnings.append(f"{label}: input {x.name} has no static shape, kept dense")
                    continue
            if cfg.block == "auto":
                block = sk.detect_block(w_nk)
            else:
                block = sk.parse_block(cfg.block)
                if n % block[0] or k % block[1]:
                    block = (1, 1)
            group = 1 if (conv or family == "cuda") else sk.lanes_group(block, tvm_target)
            key = (w.name, node.op, int(node.attrs.get("transB", 0)), float(node.attrs.get("alpha", 1.0)), block, group)
            cached = bsr_cache.get(key)
            b = cached[0] if cached is not None else sk.to_bsr(w_nk, block, group)
            ratio, basis = predict(node.op, n, k, m, bsz, b.density(), block, family)
            rec = {"node": label, "op": node.op, "shape": [n, k], "batch": m * bsz, "sparsity": round(float(zeros), 4),
                   "block": f"{block[0]}x{block[1]}", "stored_density": round(b.density(), 4),
                   "predicted_ratio": round(ratio, 2), "cost_model": basis}
            if ratio < cfg.min_speedup or b.nnzb == 0:
                rec["lowered"] = False
                layers.append(rec)
                why = "all-zero weight" if b.nnzb == 0 else f"predicted {ratio:.2f}x < {cfg.min_speedup}x ({basis})"
                what = f"1x1 conv {n}x{k}, {bsz}x{m} pixels" if conv else f"{n}x{k}, batch {m}"
                warnings.append(f"{label}: kept dense ({why}; {what}, {zeros:.0%} zeros, block {rec['block']})")
                continue
            # fold a following bias Add (Gemm/MatMul) / Relu
            out = node.outputs[0]
            cons = _consumers(out)
            add_node = None
            if (not conv and bias is None and len(cons) == 1 and cons[0].op == "Add" and out.name not in outputs):
                other = [t for t in cons[0].inputs if t is not out]
                if len(other) == 1 and isinstance(other[0], gs.Constant):
                    ov = np.asarray(other[0].values, dtype=np.float32)
                    if ov.size == n and ov.reshape(-1).shape == (n,) and (ov.ndim == 1 or ov.shape[-1] == n):
                        bias = ov.reshape(-1).copy()
                        add_node = cons[0]
            if bias is None:
                bias = np.zeros(n, np.float32)
            final = add_node.outputs[0] if add_node is not None else out
            op = OP_CONV if conv else OP
            relu_node = None
            fcons = _consumers(final)
            if cfg.fuse_activation and len(fcons) == 1 and fcons[0].op == "Relu" and final.name not in outputs:
                relu_node = fcons[0]
                op = OP_CONV_RELU if conv else OP_RELU
            result = relu_node.outputs[0] if relu_node is not None else final
            _ensure_function(graph, op, ctx.opset)
            pre = f"{label}_bsr"
            if cached is None:
                arrays = [gs.Constant(f"{pre}_data", b.data), gs.Constant(f"{pre}_indices", b.indices),
                          gs.Constant(f"{pre}_indptr", b.indptr)]
                bsr_cache[key] = (b, arrays)
            else:
                arrays = cached[1]
                shared += 1
            consts = [*arrays, gs.Constant(f"{pre}_bias", bias)]
            new = gs.Node(op=op, name=f"{label}_sparse", domain=DOMAIN, inputs=[x, *consts], outputs=[result])
            for dead in (node, add_node, relu_node):
                if dead is not None:
                    dead.outputs.clear()
                    dead.inputs.clear()
            graph.nodes.append(new)
            rec.update(lowered=True, fused=[n_.op for n_ in (add_node, relu_node) if n_ is not None], kernel_op=op,
                       bsr_shared=cached is not None)
            layers.append(rec)
            lowered += 1
        if family == "cuda" and layers:
            warnings.append("lower.sparse: CUDA decisions use a bandwidth prior, not GPU measurements "
                            "(run bench/cuda_check.py on a GPU to measure)")
        if lowered:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {"lowered": lowered, "kept_dense": sum(1 for r in layers if not r["lowered"]), "bsr_shared": shared,
                 "layers": layers}
        return PassResult(lowered > 0, stats, warnings)
