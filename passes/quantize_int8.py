"""``quantize.int8``: 8-bit integer quantization with onnxruntime's quantization tools.

Affine quantization maps a real tensor x to integers q with a scale s and a zero
point z: ``q = clamp(round(x / s) + z, qmin, qmax)``, ``x ~ (q - z) * s``.

What is quantized (``op_types``, default ``[Conv, Gemm, MatMul]``): only the
weight-carrying layers -- Conv, Gemm and MatMul whose weight is a constant.
Their weights get per-output-channel symmetric scales (``per_channel``: one scale
per Conv filter / Gemm row / MatMul column, z = 0, s = max|w| / 127); their
activation inputs (and outputs, so onnxruntime can fuse DQ -> Conv -> Q into
QLinearConv) get a QDQ pair. Every other op (Add, Mul, Softmax, LayerNorm,
Gather, activation x activation MatMuls in attention, ...) stays float: one
outlier-heavy residual stream quantized per tensor is what collapsed real models
(a file-type classifier to 3-7% agreement, a sentence encoder to cosine 0.37
with every op type quantized). ``op_types: [all]`` restores "every op
onnxruntime can quantize".

* **static** (calibration data given, ``mode`` static/auto): the float model
  is run on calibration samples to collect activation ranges (MinMax:
  observed min/max; Entropy: the range minimising the KL divergence between the
  float and the quantized histogram; Percentile: the 99.999th percentile of
  |x|), then QuantizeLinear/DequantizeLinear pairs are inserted (QDQ format).
  ``calib_method: auto`` (default) picks the method on the data: the
  calibration samples are split 3/4 for ranges and 1/4 held out; each method
  quantizes the model, the one whose outputs are closest to the float model on
  the held-out samples (min cosine over outputs) wins; all scores go to the
  stats. Ranges are computed once per method (cached) and reused by every
  quantization the pass tries.
* **MatMul precision** (``matmul``, default auto): in a model with attention
  (Softmax, LayerNormalization, or a MatMul of two activations) the weight
  MatMuls are tried both static (QDQ, calibrated ranges) and dynamic (weights
  per-channel offline, the activation's scale computed per run:
  DynamicQuantizeLinear -> MatMulInteger); dynamic is kept when it removes at
  least 10% of the static output error on held-out samples (transformer
  activations vary per input; a static range fits none), static otherwise.
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

Mixed precision (``keep_fp32``, default auto: active whenever calibration data is
given; ``none`` quantizes every candidate layer): the stem conv (<= 4 input
channels), depthwise convs and the final layer are kept fp32, then the layers
whose individual quantization costs most output cosine, until the model reaches
``min_cosine`` on held-out samples (``passes.quant_common.keep_fp32_search``).
Every layer left fp32 -- kept, blocked by ``op_block_list``, or skipped by
onnxruntime -- is a warning and a row of ``stats["fp32_layers"]``. Zero weights
stay exactly zero (symmetric weights: round(0 / s) = 0); the pass checks it per
weight and reports sparsity after quantization.
"""
from __future__ import annotations

import fnmatch

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from compressor import ir
from compressor.errors import PassError, UsageError
from compressor.pass_base import Pass, PassContext, PassResult
from passes import quant_common as qc

log = logging.getLogger(__name__)

CALIB_METHODS = ("minmax", "entropy", "percentile")
MODES = ("auto", "static", "dynamic")
WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
ENTROPY_BINS = 512  # histogram bins of the entropy (KL) calibration
DYNAMIC_MARGIN = 0.1  # dynamic weight MatMuls need 10% less output error than static to be chosen
HELD_OUT_FRACTION = 4  # calibration samples: 1/4 held out to score choices, 3/4 for ranges


