"""``quantize.int4``: weight-only 4-bit block quantization (com.microsoft.MatMulNBits).

Each MatMul weight W[K, N] (a Gemm's weight is first rewritten to a MatMul,
see below) is split along K into blocks of ``block_size`` values per output
column. Each block b gets its own scale and zero point (asymmetric, the
default: s = (max(b, 0) - min(b, 0)) / 15, z = round(-min(b, 0) / s);
``symmetric``: z = 8 and s from the block's largest magnitude, onnxruntime's MLAS rule) and
4-bit codes q = clamp(round(w / s) + z, 0, 15), packed two per byte (low
nibble first). At run time MatMulNBits computes y = x @ ((q - z) * s).
The round-trip error of every weight is at most s / 2 of its block. 0.0 maps
to q = z exactly, so zero weights stay zero.

Storage per weight: 4 bits + (32-bit scale + 4-bit zero point) / block_size,
i.e. 5.1 bits with block 32 (6.2x smaller than fp32), 4.3 bits with block 128.
Activations stay float: this is for MatMul/Gemm-heavy models (MLPs,
transformers); Conv layers are left float and listed in a warning.

Quantization itself is onnxruntime's ``MatMulNBitsQuantizer`` (RTN, its
DEFAULT algorithm). That tool only handles MatMul, so Gemm(A, B, C) with
alpha = 1 and transA = 0 is first rewritten exactly as MatMul(A, B or B^T)
followed by Add(beta * C).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult
from passes import quant_common as qc

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Int4Config:
    block_size: int = 32  # values of K per scale (power of two, >= 16)
    symmetric: bool = False
    keep_fp32: str = "none"  # none | auto
    min_cosine: float = 0.99  # output fidelity target of keep_fp32=auto
    op_block_list: tuple[str, ...] = ()  # "Gemm" and/or "MatMul": op types left float

    def __post_init__(self):
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UsageError(f"quantize.int4 block_size must be a power of two >= 16, got {self.block_size}")
        if self.keep_fp32 not in ("none", "auto"):
            raise UsageError(f"quantize.int4 keep_fp32 must be none or auto, got {self.keep_fp32!r}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise UsageError(f"quantize.int4 min_cosine must be in (0, 1], got {self.min_cosine}")


def int4_candidate(node: gs.Node) -> str | None:
    """Why a MatMul/Gemm cannot take a 4-bit weight (None: it can)."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "weight is not a constant second input"
    w = np.asarray(node.inputs[1].values)
    if w.dtype != np.float32 or w.ndim != 2:
        return f"weight is {w.dtype} rank {w.ndim}, MatMulNBits takes a 2-D float32 weight"
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0:
            return "Gemm with transA or alpha != 1"
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and not isinstance(c, gs.Constant) and float(node.attrs.get("beta", 1.0)) != 1.0:
            return "Gemm with a non-constant C and beta != 1"
    return None


def gemm_to_matmul(graph: gs.Graph, node: gs.Node) -> None:
    """Rewrite Gemm(A, B, C) (alpha 1, transA 0) in place as MatMul(A, B') [+ Add(beta * C)], B' in [K, N]."""
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 and not (isinstance(node.inputs[2], gs.Variable) and not node.inputs[2].name) else None
    beta = float(node.attrs.get("beta", 1.0))
    w = np.asarray(b.values)
    if int(node.attrs.get("transB", 0)):
        wk = gs.Constant(f"{b.name}__kn", np.ascontiguousarray(w.T))
    else:
        wk = b
    out = node.outputs[0]
    node.op, node.attrs = "MatMul", {}
    node.inputs = [a, wk]
    if c is None:
        return
    if isinstance(c, gs.Constant) and beta != 1.0:
        c = gs.Constant(f"{c.name}_beta", (np.asarray(c.values) * np.float32(beta)).astype(np.asarray(c.values).dtype))
    mid = gs.Variable(f"{node.name}_matmul_out", dtype=out.dtype, shape=out.shape)
    node.outputs = [mid]
    graph.nodes.append(gs.Node("Add", f"{node.name}_bias", inputs=[mid, c], outputs=[out]))


