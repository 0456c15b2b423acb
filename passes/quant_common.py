"""Shared helpers of the quantization passes (``quantize.int8``, ``quantize.fp16``,
``quantize.int4``). Not a pass itself.

The passes build on onnxruntime's quantization tooling, which works on model
files / ``ModelProto``s, so each pass exports the graph, quantizes a copy in a
temporary directory and swaps the result back into the ``gs.Graph`` in place
(``replace_graph``).

What lives here:

* **graph round trip** -- ``export_model`` / ``replace_graph`` (the re-imported
  graph carries the new opset domains, e.g. ``com.microsoft`` for MatMulNBits);
* **quantized-op detection** -- ``quantized_op_counts``: the pipeline uses it to
  pick the runtime (TVM's ONNX importer lacks QLinear*/MatMulNBits and would
  dequantize QDQ to float);
* **zero accounting** -- sparsity must survive quantization. A weight entry is
  zero after quantization iff its quantized value equals its zero point
  (dequantized ``(q - zp) * s == 0``). For every affine scheme onnxruntime uses,
  0.0 is exactly representable (symmetric: ``zp = 0`` and ``round(0 / s) = 0``;
  asymmetric: the range is widened to include 0 and ``zp = round(-rmin / s)``
  is an integer, so ``round(0 / s + zp) = zp``), so every zero stays zero; the
  passes still check it per weight (``zero_preservation``) and fail loudly if a
  tool ever broke it;
* **fidelity** -- the minimum over outputs of the cosine similarity between the
  quantized and the float model (onnxruntime, optimizations disabled);
* **mixed precision** (``keep_fp32: auto``) -- ``keep_fp32_search``: layers the
  structure marks as sensitive (``structural_sensitive_layers``: a conv with <= 4
  input channels (the stem), depthwise convs, the final layer before an output;
  the layers that dominate the error of compact CNNs under int8) are kept fp32
  first when a pass asks for it; then per-layer sensitivity = 1 - fidelity when
  *only* that layer is quantized; the k most sensitive layers are kept in fp32,
  with the smallest k for which the whole model's fidelity reaches the target
  (bisection on k). Every kept layer carries its reason and measured error.
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from compressor import ir
from compressor.errors import PassError
from compressor.metrics import cosine  # noqa: F401  (re-exported: quantizers compare with it)

log = logging.getLogger(__name__)

# ops whose presence means "this is a quantized model" for the runtime choice
QUANT_OP_TYPES = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "QLinearConv", "QLinearMatMul", "QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool",
    "QLinearConcat", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QGemm", "MatMulNBits",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention", "QOrderedMatMul", "GatherBlockQuantized",
})

# layers whose constant weight input the quantizers rewrite (index of the weight input)
WEIGHT_LAYERS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}


# --------------------------------------------------------------------------- graph round trip

def export_model(graph: gs.Graph, ctx: Any) -> onnx.ModelProto:
    """The graph as a ModelProto (a copy). Uses ``ctx.export`` when the context has a template model."""
    if getattr(ctx, "template", None) is not None:
        model = ctx.export(graph)
    else:
        g = graph.copy()
        g.cleanup(remove_unused_graph_inputs=False).toposort()
        model = gs.export_onnx(g, do_type_check=True)
        model.ir_version = min(model.ir_version, 8) if model.ir_version else 8
    return ir.infer_shapes(model, data_prop=False)  # strict, on the weightless copy (the model is a fresh export)


def replace_graph(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Replace the contents of ``graph`` in place by the graph of ``model``.

    Nodes, inputs, outputs and the opset/domain imports are taken from ``model``
    (so a new domain such as ``com.microsoft`` reaches the exported model's
    ``opset_import``); the graph object itself is kept, as passes edit in place.
    """
    new = gs.import_onnx(model)
    graph.nodes.clear()
    graph.nodes.extend(new.nodes)
    graph.inputs.clear()
    graph.inputs.extend(new.inputs)
    graph.outputs.clear()
    graph.outputs.extend(new.outputs)
    graph.opset = new.opset
    graph.import_domains = list(new.import_domains or [])
    # onnx-graphsurgeon caches name counters per graph; fresh names must not collide
    graph.name_idx = max(getattr(graph, "name_idx", 0), getattr(new, "name_idx", 0))


