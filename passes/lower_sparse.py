"""``lower.sparse``: rewrite sparse constant-weight Gemm/MatMul layers into a BSR op.

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

A layer is lowered when ``ratio >= min_speedup``; every layer left dense is a warning
with its predicted ratio.
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
    """Dense reference body of ``compressor::<op>`` from standard ops (see module docstring)."""
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
        helper.make_node("Slice", ["xshape", "cm1", "cbig"], ["kdim"]),  # last dim of X
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


class LowerSparse(Pass):
    name = "lower.sparse"
    description = "rewrite sparse constant-weight Gemm/MatMul into compressor::SparseMatMul (BSR) when a cost model predicts a speed-up"
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
        if sk.target_family(tvm_target) == "cuda":
            warnings.append("lower.sparse: no CUDA lowering of the BSR op in the backend yet: all layers kept dense")
            return PassResult(False, {"lowered": 0, "layers": []}, warnings)
        outputs = {t.name for t in graph.outputs}
        shapes = _inferred_shapes(graph, ctx)
        lowered = 0
        for node in list(graph.nodes):
            if node.op not in ("Gemm", "MatMul") or len(node.inputs) < 2:
                continue
            w = node.inputs[1]
            x = node.inputs[0]
            if not isinstance(w, gs.Constant) or isinstance(x, gs.Constant):
                continue
            wv = np.asarray(w.values)
            if wv.ndim != 2 or wv.dtype != np.float32:
                continue
            label = node.name or node.outputs[0].name
            if any(fnmatch.fnmatch(label, p) or fnmatch.fnmatch(w.name, p) for p in cfg.ignore):
                continue
            zeros = 1.0 - np.count_nonzero(wv) / wv.size
            if zeros < cfg.min_sparsity:
                continue
            bias = None
            if node.op == "Gemm":
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
                w_nk = np.ascontiguousarray(wv.T)
            n, k = w_nk.shape
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
            b = sk.to_bsr(w_nk, block, sk.lanes_group(block, tvm_target))
            ratio = predicted_ratio(n, k, m, b.density(), block)
            rec = {"node": label, "op": node.op, "shape": [n, k], "batch": m, "sparsity": round(float(zeros), 4),
                   "block": f"{block[0]}x{block[1]}", "stored_density": round(b.density(), 4),
                   "predicted_ratio": round(ratio, 2)}
            if ratio < cfg.min_speedup or b.nnzb == 0:
                rec["lowered"] = False
                layers.append(rec)
                why = "all-zero weight" if b.nnzb == 0 else f"predicted {ratio:.2f}x < {cfg.min_speedup}x"
                warnings.append(f"{label}: kept dense ({why}; {n}x{k}, batch {m}, {zeros:.0%} zeros, block {rec['block']})")
                continue
            # fold a following bias Add / Relu
            out = node.outputs[0]
            cons = _consumers(out)
            add_node = None
            if (bias is None and len(cons) == 1 and cons[0].op == "Add" and out.name not in outputs):
                other = [t for t in cons[0].inputs if t is not out]
                if len(other) == 1 and isinstance(other[0], gs.Constant):
                    ov = np.asarray(other[0].values, dtype=np.float32)
                    if ov.size == n and ov.reshape(-1).shape == (n,) and (ov.ndim == 1 or ov.shape[-1] == n):
                        bias = ov.reshape(-1).copy()
                        add_node = cons[0]
            if bias is None:
                bias = np.zeros(n, np.float32)
            final = add_node.outputs[0] if add_node is not None else out
            op = OP
            relu_node = None
            fcons = _consumers(final)
            if cfg.fuse_activation and len(fcons) == 1 and fcons[0].op == "Relu" and final.name not in outputs:
                relu_node = fcons[0]
                op = OP_RELU
            result = relu_node.outputs[0] if relu_node is not None else final
            _ensure_function(graph, op, ctx.opset)
            pre = f"{label}_bsr"
            consts = [gs.Constant(f"{pre}_data", b.data), gs.Constant(f"{pre}_indices", b.indices),
                      gs.Constant(f"{pre}_indptr", b.indptr), gs.Constant(f"{pre}_bias", bias)]
            new = gs.Node(op=op, name=f"{label}_sparse", domain=DOMAIN, inputs=[x, *consts], outputs=[result])
            for dead in (node, add_node, relu_node):
                if dead is not None:
                    dead.outputs.clear()
                    dead.inputs.clear()
            graph.nodes.append(new)
            rec.update(lowered=True, fused=[n_.op for n_ in (add_node, relu_node) if n_ is not None], kernel_op=op)
            layers.append(rec)
            lowered += 1
        if lowered:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        stats = {"lowered": lowered, "kept_dense": sum(1 for r in layers if not r["lowered"]), "layers": layers}
        return PassResult(lowered > 0, stats, warnings)