@dataclass(frozen=True)
class Int8Config:
    mode: str = "auto"  # auto: static with calibration data, dynamic without
    calib_method: str = "auto"  # auto (best on held-out calibration samples) | minmax | entropy | percentile
    per_channel: bool = True  # per-output-channel weight scales
    op_types: tuple[str, ...] = WEIGHT_OPS  # weight ops quantized; [all]: every op type onnxruntime quantizes
    matmul: str = "auto"  # weight MatMuls of a static model: auto (attention models: static or dynamic, measured) | static | dynamic
    keep_fp32: str = "auto"  # auto: with calibration data, sensitive layers stay fp32; none: every candidate quantized
    min_cosine: float = 0.995  # output fidelity target of keep_fp32=auto (min cosine vs fp32 over outputs)
    op_block_list: tuple[str, ...] = ()  # op types never quantized (e.g. ["Conv"] for dynamic mode)
    ignore: tuple[str, ...] = ()  # node/weight name globs kept fp32 (--ignore)

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"quantize.int8 mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.calib_method not in ("auto",) + CALIB_METHODS:
            raise UsageError(f"quantize.int8 calib_method must be auto, {', '.join(CALIB_METHODS)}, got {self.calib_method!r}")
        if self.keep_fp32 not in ("none", "auto"):
            raise UsageError(f"quantize.int8 keep_fp32 must be none or auto, got {self.keep_fp32!r}")
        if self.matmul not in MODES:
            raise UsageError(f"quantize.int8 matmul must be one of {', '.join(MODES)}, got {self.matmul!r}")
        if not self.op_types or (self.op_types != ("all",) and not set(self.op_types) <= set(WEIGHT_OPS)):
            raise UsageError(f"quantize.int8 op_types must be a subset of {list(WEIGHT_OPS)} or [all], got {list(self.op_types)}")
        if not 0.0 < self.min_cosine <= 1.0:
            raise UsageError(f"quantize.int8 min_cosine must be in (0, 1], got {self.min_cosine}")

    @property
    def all_ops(self) -> bool:
        return self.op_types == ("all",)


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


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def transformer_like(graph: gs.Graph) -> bool:
    """Attention in the graph: Softmax, LayerNormalization, or a MatMul of two activations."""
    for n in graph.nodes:
        if n.op in ("Softmax", "LayerNormalization", "Attention", "MultiHeadAttention"):
            return True
        if n.op == "MatMul" and len(n.inputs) == 2 and not any(isinstance(t, gs.Constant) for t in n.inputs):
            return True
    return False


@dataclass(frozen=True)
class Plan:
    """One way to quantize the candidate layers: calibration method of the static part, and
    whether the weight MatMuls go static (QDQ) or dynamic (MatMulInteger)."""
    method: str
    matmul: str  # static | dynamic


