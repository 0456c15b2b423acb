"""``quantize.int8``: 8-bit integer quantization with onnxruntime's quantization tools.

Affine quantization maps a real tensor x to integers q with a scale s and a zero
point z: ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x ~ (q - z) * s``.

* **static** (calibration data given, ``mode`` static/auto): the float model
  is run on the calibration samples to collect activation ranges (MinMax:
  observed min/max; Entropy: the range minimising the KL divergence between the
  float and the quantized histogram; Percentile: the 99.999th percentile of
  |x|), then QuantizeLinear/DequantizeLinear pairs are inserted (QDQ format).
  Weights are quantized per output channel (``per_channel``, one scale per Conv
  filter / Gemm row / MatMul column) and symmetrically (z = 0, s = max|w| / 127).
  onnxruntime fuses DQ -> Conv -> Q into QLinearConv etc. at session creation
  (its fast int8 kernels).
* **dynamic** (no calibration data, ``mode`` dynamic/auto): weights are quantized
  offline; activations get their scale at run time (DynamicQuantizeLinear ->
  ConvInteger/MatMulInteger). No data needed, but on x86 ConvInteger is much
  slower than float Conv (measured 2-20x), so convolutional models without
  calibration data get a loud warning.

Target-aware defaults (``int8_scheme``):
  x86 with VNNI   uint8 activations, int8 weights (u8s8 ``vpdpbusd``)
  x86 without     the same, with ``reduce_range`` (7-bit weights): AVX2's
                  ``vpmaddubsw`` adds two u8*s8 products into int16, which
                  saturates with full 8-bit weights
  aarch64         int8 activations and weights (s8s8, ``sdot`` where present)
  cuda            symmetric int8 activations and weights, QDQ on Conv/Gemm/MatMul
                  inputs only (the layout TensorRT expects for explicit quantization)
The ISA features the int8 kernels use are recorded in the pass stats.

Mixed precision (``keep_fp32: auto``, needs calibration data): see
``passes.quant_common.keep_fp32_search``; the layers kept in fp32 and why are
warnings in the report. Zero weights stay exactly zero (symmetric weights:
round(0 / s) = 0); the pass checks it per weight and reports sparsity after
quantization.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from compressor.errors import PassError, UsageError
from compressor.pass_base import Pass, PassContext, PassResult
from passes import quant_common as qc

log = logging.getLogger(__name__)

CALIB_METHODS = ("minmax", "entropy", "percentile")
MODES = ("auto", "static", "dynamic")


@dataclass(frozen=True)
class Int8Config:
    mode: str = "auto"  # auto: static with calibration data, dynamic without
    calib_method: str = "minmax"  # minmax | entropy | percentile
    per_channel: bool = True  # per-output-channel weight scales (static QDQ)
    keep_fp32: str = "none"  # none | auto: keep the most sensitive layers fp32
    min_cosine: float = 0.995  # output fidelity target of keep_fp32=auto (min cosine vs fp32 over outputs)
    op_block_list: tuple[str, ...] = ()  # op types never quantized (e.g. ["Conv"] for dynamic mode)

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"quantize.int8 mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.calib_method not in CALIB_METHODS:
            raise UsageError(f"quantize.int8 calib_method must be one of {', '.join(CALIB_METHODS)}, got {self.calib_method!r}")
        if self.keep_fp32 not in ("none", "auto"):
            raise UsageError(f"quantize.int8 keep_fp32 must be none or auto, got {self.keep_fp32!r}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise UsageError(f"quantize.int8 min_cosine must be in (0, 1], got {self.min_cosine}")


@dataclass(frozen=True)
class Int8Scheme:
    family: str
    activation: str  # "uint8" | "int8"
    weight: str  # "int8"
    reduce_range: bool
    symmetric_activations: bool
    op_types: tuple[str, ...] | None  # None: every op onnxruntime can quantize
    isa_features: tuple[str, ...]
    kernel: str

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "activations": self.activation, "weights": self.weight,
                "reduce_range": self.reduce_range, "symmetric_activations": self.symmetric_activations,
                "op_types": list(self.op_types) if self.op_types else "all supported",
                "isa_features": list(self.isa_features), "int8_kernel": self.kernel}


def int8_scheme(spec: Any) -> Int8Scheme:
    """Quantization flavour for a target spec (None: onnxruntime's x86/generic defaults)."""
    family = getattr(spec, "family", None)
    isa = tuple(getattr(spec, "isa_features", ()) or ())
    if family == "x86":
        dot = (getattr(spec, "extra", {}) or {}).get("int8_dot")
        if dot:
            return Int8Scheme("x86", "uint8", "int8", False, False, None, (dot,), f"u8s8 {dot} (vpdpbusd)")
        need = tuple(f for f in ("avx2",) if f in isa) or ("sse4_1",)
        return Int8Scheme("x86", "uint8", "int8", True, False, None, need,
                          "u8s8 AVX2 vpmaddubsw; reduce_range (7-bit weights) avoids int16 saturation without VNNI")
    if family == "arm":
        dot = tuple(f for f in ("asimddp", "dotprod") if f in isa)
        return Int8Scheme("arm", "int8", "int8", False, False, None, dot or ("asimd",),
                          "s8s8 " + ("sdot" if dot else "NEON widening multiply-accumulate"))
    if family == "cuda":
        return Int8Scheme("cuda", "int8", "int8", False, True, ("Conv", "Gemm", "MatMul"), isa,
                          "symmetric s8s8 QDQ on Conv/Gemm/MatMul inputs (TensorRT explicit quantization)")
    return Int8Scheme(family or "generic", "uint8", "int8", False, False, None, (), "onnxruntime default u8s8")


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "uint8" else QuantType.QInt8


def quantize_static_model(model: onnx.ModelProto, feeds: list[dict], scheme: Int8Scheme, cfg: Int8Config,
                          only: list[str] | None = None, exclude: list[str] | None = None) -> onnx.ModelProto:
    """onnxruntime ``quantize_static`` (QDQ) on a copy of ``model``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calib_method]
    blocked = [n.name for n in model.graph.node if n.op_type in cfg.op_block_list]
    with tempfile.TemporaryDirectory(prefix="compressor-int8-") as d, qc.quiet_ort_quantization():
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save(model, src)
        quantize_static(
            str(src), str(dst), qc.as_reader(feeds), quant_format=QuantFormat.QDQ, per_channel=cfg.per_channel,
            reduce_range=scheme.reduce_range, activation_type=_qtype(scheme.activation), weight_type=_qtype(scheme.weight),
            calibrate_method=method, nodes_to_quantize=only, nodes_to_exclude=list(exclude or []) + blocked,
            op_types_to_quantize=list(scheme.op_types) if scheme.op_types else None,
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": scheme.symmetric_activations,
                           "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}},
        )
        return onnx.load(dst)


def quantize_dynamic_model(model: onnx.ModelProto, scheme: Int8Scheme, cfg: Int8Config,
                           only: list[str] | None = None, exclude: list[str] | None = None) -> onnx.ModelProto:
    """onnxruntime ``quantize_dynamic`` (weights offline, activations at run time) on a copy of ``model``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    blocked = [n.name for n in model.graph.node if n.op_type in cfg.op_block_list]
    with tempfile.TemporaryDirectory(prefix="compressor-int8d-") as d, qc.quiet_ort_quantization():
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save(model, src)
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=scheme.reduce_range, per_channel=False,
            nodes_to_quantize=only, nodes_to_exclude=list(exclude or []) + blocked,
            op_types_to_quantize=list(scheme.op_types) if scheme.op_types else None,
            extra_options={"MatMulConstBOnly": True},
        )
        return onnx.load(dst)