def quantize_int4_model(graph: gs.Graph, ctx: PassContext, cfg: Int4Config, candidates: list[str],
                        only: list[str] | None, exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    chosen = [n for n in (only if only is not None else candidates) if n not in exclude]
    g = graph.copy()
    for node in g.nodes:
        if node.op == "Gemm" and node.name in chosen:
            gemm_to_matmul(g, node)
    model = qc.export_model(g, ctx)
    with qc.quiet_ort_quantization():
        q = MatMulNBitsQuantizer(model, bits=4, block_size=cfg.block_size, is_symmetric=cfg.symmetric,
                                 nodes_to_include=chosen or ["__none__"], op_types_to_quantize=("MatMul",))
        q.process()
    return q.model.model


def int4_weight_bytes(model: onnx.ModelProto) -> tuple[int, int]:
    """(bytes the fp32 weights of the MatMulNBits nodes would take, bytes of codes + scales + zero points)."""
    inits = {t.name: t for t in model.graph.initializer}
    fp32 = packed = 0
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            fp32 += int(attrs["K"]) * int(attrs["N"]) * 4
            packed += sum(numpy_helper.to_array(inits[i]).nbytes for i in n.input[1:] if i in inits)
    return fp32, packed


class QuantizeInt4(Pass):
    name = "quantize.int4"
    description = "weight-only 4-bit block quantization of MatMul/Gemm weights (com.microsoft.MatMulNBits)"
    Config = Int4Config

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: Int4Config = self.config
        warnings: list[str] = []
        candidates = []
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm") or node.op in cfg.op_block_list:
                continue
            why = int4_candidate(node)
            if why is None:
                candidates.append(node.name)
            elif isinstance(node.inputs[1] if len(node.inputs) > 1 else None, gs.Constant) or node.op == "Gemm":
                warnings.append(f"{node.name}: kept float ({why})")
        convs = [n.name for n, _ in qc.weight_layers(graph, ("Conv",))]
        if convs:
            warnings.append(f"{len(convs)} Conv layer(s) kept float: weight-only int4 (MatMulNBits) covers MatMul/Gemm only; "
                            "use --quantize int8 for convolutional models")
        if not candidates:
            warnings.append("no MatMul/Gemm with a constant 2-D float32 weight: nothing quantized to int4")
            return PassResult(False, {"quantized_ops": {}}, warnings)
        before = qc.float_zero_masks(graph)
        float_model = qc.export_model(graph, ctx)
        quantize = lambda only, exclude: quantize_int4_model(graph, ctx, cfg, candidates, only, exclude)  # noqa: E731
        feeds = list(ctx.calib.feeds) if ctx.calib is not None else []
        result, mixed = qc.quantize_with_keep_fp32(quantize, candidates, float_model, feeds, cfg.keep_fp32, cfg.min_cosine, warnings)
        ops = qc.quantized_op_counts(result)
        fp32_b, packed_b = int4_weight_bytes(result)
        stats: dict[str, Any] = {
            "bits": 4, "block_size": cfg.block_size, "symmetric": cfg.symmetric,
            "quantized_ops": ops,
            "layers_quantizable": len(candidates),
            "weight_bytes_fp32": fp32_b, "weight_bytes_int4": packed_b,
            "weight_compression": round(fp32_b / packed_b, 3) if packed_b else None,
            "initializer_bytes_before": qc.initializer_bytes(float_model),
            "initializer_bytes_after": qc.initializer_bytes(result),
            "sparsity": qc.zero_preservation(before, result, self.name),
            "runtime_note": "MatMulNBits is an onnxruntime contrib op (com.microsoft); TVM cannot import it",
        }
        if feeds:
            probe = feeds[:qc.SENSITIVITY_SAMPLES]
            stats["fidelity_min_cosine"] = round(qc.fidelity(qc.run_model(result, probe), qc.run_model(float_model, probe)), 6)
        if mixed is not None:
            stats["keep_fp32"] = mixed.stats(cfg.min_cosine)
        qc.replace_graph(graph, result)
        return PassResult(bool(ops), stats, warnings)
