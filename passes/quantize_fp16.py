"""``quantize.fp16``: half-precision weights and compute, float32 graph inputs/outputs.

Float32 initializers and value types are converted to IEEE float16 (10-bit
mantissa: relative rounding error <= 2^-11 ~ 4.9e-4; finite range 6.1e-5 ..
65504) by onnxruntime's ``convert_float_to_float16`` (onnxruntime.transformers);
``keep_io_types`` puts a Cast at each graph input and output, so callers keep
feeding and reading float32. Ops in ``op_block_list`` (numerically sensitive:
exponentials, reductions, normalisation; plus the tool's own list of ops with
no fp16 kernels) stay float32 behind Casts. Zero weights stay exactly zero
(0.0 is exact in fp16 and the tool clamps only non-zero values).

Runtime note: onnxruntime's CPU execution provider has fp16 kernels for few ops
and silently inserts Casts to float32 around the others, so on CPU targets fp16
saves bytes on disk, not time; the pass says so in a warning. On CUDA the
kernels run in fp16 (tensor cores).

Mixed precision (``keep_fp32: auto``) blocks the most sensitive Conv/Gemm/MatMul
nodes (``node_block_list``) until the output cosine meets ``min_cosine``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult
from passes import quant_common as qc

log = logging.getLogger(__name__)

SENSITIVE_OPS: tuple[str, ...] = (
    "LayerNormalization", "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Erf",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Resize",
)


@dataclass(frozen=True)
class Fp16Config:
    op_block_list: tuple[str, ...] = SENSITIVE_OPS  # op types kept float32
    keep_fp32: str = "none"  # none | auto
    min_cosine: float = 0.9999  # output fidelity target of keep_fp32=auto

    def __post_init__(self):
        if self.keep_fp32 not in ("none", "auto"):
            raise UsageError(f"quantize.fp16 keep_fp32 must be none or auto, got {self.keep_fp32!r}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise UsageError(f"quantize.fp16 min_cosine must be in (0, 1], got {self.min_cosine}")


def convert_fp16(model: onnx.ModelProto, cfg: Fp16Config, candidates: list[str], only: list[str] | None,
                 exclude: list[str]) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    node_block = list(exclude)
    if only is not None:
        node_block += [n for n in candidates if n not in only]
    with qc.quiet_ort_quantization():
        return convert_float_to_float16(
            onnx.ModelProto.FromString(model.SerializeToString()), keep_io_types=True,
            op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(cfg.op_block_list)), node_block_list=node_block,
        )


class QuantizeFp16(Pass):
    name = "quantize.fp16"
    description = "float16 weights and compute with float32 graph inputs/outputs and an op block-list"
    Config = Fp16Config

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: Fp16Config = self.config
        warnings: list[str] = []
        model = qc.export_model(graph, ctx)
        before = qc.float_zero_masks(graph)
        candidates = [n.name for n, _ in qc.weight_layers(graph) if n.op not in cfg.op_block_list]
        blocked = sorted({n.op for n in graph.nodes if n.op in cfg.op_block_list})
        quantize = lambda only, exclude: convert_fp16(model, cfg, candidates, only, exclude)  # noqa: E731
        feeds = list(ctx.calib.feeds) if ctx.calib is not None else []
        result, mixed = qc.quantize_with_keep_fp32(quantize, candidates, model, feeds, cfg.keep_fp32, cfg.min_cosine, warnings)
        if blocked:
            warnings.append(f"op types kept float32 (op_block_list, numerically sensitive): {', '.join(blocked)}")
        family = getattr(ctx.target, "family", None)
        if family != "cuda":
            warnings.append("fp16 on a CPU target: onnxruntime's CPU provider inserts Casts to float32 around ops without "
                            "fp16 kernels, so expect smaller files, not faster inference (see the latency row)")
        n_fp16 = sum(1 for t in result.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16)
        stats: dict[str, Any] = {
            "fp16_initializers": n_fp16,
            "casts": sum(1 for n in result.graph.node if n.op_type == "Cast"),
            "op_types_blocked": blocked,
            "initializer_bytes_before": qc.initializer_bytes(model),
            "initializer_bytes_after": qc.initializer_bytes(result),
            "io_types_kept": True,
            "sparsity": qc.zero_preservation(before, result, self.name),
        }
        if feeds:
            probe = feeds[:qc.SENSITIVITY_SAMPLES]
            stats["fidelity_min_cosine"] = round(qc.fidelity(qc.run_model(result, probe), qc.run_model(model, probe)), 6)
        if mixed is not None:
            stats["keep_fp32"] = mixed.stats(cfg.min_cosine)
        qc.replace_graph(graph, result)
        return PassResult(n_fp16 > 0, stats, warnings)
