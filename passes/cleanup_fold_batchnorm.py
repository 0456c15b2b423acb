"""``cleanup.fold_batchnorm``: fold inference BatchNormalization into the
preceding Conv / ConvTranspose / Gemm.

BN computes y = gamma * (x - mean) / sqrt(var + eps) + beta, per channel c.
With s_c = gamma_c / sqrt(var_c + eps), a producer z = W x + b becomes
    W'[c] = s_c * W[c],   b'_c = s_c * (b_c - mean_c) + beta_c
(for Gemm, Y = alpha*A*B + beta*C: B' scales the output column, C' absorbs beta*C).
Folding needs: constant BN parameters and producer weights, the producer's
output read only by the BN, BN in inference mode. BNs that cannot be folded
are left in place and listed in the pass warnings.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compressor.pass_base import Pass, PassContext, PassResult


def _const(t) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _bn_scale_shift(bn: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    params = [_const(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params) or len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    s = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    return s, beta - mean * s


def _fold_into(prod: gs.Node, s: np.ndarray, shift: np.ndarray, graph: gs.Graph) -> str | None:
    """Rewrite the producer's constants; returns a reason string when it cannot."""
    w = _const(prod.inputs[1]) if len(prod.inputs) > 1 else None
    if w is None or w.dtype.kind != "f":
        return "producer weight is not a float constant"
    if len(prod.inputs[1].outputs) > 1:
        return "producer weight is shared with another node"
    c = s.shape[0]
    bias = _const(prod.inputs[2]) if len(prod.inputs) > 2 and prod.inputs[2].name else None
    if len(prod.inputs) > 2 and prod.inputs[2].name and bias is None:
        return "producer bias is not constant"
    if bias is not None and len(prod.inputs[2].outputs) > 1:
        return "producer bias is shared with another node"
    if prod.op == "Conv":
        if w.shape[0] != c:
            return "channel count mismatch"
        w_new = w * s.reshape((c,) + (1,) * (w.ndim - 1))
        b = np.zeros(c) if bias is None else bias.astype(np.float64)
    elif prod.op == "ConvTranspose":
        g = int(prod.attrs.get("group", 1))
        if g != 1 or w.shape[1] != c:
            return "grouped ConvTranspose"
        w_new = w * s.reshape((1, c) + (1,) * (w.ndim - 2))
        b = np.zeros(c) if bias is None else bias.astype(np.float64)
    else:  # Gemm
        if prod.attrs.get("transA", 0) or w.ndim != 2:
            return "Gemm with transA"
        trans_b = int(prod.attrs.get("transB", 0))
        if (w.shape[0] if trans_b else w.shape[1]) != c:
            return "channel count mismatch"
        alpha, beta = float(prod.attrs.get("alpha", 1.0)), float(prod.attrs.get("beta", 1.0))
        w_new = (w * alpha) * (s.reshape(c, 1) if trans_b else s.reshape(1, c))
        prod.attrs["alpha"] = 1.0
        if bias is None:
            b = np.zeros(c)
        else:
            if bias.size not in (1, c):
                return "Gemm bias is not per-channel"
            b = np.broadcast_to(bias.astype(np.float64) * beta, (c,)).copy()
        prod.attrs["beta"] = 1.0
    b_new = s * b + shift
    prod.inputs[1] = gs.Constant(prod.inputs[1].name + "_bnfold", w_new.astype(w.dtype))
    b_const = gs.Constant(prod.name + "_bias_bnfold", b_new.astype(w.dtype))
    if len(prod.inputs) > 2:
        prod.inputs[2] = b_const
    else:
        prod.inputs.append(b_const)
    return None


class FoldBatchNorm(Pass):
    name = "cleanup.fold_batchnorm"
    description = "fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        folded, kept = 0, []
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            x = bn.inputs[0]
            prod = x.inputs[0] if x.inputs else None
            reason = None
            ss = _bn_scale_shift(bn)
            if ss is None:
                reason = "BN parameters not constant or training mode"
            elif prod is None or prod.op not in ("Conv", "ConvTranspose", "Gemm"):
                reason = f"preceded by {prod.op if prod else 'a graph input'}"
            elif len(x.outputs) != 1 or x in graph.outputs:
                reason = "producer output has other readers"
            else:
                reason = _fold_into(prod, ss[0], ss[1], graph)
            if reason:
                kept.append(f"{bn.name}: {reason}")
                continue
            out = bn.outputs[0]
            bn.inputs.clear()
            bn.outputs.clear()
            prod.outputs[0] = out
            folded += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        return PassResult(folded > 0, {"folded": folded, "kept": len(kept)}, [f"BatchNormalization kept: {k}" for k in kept])