class Int8Quantizer:
    """Builds quantized copies of one float model for any subset of its candidate layers.

    Activation ranges are computed once per calibration method (onnxruntime's calibration cache
    file) on ``range_feeds`` and reused, so each further quantization is a graph rewrite only.
    ``build(plan, only, exclude)``: ``only=None`` quantizes every candidate but ``exclude``;
    ``only=[name]`` just that layer (with ``op_types: [all]``, ``only=None`` quantizes every op
    onnxruntime can, except the ``exclude`` layers).
    """

    def __init__(self, model: onnx.ModelProto, scheme: Int8Scheme, cfg: Int8Config, candidates: list[str],
                 matmuls: set[str], range_feeds: list[dict], workdir: Path, gemms: set[str] = frozenset()):
        self.model, self.scheme, self.cfg, self.gemms = model, scheme, cfg, set(gemms)
        self.candidates, self.matmuls, self.range_feeds = candidates, matmuls, range_feeds
        self.dir = workdir
        self.src = workdir / "float.onnx"
        ir.save_model(model, self.src)  # streamed; weights in float.onnx.data above ir.SINGLE_FILE_MAX
        self.large = ir.model_bytes(model) > ir.SINGLE_FILE_MAX  # onnxruntime's quantizer then writes external data too
        self.blocked = [n.name for n in model.graph.node if n.op_type in cfg.op_block_list]
        self.builds = 0

    def _op_types(self) -> list[str] | None:
        if self.cfg.all_ops:
            return list(self.scheme.op_types) if self.scheme.op_types else None
        return list(self.cfg.op_types)

    def ranges(self, method: str) -> Path:
        """onnxruntime calibration cache of ``method`` on the range samples (computed on first use).

        Entropy uses 512 histogram bins (onnxruntime's default of 128 bins for 128 quantized bins
        leaves the KL search a single candidate, the min/max range)."""
        from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

        cache = self.dir / f"ranges-{method}.json"
        if cache.is_file():
            return cache
        opts = {"entropy": {"num_bins": ENTROPY_BINS, "num_quantized_bins": 128}}.get(method, {})
        ops = self._op_types()
        with qc.quiet_ort_quantization():
            cal = create_calibrator(self.src, ops, augmented_model_path=str(self.dir / f"augmented-{method}.onnx"),
                                    calibrate_method=_calibration_method(method), extra_options=opts)
            cal.collect_data(qc.as_reader(self.range_feeds))
            save_tensors_data(cal.compute_data(), cache)
            del cal
        return cache

    def _static(self, src: Path, dst: Path, method: str, nodes: list[str] | None, exclude: list[str]) -> None:
        from onnxruntime.quantization import QuantFormat, quantize_static

        cache = self.ranges(method)
        with qc.quiet_ort_quantization():
            quantize_static(
                str(src), str(dst), None, quant_format=QuantFormat.QDQ, per_channel=self.cfg.per_channel,
                reduce_range=self.scheme.reduce_range, activation_type=_qtype(self.scheme.activation),
                weight_type=_qtype(self.scheme.weight), calibrate_method=_calibration_method(method),
                nodes_to_quantize=nodes, nodes_to_exclude=exclude + self.blocked, op_types_to_quantize=self._op_types(),
                calibration_cache_path=str(cache), use_external_data_format=self.large,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": self.scheme.symmetric_activations,
                               "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}},
            )

    def _dynamic(self, src: Path, dst: Path, nodes: list[str] | None, exclude: list[str], op_types: list[str] | None) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        if nodes is not None:  # the dynamic quantizer rewrites Gemm X as MatMul "X_MatMul" + Add first
            nodes = list(nodes) + [f"{n}_MatMul" for n in nodes if n in self.gemms]
            if op_types is not None and "Gemm" in op_types:
                op_types = sorted(set(op_types) | {"MatMul"})
        exclude = list(exclude) + [f"{n}_MatMul" for n in exclude if n in self.gemms]
        with qc.quiet_ort_quantization():
            quantize_dynamic(
                str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=self.scheme.reduce_range,
                per_channel=self.cfg.per_channel, nodes_to_quantize=nodes, nodes_to_exclude=exclude + self.blocked,
                op_types_to_quantize=op_types, extra_options={"MatMulConstBOnly": True},
                use_external_data_format=self.large,
            )

    def build(self, plan: Plan | None, only: list[str] | None, exclude: list[str]) -> onnx.ModelProto:
        """plan None: dynamic quantization of everything (no calibration data)."""
        self.builds += 1
        sel = [c for c in (only if only is not None else self.candidates) if c not in exclude]
        dyn = [] if plan is None else [c for c in sel if plan.matmul == "dynamic" and c in self.matmuls]
        stat = [c for c in sel if c not in dyn] if plan is not None else []
        if not sel and not (self.cfg.all_ops and only is None):
            return self.model
        d = Path(tempfile.mkdtemp(prefix="q", dir=self.dir))
        try:
            cur = self.src
            if plan is None:
                nodes = None if self.cfg.all_ops and only is None else sel
                op_types = self._op_types() if not self.cfg.all_ops else (list(self.scheme.op_types) if self.scheme.op_types else None)
                self._dynamic(cur, d / "dyn.onnx", nodes, list(exclude), op_types)
                return onnx.load(d / "dyn.onnx")
            if self.cfg.all_ops and only is None:
                # every op type onnxruntime quantizes (static), but the layers excluded / going dynamic
                self._static(cur, d / "static.onnx", plan.method, None, list(exclude) + dyn)
                cur = d / "static.onnx"
            elif stat:  # never an empty list: onnxruntime reads nodes_to_quantize=[] as "every node"
                self._static(cur, d / "static.onnx", plan.method, stat, [])
                cur = d / "static.onnx"
            if dyn:
                self._dynamic(cur, d / "dyn.onnx", dyn, [], ["MatMul"])
                cur = d / "dyn.onnx"
            return onnx.load(cur)
        finally:
            shutil.rmtree(d, ignore_errors=True)