class QuantizeInt8(Pass):
    name = "quantize.int8"
    description = "int8 quantization (onnxruntime): static per-channel QDQ with calibration data, dynamic without"
    Config = Int8Config

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg: Int8Config = self.config
        warnings: list[str] = []
        scheme = int8_scheme(ctx.target)
        feeds = list(ctx.calib.feeds) if ctx.calib is not None else []
        mode = cfg.mode if cfg.mode != "auto" else ("static" if feeds else "dynamic")
        if mode == "static" and not feeds:
            raise UsageError("quantize.int8 mode=static needs calibration data", hint="pass --calib data.npz, or mode: dynamic")
        model = qc.export_model(graph, ctx)
        opset = qc.domain_opsets(model).get("ai.onnx", 0)
        if opset < 13:
            raise PassError(f"quantize.int8 needs opset >= 13 (per-axis DequantizeLinear), the graph has {opset}")
        before = qc.float_zero_masks(graph)
        layers = [n.name for n, _ in qc.weight_layers(graph) if n.op not in cfg.op_block_list]
        convs = [n.name for n, _ in qc.weight_layers(graph, ("Conv",)) if n.op not in cfg.op_block_list]
        if not layers:
            warnings.append("no Conv/Gemm/MatMul layer with constant float weights: nothing quantized")
            return PassResult(False, {"mode": mode, "quantized_ops": {}}, warnings)

        if mode == "static":
            quantize = lambda only, exclude: quantize_static_model(model, feeds, scheme, cfg, only, exclude)  # noqa: E731
        else:
            quantize = lambda only, exclude: quantize_dynamic_model(model, scheme, cfg, only, exclude)  # noqa: E731
            why = "no calibration data" if cfg.mode == "auto" else "mode=dynamic"
            warnings.append(f"{why}: dynamic int8 quantization (weights offline, activation scales computed at run time, "
                            "per-tensor); pass --calib data.npz for static per-channel QDQ")
            if convs:
                warnings.append(
                    f"SLOW: dynamic int8 turns {len(convs)} Conv layer(s) into ConvInteger, which onnxruntime's x86 CPU "
                    "kernels run 2-20x slower than float Conv; give calibration data (--calib) for static QDQ (the fast "
                    "path), or keep convs float with op_block_list: [Conv]")

        result, mixed = qc.quantize_with_keep_fp32(quantize, layers, model, feeds, cfg.keep_fp32, cfg.min_cosine, warnings)

        ops = qc.quantized_op_counts(result)
        zeros = qc.zero_preservation(before, result, self.name)
        stats: dict[str, Any] = {
            "mode": mode,
            "format": "QDQ" if mode == "static" else "QOperator (dynamic)",
            "per_channel": cfg.per_channel if mode == "static" else False,
            "calibration": {"method": cfg.calib_method, "samples": len(feeds)} if mode == "static" else None,
            "scheme": scheme.to_dict(),
            "isa_features": list(scheme.isa_features),
            "quantized_ops": ops,
            "layers_quantizable": len(layers),
            "initializer_bytes_before": qc.initializer_bytes(model),
            "initializer_bytes_after": qc.initializer_bytes(result),
            "sparsity": zeros,
        }
        if feeds:
            probe = feeds[:qc.SENSITIVITY_SAMPLES]
            stats["fidelity_min_cosine"] = round(qc.fidelity(qc.run_model(result, probe), qc.run_model(model, probe)), 6)
        if mixed is not None:
            stats["keep_fp32"] = mixed.stats(cfg.min_cosine)
        qc.replace_graph(graph, result)
        return PassResult(bool(ops), stats, warnings)