def domain_opsets(model: onnx.ModelProto) -> dict[str, int]:
    return {(o.domain or "ai.onnx"): o.version for o in model.opset_import}


def quantized_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Counts of quantized / contrib ops (``com.microsoft`` domain included) in a model."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in QUANT_OP_TYPES or n.domain == "com.microsoft":
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
            counts[key] = counts.get(key, 0) + 1
    return counts


# --------------------------------------------------------------------------- onnxruntime helpers

def as_reader(feeds: list[dict[str, np.ndarray]]):
    """A real ``CalibrationDataReader`` subclass instance (onnxruntime type-checks it)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

        def __len__(self):
            return len(feeds)

    return _Reader()


class _Collect(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        log.debug("onnxruntime.quantization: %s", record.getMessage())
        return False


@contextlib.contextmanager
def quiet_ort_quantization() -> Iterator[list[str]]:
    """onnxruntime's quantization tools log advice (pre-processing hints, BN axis notes)
    straight to the root logger, and its histogram calibrators (entropy, percentile)
    print progress on stdout; collect both at debug level instead of printing them."""
    flt = _Collect()
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    for lg in loggers:
        lg.addFilter(flt)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield flt.messages
    finally:
        for lg in loggers:
            lg.removeFilter(flt)
        if out.getvalue().strip():
            log.debug("onnxruntime.quantization (stdout): %s", out.getvalue().strip())


def run_model(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], optimized: bool = False) -> list[list[np.ndarray]]:
    from compressor import runtime

    return runtime.run_all(runtime.session(model, optimized=optimized), feeds)


def fidelity(cand: list[list[np.ndarray]], ref: list[list[np.ndarray]]) -> float:
    """Minimum over outputs of the cosine similarity over all samples."""
    n_out = len(ref[0]) if ref else 0
    vals = [cosine(np.concatenate([np.ravel(r[i]) for r in cand]), np.concatenate([np.ravel(r[i]) for r in ref]))
            for i in range(n_out)]
    return min(vals) if vals else 1.0


# --------------------------------------------------------------------------- layers and zeros

def _float_constant(w: gs.Constant) -> bool:
    """Whether a constant holds floats, from its recorded dtype (loading the values would keep a copy of
    them in the graph); a dtype numpy does not know (bfloat16, float8) is read from the values."""
    try:
        return np.dtype(w.dtype).kind == "f"
    except TypeError:
        return np.asarray(w.values).dtype.kind == "f"


def weight_layers(graph: gs.Graph, op_types: tuple[str, ...] = ("Conv", "Gemm", "MatMul")) -> list[tuple[gs.Node, gs.Constant]]:
    """(node, float constant weight) of every quantizable layer, in graph order."""
    out = []
    for node in graph.nodes:
        idx = WEIGHT_LAYERS.get(node.op)
        if node.op not in op_types or idx is None or len(node.inputs) <= idx:
            continue
        w = node.inputs[idx]
        if isinstance(w, gs.Constant) and _float_constant(w):
            out.append((node, w))
    return out


# ops with a learned weight matrix: the "final layer" is the last of these before an output
WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "Gather", "Attention",
                          "EmbedLayerNormalization", "MatMulNBits", "MatMulInteger", "ConvInteger", "QLinearConv",
                          "QLinearMatMul"})
STEM_MAX_CHANNELS = 4  # a conv with at most this many input channels is a stem (image, audio, one-hot planes)


def structural_sensitive_layers(graph: gs.Graph, names: list[str]) -> dict[str, str]:
    """name -> why, for the layers among ``names`` whose structure makes them sensitive to quantization.

    * the stem: a Conv with <= ``STEM_MAX_CHANNELS`` input channels and no weighted op upstream
      (raw image / audio / one-hot planes with wide ranges; every later layer sees its error);
    * a depthwise Conv (group == input channels > 1: one 3x3/5x5 filter per channel, few weights per
      output, so a per-channel int8 grid is coarse relative to each output);
    * the final layer: for each graph output, the last weighted op (``WEIGHTED_OPS`` with a >= 2-D
      float constant, in graph order) among its ancestors, if it is one of ``names`` (the classifier
      / output projection, whose error reaches the output unattenuated). An output produced after
      another weighted op (an LSTM, say) has no final layer among ``names``.
    """
    wanted = set(names)
    order = {id(n): i for i, n in enumerate(graph.nodes)}

    def weighted(n: gs.Node) -> bool:  # a layer with a learned weight matrix (not a bias or a scale)
        return n.op in WEIGHTED_OPS and any(
            isinstance(t, gs.Constant) and len(t.shape or ()) >= 2 and np.asarray(t.values).dtype.kind == "f"
            for t in n.inputs)

    def upstream_weighted(node: gs.Node) -> bool:
        seen, stack = set(), [t for t in node.inputs if not isinstance(t, gs.Constant)]
        while stack:
            for p in stack.pop().inputs:
                if id(p) not in seen:
                    seen.add(id(p))
                    if weighted(p):
                        return True
                    stack.extend(i for i in p.inputs if not isinstance(i, gs.Constant))
        return False

    reasons: dict[str, str] = {}
    for node in graph.nodes:
        if node.name not in wanted or node.op != "Conv" or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        w = node.inputs[1].shape
        group = int(node.attrs.get("group", 1))
        cin = int(w[1]) * group
        if group > 1 and group == cin and int(w[1]) == 1:
            reasons[node.name] = f"depthwise conv ({group} channels, {int(np.prod(w[2:]))} weights per filter)"
        elif cin <= STEM_MAX_CHANNELS and not upstream_weighted(node):
            reasons[node.name] = f"stem conv ({cin} input channel{'s' if cin != 1 else ''})"

    for out in graph.outputs:
        seen, stack, last = set(), [out], None
        while stack:
            t = stack.pop()
            for p in t.inputs:  # producers of tensor t (0 or 1)
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if weighted(p) and (last is None or order.get(id(p), -1) > order.get(id(last), -1)):
                    last = p
                stack.extend(i for i in p.inputs if not isinstance(i, gs.Constant))
        if last is not None and last.name in wanted and last.name not in reasons:
            reasons[last.name] = f"final layer (last weighted op before output {out.name})"
    return {n: reasons[n] for n in names if n in reasons}


def float_zero_masks(graph: gs.Graph) -> dict[str, np.ndarray]:
    """weight name -> boolean zero mask for the float weights of Conv/Gemm/MatMul layers."""
    return {w.name: ir.constant_values(w) == 0 for _, w in weight_layers(graph, ("Conv", "ConvTranspose", "Gemm", "MatMul"))}


def _const(model_inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    t = model_inits.get(name)
    return None if t is None else numpy_helper.to_array(t)


def _broadcast_zp(zp: np.ndarray, q: np.ndarray, axis: int | None) -> np.ndarray:
    if zp.ndim == 0 or zp.size == 1 or axis is None:
        return zp.reshape(()) if zp.size == 1 else zp
    shape = [1] * q.ndim
    shape[axis % q.ndim] = -1
    return zp.reshape(shape)


def unpack_matmulnbits(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q [K, N] uint8 codes, zero points [K, N], scales [K, N]) of a MatMulNBits node with constant inputs.

    Layout (com.microsoft.MatMulNBits, bits=4): B is uint8 [N, k_blocks, block_size/2], two codes
    per byte, low nibble first, along K; scales [N * k_blocks]; optional zero points packed the
    same way per row ([N, ceil(k_blocks / 2)]), default 2^(bits-1) = 8.
    """
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    k, n, bits, bs = int(attrs["K"]), int(attrs["N"]), int(attrs.get("bits", 4)), int(attrs["block_size"])
    if bits != 4:
        raise PassError(f"MatMulNBits {node.name}: only 4-bit unpacking is implemented, got bits={bits}")
    b = numpy_helper.to_array(inits[node.input[1]]).astype(np.uint8)
    kb = (k + bs - 1) // bs
    b = b.reshape(n, kb, bs // 2)
    codes = np.empty((n, kb, bs), np.uint8)
    codes[..., 0::2] = b & 0x0F
    codes[..., 1::2] = b >> 4
    codes = codes.reshape(n, kb * bs)[:, :k]
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(n, kb)
    if len(node.input) > 3 and node.input[3]:
        zp_packed = numpy_helper.to_array(inits[node.input[3]]).astype(np.uint8).reshape(n, -1)
        zp = np.empty((n, zp_packed.shape[1] * 2), np.uint8)
        zp[:, 0::2] = zp_packed & 0x0F
        zp[:, 1::2] = zp_packed >> 4
        zp = zp[:, :kb]
    else:
        zp = np.full((n, kb), 1 << (bits - 1), np.uint8)
    zp_full = np.repeat(zp, bs, axis=1)[:, :k]
    sc_full = np.repeat(scales, bs, axis=1)[:, :k]
    return codes.T, zp_full.T, sc_full.T


def _source_name(name: str) -> tuple[str, bool]:
    """Original float weight name of a quantized initializer, and whether it was transposed."""
    transposed = False
    for suffix in ("_quantized", "_Q4", "_DQ_Q4"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    for suffix in ("_Transposed", "__kn"):
        if name.endswith(suffix):
            name, transposed = name[: -len(suffix)], True
    return name, transposed


def quantized_zero_masks(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """original weight name -> zero mask (in the original layout) of every quantized or float16 weight:
    DequantizeLinear / ConvInteger / MatMulInteger (q == zero point), MatMulNBits (unpacked code ==
    zero point), float16 initializers (== 0)."""
    inits = {t.name: t for t in model.graph.initializer}
    masks: dict[str, np.ndarray] = {}

    def put(qname: str, mask: np.ndarray) -> None:
        src, transposed = _source_name(qname)
        masks[src] = mask.T if transposed else mask

    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = _const(inits, node.input[0])
            zp = _const(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), q.dtype)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            put(node.input[0], q == _broadcast_zp(zp, q, axis if zp.size > 1 else None))
        elif node.op_type in ("ConvInteger", "MatMulInteger") and node.input[1] in inits:
            q = _const(inits, node.input[1])
            zp = _const(inits, node.input[3]) if len(node.input) > 3 and node.input[3] else np.zeros((), q.dtype)
            axis = 0 if node.op_type == "ConvInteger" else q.ndim - 1
            put(node.input[1], q == _broadcast_zp(zp, q, axis if zp.size > 1 else None))
        elif node.op_type == "MatMulNBits" and node.input[1] in inits:
            codes, zp, _ = unpack_matmulnbits(node, inits)
            put(node.input[1], codes == zp)
    for t in model.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT16 and t.name not in masks:
            masks[t.name] = numpy_helper.to_array(t) == 0
    return masks


def zero_preservation(before: dict[str, np.ndarray], model: onnx.ModelProto, pass_name: str) -> dict[str, Any]:
    """Check that every zero of every quantized weight is still exactly zero; return sparsity stats.

    Raises PassError naming the weights where a zero became non-zero (a broken promise, never silent).
    """
    after = quantized_zero_masks(model)
    layers, broken = {}, []
    tot_before = tot_after = numel = 0
    for name, zb in before.items():
        za = after.get(name)
        if za is None:
            continue  # weight not quantized (kept float32)
        if za.shape != zb.shape:
            raise PassError(f"{pass_name}: quantized weight {name} has shape {list(za.shape)}, expected {list(zb.shape)}")
        if np.any(zb & ~za):
            broken.append(f"{name} ({int(np.sum(zb & ~za))} zeros lost)")
        nb, na = int(zb.sum()), int(za.sum())
        layers[name] = {"numel": int(zb.size), "sparsity_before": round(nb / zb.size, 6), "sparsity_after": round(na / zb.size, 6)}
        tot_before += nb
        tot_after += na
        numel += zb.size
    if broken:
        raise PassError(f"{pass_name}: quantization turned zero weights non-zero in {', '.join(broken)}")
    return {
        "zeros_preserved": True,
        "quantized_weights": len(layers),
        "sparsity_before": round(tot_before / numel, 6) if numel else 0.0,
        "sparsity_after": round(tot_after / numel, 6) if numel else 0.0,
        "weights": layers,
    }


def initializer_bytes(model: onnx.ModelProto) -> int:
    return int(sum(ir.tensor_nbytes(t) for t in model.graph.initializer))  # from dims: no copy of the data


# --------------------------------------------------------------------------- mixed precision

QuantizeFn = Callable[[list[str] | None, list[str]], onnx.ModelProto]
"""quantize(only, exclude): only=None quantizes every candidate layer except ``exclude``;
only=[name] quantizes just that layer."""


@dataclass
class MixedResult:
    model: onnx.ModelProto
    fidelity: float
    met: bool
    kept: list[dict[str, Any]] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    samples: int = 0

    def stats(self, target: float) -> dict[str, Any]:
        return {"target_min_cosine": target, "fidelity_min_cosine": round(self.fidelity, 6), "target_met": self.met,
                "kept_fp32": self.kept, "sensitivity": {k: round(v, 8) for k, v in self.sensitivity.items()},
                "quantizations_evaluated": self.evaluations, "samples": self.samples}


SENSITIVITY_SAMPLES = 64  # calibration samples used by the per-layer sensitivity search (keep_fp32: auto)
RANK_SAMPLES = 16  # of those, the samples each single-layer quantization is measured on (a ranking)


def quantize_with_keep_fp32(quantize: QuantizeFn, candidates: list[str], ref_model: onnx.ModelProto,
                            feeds: list[dict[str, np.ndarray]], keep_fp32: str, target: float,
                            warnings: list[str], forced: dict[str, str] | None = None,
                            ) -> tuple[onnx.ModelProto, "MixedResult | None"]:
    """The model every quantize.* pass returns: all ``candidates`` quantized, or with
    ``keep_fp32 == "auto"`` and calibration data, the layers in ``forced`` (name -> structural
    reason) and then the most sensitive layers kept fp32 until the output cosine reaches
    ``target`` (``keep_fp32_search``). Appends a warning for every kept layer (reason and measured
    error), for a missed target, and when ``auto`` had no data to measure with."""
    if keep_fp32 != "auto":
        return quantize(None, []), None
    if not feeds:
        warnings.append("keep_fp32=auto needs calibration data (--calib) to measure per-layer sensitivity: "
                        "every layer quantized")
        return quantize(None, []), None
    mixed = keep_fp32_search(quantize, candidates, ref_model, feeds[:SENSITIVITY_SAMPLES], target, forced)
    warnings += [f"{k['layer']}: kept fp32 (keep_fp32=auto): {k['reason']}" for k in mixed.kept]
    if not mixed.met:
        warnings.append(f"keep_fp32=auto: output cosine {mixed.fidelity:.6f} still below the target {target} "
                        f"with {len(mixed.kept)} layer(s) kept fp32")
    elif candidates and len(mixed.kept) == len(candidates):
        warnings.append("keep_fp32=auto: every layer stayed fp32 (structure or measured error): nothing quantized")
    return mixed.model, mixed


def keep_fp32_search(quantize: QuantizeFn, candidates: list[str], ref_model: onnx.ModelProto,
                     feeds: list[dict[str, np.ndarray]], target: float,
                     forced: dict[str, str] | None = None) -> MixedResult:
    """Mixed precision: keep the most sensitive layers fp32 until fidelity >= target.

    ``forced`` (name -> reason, e.g. from ``structural_sensitive_layers``) are kept first, each
    with its measured error. sensitivity(layer) = 1 - fidelity(model with only ``layer``
    quantized), measured on the first ``RANK_SAMPLES`` samples (a ranking; the whole model is
    always measured on all ``feeds``). The other layers are kept in decreasing sensitivity: the
    smallest k such that keeping the k most sensitive meets ``target`` is found by bisection
    (fidelity grows with k, up to 1.0 with every layer fp32), so a model needing 15 of 40 layers
    kept costs ~6 whole-model quantizations, not 15. Every kept entry: layer, rule (structure |
    sensitivity), rank, cosine (output cosine with only that layer quantized), reason.
    """
    ref = run_model(ref_model, feeds)
    rank_feeds = feeds[:RANK_SAMPLES]
    rank_ref = [r for r in ref[:RANK_SAMPLES]]
    forced = {k: v for k, v in (forced or {}).items() if k in candidates}
    sens: dict[str, float] = {}
    evals = 0

    def measure(name: str) -> float:
        nonlocal evals
        if name not in sens:
            sens[name] = 1.0 - fidelity(run_model(quantize([name], []), rank_feeds), rank_ref)
            evals += 1
        return sens[name]

    def entry(name: str, rule: str, rank: int | None, why: str) -> dict[str, Any]:
        cos = 1.0 - sens[name]
        return {"layer": name, "rule": rule, "rank": rank, "cosine": round(cos, 6),
                "reason": f"{why}; quantizing only this layer gives output cosine {cos:.6f}"}

    kept: list[dict[str, Any]] = []
    for name, why in forced.items():
        measure(name)
        kept.append(entry(name, "structure", None, why))
    rest = [c for c in candidates if c not in forced]
    if not rest:
        return MixedResult(ref_model, 1.0, True, kept, sens, evals, len(feeds))
    model = quantize(None, list(forced))
    fid = fidelity(run_model(model, feeds), ref)
    evals += 1
    if fid >= target:
        return MixedResult(model, fid, True, kept, sens, evals, len(feeds))
    for name in rest:
        measure(name)
    order = sorted(rest, key=lambda n: (-sens[n], rest.index(n)))
    tried: dict[int, tuple[onnx.ModelProto, float]] = {0: (model, fid)}
    lo, hi = 0, len(order)  # keeping lo layers misses the target; keeping hi (all: float) meets it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        cand = quantize(None, list(forced) + order[:mid])
        f = fidelity(run_model(cand, feeds), ref)
        evals += 1
        tried[mid] = (cand, f)
        if f >= target:
            hi = mid
        else:
            lo = mid
    if hi in tried:
        model, fid = tried[hi]
    elif len(forced) + hi == len(candidates):
        model, fid = ref_model, 1.0
    else:  # only when the loop never ran past hi (e.g. one layer left)
        model = quantize(None, list(forced) + order[:hi])
        fid = fidelity(run_model(model, feeds), ref)
        evals += 1
    kept += [entry(name, "sensitivity", rank, f"sensitivity #{rank} of {len(order)}")
             for rank, name in enumerate(order[:hi], 1)]
    return MixedResult(model, fid, fid >= target, kept, sens, evals, len(feeds))


# --------------------------------------------------------------------------- runtime choice

def choose_runtime(model: onnx.ModelProto, spec: Any) -> dict[str, Any]:
    """Which runtime the bundle's model should run in, and why.

    TVM's Relax ONNX importer has no QLinear*/MatMulNBits/ConvInteger converters and
    turns QuantizeLinear/DequantizeLinear into float arithmetic (the int8 model would
    run as a float model with extra work), so a model with quantized ops is shipped for
    onnxruntime, whose CPU kernels run int8 QDQ (fused to QLinearConv/QLinearMatMul) and
    MatMulNBits natively. float16 models on x86 go to onnxruntime as well (see below).
    """
    ops = quantized_op_counts(model)
    tag = getattr(spec, "tag", "?")
    fp16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    if not ops and fp16 and getattr(spec, "family", None) == "x86":
        return {"name": "onnxruntime", "quantized_ops": {},
                "reason": "float16 model on x86: TVM would compute in emulated fp16 (no x86 fp16 arithmetic before "
                          "AVX512-FP16) and differ from onnxruntime's float32-accumulating kernels; the bundle runs "
                          "model.onnx with onnxruntime"}
    if not ops:
        return {"name": "tvm", "reason": f"float model: TVM Relax artifact for {tag}", "quantized_ops": {}}
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(ops.items()))
    return {"name": "onnxruntime", "quantized_ops": ops,
            "reason": f"quantized ops ({kinds}): TVM's ONNX importer lacks QLinear*/MatMulNBits and would dequantize QDQ "
                      f"to float; the {tag} bundle runs model.onnx with onnxruntime's int8/int4 kernels"}