def split_feeds(feeds: list[dict]) -> tuple[list[dict], list[dict]]:
    """(range samples, held-out scoring samples): the last quarter is held out (all of them
    score and calibrate when there are fewer than 4 samples)."""
    n = len(feeds)
    if n < HELD_OUT_FRACTION:
        return feeds, feeds
    k = max(1, n // HELD_OUT_FRACTION)
    return feeds[: n - k], feeds[n - k:][: qc.SENSITIVITY_SAMPLES]


class QuantizeInt8(Pass):
    name = "quantize.int8"
    description = ("int8 quantization (onnxruntime): weight layers per-channel; static QDQ with calibration data "
                   "(method, MatMul mode and fp32 layers chosen on held-out samples), dynamic without")
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
        all_layers = qc.weight_layers(graph)
        op_of = {n.name: n.op for n, _ in all_layers}
        weight_of = {n.name: w.name for n, w in all_layers}
        wanted = WEIGHT_OPS if cfg.all_ops else cfg.op_types
        ignored = [n for n in op_of if any(fnmatch.fnmatchcase(n, g) or fnmatch.fnmatchcase(weight_of[n], g) for g in cfg.ignore)]
        layers = [n for n in op_of if op_of[n] in wanted and op_of[n] not in cfg.op_block_list and n not in ignored]
        convs = [n for n in layers if op_of[n] == "Conv"]
        matmuls = {n for n in layers if op_of[n] == "MatMul"}
        if not layers:
            warnings.append("no Conv/Gemm/MatMul layer with constant float weights: nothing quantized")
            return PassResult(False, {"mode": mode, "quantized_ops": {}}, warnings)

        auto_keep = cfg.keep_fp32 == "auto" and bool(feeds)
        choosing = mode == "static" and (cfg.calib_method == "auto" or cfg.matmul == "auto")
        split = auto_keep or choosing
        range_feeds, score_feeds = split_feeds(feeds) if split else (feeds, feeds[:qc.SENSITIVITY_SAMPLES])
        held_out = len(score_feeds) if split and score_feeds is not range_feeds else 0
        choice: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(prefix="compressor-int8-") as tmp:
            qz = Int8Quantizer(model, scheme, cfg, layers, matmuls, range_feeds, Path(tmp),
                               gemms={n for n in layers if op_of[n] == "Gemm"})
            forced = qc.structural_sensitive_layers(graph, layers) if auto_keep else {}
            if mode == "static":
                plan, choice = self._choose_plan(qz, graph, model, forced, score_feeds, warnings)
            else:
                plan = None
                why = "no calibration data" if cfg.mode == "auto" else "mode=dynamic"
                warnings.append(f"{why}: dynamic int8 quantization (weights offline, activation scales computed at "
                                "run time); pass --calib data.npz for static per-channel QDQ")
                if convs:
                    warnings.append(
                        f"SLOW: dynamic int8 turns {len(convs)} Conv layer(s) into ConvInteger, which onnxruntime's x86 CPU "
                        "kernels run 2-20x slower than float Conv; give calibration data (--calib) for static QDQ (the fast "
                        "path), or keep convs float with op_block_list: [Conv]")
            quantize = lambda only, exclude: qz.build(plan, only, exclude)  # noqa: E731
            result, mixed = qc.quantize_with_keep_fp32(quantize, layers, model, score_feeds, cfg.keep_fp32,
                                                       cfg.min_cosine, warnings, forced)
            builds = qz.builds

        ops = qc.quantized_op_counts(result)
        zeros = qc.zero_preservation(before, result, self.name)
        fp32_rows = self._fp32_layers(op_of, weight_of, layers, mixed, zeros, cfg, mode, warnings, set(ignored))
        eff_ops = (list(scheme.op_types) if scheme.op_types else "all supported") if cfg.all_ops else list(cfg.op_types)
        stats: dict[str, Any] = {
            "mode": mode,
            "format": "QDQ" if mode == "static" else "QOperator (dynamic)",
            "per_channel": cfg.per_channel,
            **({"per_channel_note": "ConvInteger weights are per-tensor (onnxruntime's dynamic Conv)"}
               if mode == "dynamic" and convs and cfg.per_channel else {}),
            "op_types": eff_ops,
            "calibration": ({"method": plan.method, "samples": len(range_feeds), "held_out": held_out,
                             **choice.get("calibration", {})} if mode == "static" else None),
            "matmul": choice.get("matmul") if mode == "static" else ({"mode": "dynamic"} if matmuls else None),
            "scheme": {**scheme.to_dict(), "op_types": eff_ops},
            "isa_features": list(scheme.isa_features),
            "quantized_ops": ops,
            "layers_quantizable": len(layers),
            "layers_quantized": len(zeros["weights"]),
            "fp32_layers": fp32_rows,
            "quantizations_built": builds,
            "initializer_bytes_before": qc.initializer_bytes(model),
            "initializer_bytes_after": qc.initializer_bytes(result),
            "sparsity": zeros,
        }
        if feeds:
            stats["fidelity_min_cosine"] = round(qc.fidelity(qc.run_model(result, score_feeds),
                                                             qc.run_model(model, score_feeds)), 6)
            stats["fidelity_samples"] = len(score_feeds)
        if mixed is not None:
            stats["keep_fp32"] = mixed.stats(cfg.min_cosine)
        qc.replace_graph(graph, result)
        return PassResult(bool(ops), stats, warnings)

    def _choose_plan(self, qz: Int8Quantizer, graph: gs.Graph, model: onnx.ModelProto, forced: dict[str, str],
                     score_feeds: list[dict], warnings: list[str]) -> tuple[Plan, dict[str, Any]]:
        """Calibration method and MatMul mode, each the closest to the float model on held-out samples."""
        cfg: Int8Config = self.config
        methods = CALIB_METHODS if cfg.calib_method == "auto" else (cfg.calib_method,)
        mm_modes = [cfg.matmul] if cfg.matmul != "auto" else ["static"]
        attention = transformer_like(graph)
        if cfg.matmul == "auto" and qz.matmuls and attention:
            mm_modes = ["static", "dynamic"]
        exclude = list(forced)
        if all(c in forced for c in qz.candidates):  # nothing left to quantize: nothing to choose with
            return Plan(methods[0], mm_modes[0]), {"calibration": {"chosen_by": "nothing to choose: every layer kept fp32"}}
        ref = qc.run_model(model, score_feeds)
        score = lambda plan: qc.fidelity(qc.run_model(qz.build(plan, None, exclude), score_feeds), ref)  # noqa: E731
        static_only = [c for c in qz.candidates if c not in qz.matmuls and c not in forced]
        base_mm = mm_modes[0]
        scores: dict[str, float] = {}
        if len(methods) > 1 and (base_mm == "static" or static_only):
            for m in methods:
                scores[m] = score(Plan(m, base_mm))
            method = max(methods, key=lambda m: (scores[m], -methods.index(m)))
            chosen_by = "closest output on held-out calibration samples (min cosine over outputs)"
        else:
            method = methods[0]
            chosen_by = "config" if cfg.calib_method != "auto" else "no static layer: method unused"
        calib = {"chosen_by": chosen_by, "scores": {k: round(v, 6) for k, v in scores.items()}}
        mm: dict[str, Any] | None = None
        matmul = base_mm
        if qz.matmuls:
            mm = {"mode": base_mm, "layers": len(qz.matmuls), "attention": attention}
            if len(mm_modes) > 1:
                mm_scores = {"static": scores.get(method) if base_mm == "static" and method in scores else None}
                if mm_scores["static"] is None:
                    mm_scores["static"] = score(Plan(method, "static"))
                mm_scores["dynamic"] = score(Plan(method, "dynamic"))
                # dynamic costs a DynamicQuantizeLinear per MatMul at run time: taken when it removes at
                # least DYNAMIC_MARGIN of the static output error, not on a tie
                err = {k: 1.0 - v for k, v in mm_scores.items()}
                matmul = "dynamic" if err["dynamic"] <= (1.0 - DYNAMIC_MARGIN) * err["static"] else "static"
                mm.update(mode=matmul, scores={k: round(v, 6) for k, v in mm_scores.items()},
                          chosen_by=f"closest output on held-out calibration samples (dynamic when it removes >= "
                                    f"{DYNAMIC_MARGIN:.0%} of the static error)")
            else:
                mm["chosen_by"] = "config" if cfg.matmul != "auto" else "no attention in the model: static"
        log.info("quantize.int8: calibration %s (%s), matmul %s", method, calib["scores"], matmul)
        return Plan(method, matmul), {"calibration": calib, "matmul": mm}

    @staticmethod
    def _fp32_layers(op_of: dict[str, str], weight_of: dict[str, str], layers: list[str], mixed: Any,
                     zeros: dict[str, Any], cfg: Int8Config, mode: str, warnings: list[str],
                     ignored: set[str] = frozenset()) -> list[dict[str, Any]]:
        """One row per weight layer left fp32, with why; a warning for each one no rule explains."""
        kept = {k["layer"]: k for k in (mixed.kept if mixed is not None else [])}
        quantized = set(zeros["weights"])
        rows: list[dict[str, Any]] = []
        blocked = []
        for name, op in op_of.items():
            if weight_of[name] in quantized:
                continue
            if name in kept:
                k = kept[name]
                rows.append({"layer": name, "op": op, "why": f"keep_fp32 ({k['rule']})", "cosine_if_quantized": k["cosine"],
                             "reason": k["reason"]})
            elif name in ignored:
                rows.append({"layer": name, "op": op, "why": "ignore (--ignore)"})
                warnings.append(f"{name}: kept fp32 (--ignore)")
            elif op in cfg.op_block_list:
                rows.append({"layer": name, "op": op, "why": "op_block_list"})
                blocked.append(name)
            elif op not in (WEIGHT_OPS if cfg.all_ops else cfg.op_types):
                rows.append({"layer": name, "op": op, "why": "op_types"})
                blocked.append(name)
            else:
                rows.append({"layer": name, "op": op, "why": "onnxruntime's quantizer left it float"})
                warnings.append(f"{name}: left fp32: onnxruntime's {mode} quantizer did not quantize this {op}")
        if blocked:
            warnings.append(f"{len(blocked)} layer(s) left fp32 by config (op_types / op_block_list): "
                            + ", ".join(blocked[:5]) + (" ..." if len(blocked) > 5 else ""))
        return rows
