"""``lower.sparse``: rewrite sparse constant-weight Gemm/MatMul and Conv layers into BSR ops.

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
standard ``Conv(X, Unsqueeze(W, [2, 3]), bias)``.

KxK, strided and padded convolutions (group 1, dilation 1, explicit pads) become
``compressor::SparseConv[Relu](X, data, indices, indptr, bias)`` with Conv's ``kernel_shape``,
``strides`` and ``pads`` as attributes and ``W[O, I*KH*KW]`` (im2col column order) in ``R x 1``
blocks (block shapes with ``C > 1`` are stored as ``1x1``); the reference body reshapes ``W`` to
``[O, I, KH, KW]`` and runs ``Conv`` with the same attributes (attribute references of the
model-local function). CPU targets run it with the sparse direct kernel
(``targets.conv_kernels.make_sparse_direct``: each stored block is a broadcast-FMA over
contiguous positions of the zero-padded polyphase input planes, at the block's flat tap offset);
its decision uses the conv1x1 kernel fit with ``K = I*KH*KW`` and the output pixels (basis
"conv KxK /s (conv1x1 kernel fit)"; ResNet-50's layers: bench/cnn_zoo.md). CUDA has no KxK
kernel (kept dense, warned); grouped and dilated convs stay dense with a warning.

Opset: the reference bodies need opset 16 (``ScatterElements`` reduction). A model at opset
13-15 (every older model is converted to 13 at load) is relabelled to 16 when its first layer
is lowered: between 13 and 16 the standard ops only gained types or attributes whose defaults
keep the old meaning, except ``RoiAlign``; a graph with RoiAlign or model-local functions keeps
its opset and every layer stays dense (warned).

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

Cost model (per layer, decides sparse vs dense). What a lowered layer replaces is not
onnxruntime but the dense TIR kernel the TVM build runs for it (``targets.dense_kernels``
packed MatMul/Gemm, ``targets.conv_kernels`` dense 1x1 conv), so the model compares two
modelled kernel times on CPU targets::

    t(kernel) = c_call[serial | parallel]                  per-call overhead (pool fork-join or not)
              + c_l2    * min(B, CACHE_BYTES)               weight bytes streamed from L2,
              + c_l3    * (B's part in CACHE_BYTES..LLC_BYTES)  from L3,
              + c_dram  * max(B - LLC_BYTES, 0)             from DRAM
              + c_mac   * MACs                              compute (executed multiply-adds)
              + c_act   * 4 * m * (n + k)                   activation bytes (X in, Y out)
    ratio = t(dense kernel) / t(sparse kernel)

with ``B = 4 N K`` and ``MACs = N K m`` for the dense kernel and ``B = 4 nnz (1 + 1/(R C))``
(blocks + one int32 index each), ``MACs = nnz m`` for the BSR kernel (``nnz`` = stored
elements, padding included; the permute-SELL kernel: its expected padded slots, 5 bytes
each). One non-negative constant vector per kernel (``CPU_TIME_MODELS``: dense GEMM, dense
conv, sparse GEMM perm/lanes/xt for R = 1 and the rows kernel per R in 4/8/16, sparse conv
per R), fitted by ``bench/cost_model.py --fit`` (non-negative least squares on relative
error over a grid of N = K in 64..4096, batch 1/2/4/8/16, sparsity 0.5-0.95, blocks
1x1/4x1/8x1/16x1, and 1x1 convs of 64..1024 channels on 16..3136 pixels; table, confusion and fit in ``bench/cost_model.md``) on the dev host
(AMD EPYC Zen 4, AVX-512, 2 shared cores); the constants are data, ``targets/cost_models/<isa>.json``
(version, host, command), read by ``load_cost_model``. What the previous, onnxruntime-relative model
got wrong: small cache-resident layers (a 256x256 GEMV's dense kernel runs serially from L2
in ~3 us while the BSR GEMM kernel then always forked the pool -- small sparse kernels now
run on one thread too, ``targets.sparse_kernels.PARALLEL_MIN_STORED``; 512x512 unstructured
90% at batch 1 was predicted 1.3x and measured 0.8x), and 1x1 convs, where the BSR kernel
beat the dense conv kernel from 50% sparsity on for most shapes (the old model kept 62 such
grid points dense). Layers smaller than every calibrated one (``CALIBRATED_MIN_MACS``) get a
ratio capped at 1. aarch64 runs the same TIR and uses the x86 fit (basis "x86-avx512 kernel fit");
CUDA keeps a bandwidth prior (below). Wrong decisions at ``min_speedup`` 1.2 on the grid:
bench/cost_model.md (confusion table and the list).

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
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from compressor import ir
from compressor.errors import UsageError
from compressor.pass_base import Pass, PassContext, PassResult

log = logging.getLogger(__name__)

from compressor.sparse_ops import CONV1X1 as OP_CONV, CONV1X1_RELU as OP_CONV_RELU, DOMAIN, MATMUL as OP  # noqa: E402
from compressor.sparse_ops import MATMUL_RELU as OP_RELU  # noqa: E402
from compressor.sparse_ops import KXK as OP_KXK, KXK_RELU as OP_KXK_RELU  # noqa: E402
from compressor.sparse_ops import DQMATMUL as OP_DQ, QMATMUL as OP_Q, QMATMUL_RELU as OP_Q_RELU  # noqa: E402
MIN_OPSET = 16

# --- CPU cost model (see module docstring; constants fitted by bench/cost_model.py) --------
# Every kernel's time is modelled as a linear function of TIME_FEATURES with non-negative
# constants (seconds per unit), one constant vector per kernel (CPU_TIME_MODELS key).
TIME_FEATURES = ("serial call", "parallel call", "weight bytes in L2", "weight bytes in L3", "weight bytes in DRAM",
                 "MACs", "activation bytes")
COST_MODEL_DIR = Path(__file__).resolve().parent / "cost_models"
COST_MODEL_VERSION = 1


def load_cost_model(isa: str) -> dict:
    """The fitted CPU time model for ``isa`` (``targets/cost_models/<isa>.json``, written by
    ``bench/cost_model.py --fit --write``): constants per kernel, the cache sizes of the host it was fitted
    on, where and when. A file of another version or with other features is refused (a fit of another
    model must not be read as this one)."""
    path = COST_MODEL_DIR / f"{isa}.json"
    d = json.loads(path.read_text())
    if d.get("version") != COST_MODEL_VERSION or tuple(d.get("features", ())) != TIME_FEATURES:
        raise ValueError(f"{path}: cost model version {d.get('version')} / features {d.get('features')} "
                         f"do not match this lower.sparse (version {COST_MODEL_VERSION}, {TIME_FEATURES})")
    return d


def fitted_isas() -> list[str]:
    return sorted(p.stem for p in COST_MODEL_DIR.glob("*.json"))


DEFAULT_FIT = "x86-avx512"  # the only ISA measured so far; other CPU targets use it and say so in the basis
_FIT = load_cost_model(DEFAULT_FIT)
CACHE_BYTES = int(_FIT["cache_bytes"])  # weight bytes streamed from L2 (the fit host: 2 cores, 1 MiB each)
LLC_BYTES = int(_FIT["llc_bytes"])  # ... from L3; beyond that from DRAM
# smallest dense MACs of a calibrated layer (64x64 GEMV; 64 -> 64 channels on 16 pixels): below
# them the fit extrapolates per-call overheads (a 48x32 conv on 4 pixels predicted 1.4x), so the
# predicted ratio is capped at 1 there -- no measurement says such a layer pays
CALIBRATED_MIN_MACS = {"gemm": 64 * 64, "conv": 64 * 64 * 16}
CPU_TIME_MODELS: dict[str, list[float]] = {k: [float(x) for x in v] for k, v in _FIT["models"].items()}


@dataclass(frozen=True)
class CostFit:
    """One ISA's fitted constants and the cache sizes its L2/L3 features were computed with."""
    isa: str
    models: dict[str, list[float]]
    cache_bytes: int
    llc_bytes: int


_FITS: dict[str, CostFit | None] = {DEFAULT_FIT: CostFit(DEFAULT_FIT, CPU_TIME_MODELS, CACHE_BYTES, LLC_BYTES)}
# arm targets without a core of their own (plain --target arm, an mcpu with no core model) decide
# with the default core's fit (targets.arm_cores.DEFAULT_CORE); the basis names it
ARM_DEFAULT_FIT = "arm-cortex-a76"


def cost_isa(tvm_target) -> str:
    """The cost-model key of a CPU target's code: ``x86-avx512`` / ``x86-avx2`` / ``x86-sse2`` by the
    features LLVM resolves for it (``--target x86-avx2`` on an AVX-512 host is AVX2 code);
    ``arm-<mcpu>`` for an aarch64 target with an mcpu (``arm`` without one)."""
    from targets.sparse_kernels import llvm_features, target_family

    fam = target_family(tvm_target)
    if fam == "x86":
        feats = llvm_features(tvm_target)
        return "x86-avx512" if "avx512f" in feats else ("x86-avx2" if "avx2" in feats else "x86-sse2")
    if fam == "arm":
        cpu = tvm_target.get("mcpu") if isinstance(tvm_target, dict) else getattr(tvm_target, "mcpu", None)
        return f"arm-{cpu}" if cpu and cpu != "generic" else "arm"
    return fam


def fit_for(isa: str) -> CostFit:
    """The fit ``isa`` decides with: its own ``targets/cost_models/<isa>.json`` where it exists; an arm
    ISA without one the default arm core's (``ARM_DEFAULT_FIT``); anything else the default x86 fit."""
    if isa not in _FITS:
        got = None
        if (COST_MODEL_DIR / f"{isa}.json").is_file():
            d = load_cost_model(isa)
            got = CostFit(isa, {k: [float(x) for x in v] for k, v in d["models"].items()}, int(d["cache_bytes"]),
                          int(d["llc_bytes"]))
        _FITS[isa] = got
    got = _FITS[isa]
    if got is not None:
        return got
    if isa.startswith("arm") and isa != ARM_DEFAULT_FIT and (COST_MODEL_DIR / f"{ARM_DEFAULT_FIT}.json").is_file():
        return fit_for(ARM_DEFAULT_FIT)
    return _FITS[DEFAULT_FIT]


def models_for(isa: str) -> tuple[dict[str, list[float]], str]:
    """(time-model constants, ISA they were fitted for) for ``isa`` (:func:`fit_for`)."""
    f = fit_for(isa)
    return f.models, f.isa


# CUDA: no GPU on the dev host, so no measured ratios yet. Prior: a bandwidth-bound kernel
# reaching CUDA_PRIOR_EFFICIENCY of the ideal 1/stored_density speed-up; both sides pay a launch.
# Every CUDA layer record says cost_model="cuda prior"; bench/cuda_check.py measures it.
CUDA_PRIOR_EFFICIENCY = 0.3
CUDA_T_LAUNCH = 5e-6
CUDA_DENSE_MACS_PER_S = 5e11  # order of magnitude of a fp32 GEMV/GEMM on an sm_80 GPU
# the SparseMatMul CUDA kernel keeps R x M partial sums per thread and reduces them through
# [32, R x M] floats of shared memory (48 KiB without opt-in): R x M <= 256
CUDA_MAX_RM = 256


def block_class(block: tuple[int, int]) -> str:
    """Sparse-kernel model class of a block shape: R == 1 patterns (unstructured, 1xC) run the
    lanes/xt kernels and share the ``1x1`` models; R >= 2 the rows kernel, by R."""
    r, _ = block
    if r == 1:
        return "1x1"
    return "4x1" if r < 8 else ("8x1" if r < 16 else "16x1")


def model_key(op: str, kind: str, m: int, block: tuple[int, int], perm: bool = False) -> str:
    """CPU_TIME_MODELS key of the kernel that runs a layer: ``kind`` "dense" | "sparse"; ``m``
    = batch rows (Gemm/MatMul) or pixels x images (Conv); ``perm``: the layer runs the
    permute-SELL kernel (``targets.sparse_kernels.perm_eligible``)."""
    fam = "conv" if op == "Conv" else "gemm"
    if kind == "dense":
        return f"dense_{fam}"
    cls = block_class(block)
    if fam == "gemm" and cls == "1x1":
        return f"sparse_gemm_1x1_{sparse_variant(block, m, perm)}"
    return f"sparse_{fam}_{cls}"


def sparse_variant(block: tuple[int, int], m: int, perm: bool = False) -> str:
    """The CPU GEMM kernel variant ``targets.sparse_kernels.kernel_params`` picks for a layer
    (``perm`` where the target and shape allow it, which the caller knows)."""
    from targets.sparse_kernels import kernel_params

    return "perm" if perm else kernel_params(block, m, "cpu").variant


def time_features(op: str, kind: str, n: int, k: int, m: int, stored_density: float,
                  block: tuple[int, int], perm: bool = False, caches: tuple[int, int] | None = None) -> list[float]:
    """Values of TIME_FEATURES for one kernel call: ``Y[m, n] = X[m, k] W[n, k]^T`` (a 1x1
    conv: ``m`` pixels). Dense streams the whole weight; sparse its stored blocks plus one
    int32 index per block (``perm``: the expected padded slots of
    ``targets.sparse_kernels.pack_perm``, a float and a one-byte offset each). Serial/parallel:
    the kernels' own thresholds (dense GEMM ``targets.dense_kernels.PARALLEL_MIN_MACS``; conv
    kernels 1.1 M MACs; sparse GEMM kernels ``targets.sparse_kernels.PARALLEL_MIN_STORED``
    stored elements (perm: padded slots) x rows, by kernel variant)."""
    from targets.dense_kernels import PARALLEL_MIN_MACS
    from targets.sparse_kernels import CONV_PARALLEL_MIN_MACS, PARALLEL_MIN_STORED, perm_expected_slots

    r, c = block
    if kind == "dense":
        wbytes = 4.0 * n * k
        macs = float(n) * k * m
        par = macs >= (CONV_PARALLEL_MIN_MACS if op == "Conv" else PARALLEL_MIN_MACS)
    elif perm:
        slots = perm_expected_slots(n, k, stored_density)
        wbytes = 5.0 * slots
        macs = slots * m
        par = macs >= PARALLEL_MIN_STORED["perm"]
    else:
        stored = max(stored_density, 1e-6) * n * k
        wbytes = 4.0 * stored * (1.0 + 1.0 / (r * c))
        macs = stored * m
        par = macs >= (CONV_PARALLEL_MIN_MACS if op == "Conv" else PARALLEL_MIN_STORED[sparse_variant(block, m)])
    l2, llc = caches or (CACHE_BYTES, LLC_BYTES)
    return [0.0 if par else 1.0, 1.0 if par else 0.0, min(wbytes, l2),
            min(max(wbytes - l2, 0.0), llc - l2), max(wbytes - llc, 0.0), macs, 4.0 * m * (n + k)]


def kernel_time(op: str, kind: str, n: int, k: int, m: int, stored_density: float, block: tuple[int, int],
                perm: bool = False, isa: str = DEFAULT_FIT) -> float:
    """Modelled seconds of one call of the CPU kernel (``model_key``) for this layer, with the
    constants fitted for ``isa`` (:func:`models_for`)."""
    f = fit_for(isa)
    coef = f.models[model_key(op, kind, m, block, perm)]
    feats = time_features(op, kind, n, k, m, stored_density, block, perm, (f.cache_bytes, f.llc_bytes))
    return max(sum(a * b for a, b in zip(coef, feats)), 1e-9)


def predicted_ratio(n: int, k: int, m: int, stored_density: float, block: tuple[int, int]) -> float:
    """Predicted dense-kernel time / sparse-kernel time of a CPU Gemm/MatMul layer."""
    return predict("MatMul", n, k, m, 1, stored_density, block, "x86")[0]


def predict(op: str, n: int, k: int, m: int, bsz: int, stored_density: float, block: tuple[int, int],
            family: str, perm: bool = False, isa: str | None = None) -> tuple[float, str]:
    """(predicted dense/sparse time ratio, basis) for one layer. ``m``: rows of the SpMM
    (batch for Gemm/MatMul, H*W pixels for a 1x1 Conv with ``bsz`` images). CPU: the ratio
    of the two kernels' modelled times (``kernel_time``); aarch64 uses the x86 fit (no ARM
    hardware to measure on; the same TIR kernels on both)."""
    d = max(stored_density, 1e-6)
    if family == "cuda":
        if op != "Conv" and block[0] * m * bsz > CUDA_MAX_RM:
            return 0.0, f"cuda kernel needs block rows x batch <= {CUDA_MAX_RM}"
        t_work = n * k * m * bsz / CUDA_DENSE_MACS_PER_S
        t_dense = t_work + CUDA_T_LAUNCH  # both paths pay one launch
        t_sparse = t_work * d / CUDA_PRIOR_EFFICIENCY + CUDA_T_LAUNCH
        return t_dense / t_sparse, "cuda prior"
    rows = m * bsz
    isa = isa or (DEFAULT_FIT if family == "x86" else family)
    fit_isa = models_for(isa)[1]
    ratio = (kernel_time(op, "dense", n, k, rows, 1.0, block, isa=isa)
             / kernel_time(op, "sparse", n, k, rows, d, block, perm, isa=isa))
    if fit_isa.startswith("arm"):  # no ARM hardware: a core model over qemu instruction counts
        what = f"{fit_isa} core model (qemu instruction counts)" + ("" if fit_isa == isa else f", default for {isa}")
    else:
        what = f"{fit_isa} kernels measured" if fit_isa == isa else f"{fit_isa} kernel fit (no {isa} fit)"
    basis = ("conv1x1 " if op == "Conv" else "") + ("perm " if perm else "") + what
    if n * k * rows < CALIBRATED_MIN_MACS["conv" if op == "Conv" else "gemm"]:
        ratio = min(ratio, 1.0)
        basis += ", below the calibrated sizes: capped at 1"
    return ratio, basis


# the layers explain-target quotes the cost model's speed-up per pattern for (90% zeros)
REFERENCE_LAYERS = (("gemv 1024x1024", "MatMul", 1024, 1024, 1), ("conv1x1 256ch 14x14px", "Conv", 256, 256, 196))


def pattern_speedups(isa: str, patterns: tuple[str, ...] = ("unstructured", "4x1", "8x1", "16x1"),
                     tvm_target=None) -> dict:
    """What the ``isa`` fit predicts dense/sparse per pattern at 90% zeros on ``REFERENCE_LAYERS``:
    the figures behind a target's default pattern, shown by ``compress explain-target``; with
    ``tvm_target``, also the block the int8 sparse kernel takes there (``--pattern RxC --quantize int8``)."""
    from targets.sparse_kernels import parse_block

    out = {"cost_model": models_for(isa)[1], "sparsity": 0.9}
    if tvm_target is not None:
        from targets import sparse_int8 as si

        v = si.variant_for(tvm_target)
        out["int8_sparse"] = {"kernel": v, "pattern": f"{si.BLOCK_ROWS.get(v, 4)}x4"}
    for pat in patterns:
        block = (1, 1) if pat == "unstructured" else parse_block(pat)
        out[pat] = {name: round(predict(op, n, k, m, 1, 0.1, block, "cpu", isa=isa)[0], 2)
                    for name, op, n, k, m in REFERENCE_LAYERS}
    return out


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
    conv = op in (OP_CONV, OP_CONV_RELU, OP_KXK, OP_KXK_RELU)
    kxk = op in (OP_KXK, OP_KXK_RELU)
    quant = op in (OP_Q, OP_Q_RELU, OP_DQ)
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
        (helper.make_node("Slice", ["xshape", "c1", "c2"], ["kdim" if not kxk else "cin"]) if conv  # channels of NCHW X
         else helper.make_node("Slice", ["xshape", "cm1", "cbig"], ["kdim"])),  # last dim of X
    ]
    if kxk:  # K = I * KH * KW: the kernel size from the node's kernel_shape attribute
        ks = helper.make_node("Constant", [], ["kshape"])
        ks.attribute.append(onnx.AttributeProto(name="value_ints", ref_attr_name="kernel_shape",
                                                type=onnx.AttributeProto.INTS))
        nodes += [ks, helper.make_node("ReduceProd", ["kshape"], ["ksize"], keepdims=1),
                  helper.make_node("Mul", ["cin", "ksize"], ["kdim"])]
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
                         value=(helper.make_tensor("f", TensorProto.INT8, [1], [0]) if quant
                                else helper.make_tensor("f", TensorProto.FLOAT, [1], [0.0]))),
        helper.make_node("ScatterND", ["bzeros", "coords", "data"], ["blocks"]),
        helper.make_node("Transpose", ["blocks"], ["blocks_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["nbr", "r"], ["ndim"]),
        helper.make_node("Concat", ["ndim", "kdim"], ["wshape"], axis=0),
        helper.make_node("Reshape", ["blocks_t", "wshape"], ["W"]),
    ]
    if kxk:
        conv_node = helper.make_node("Conv", ["X", "W4", "bias"], ["pre" if op == OP_KXK_RELU else "Y"])
        for a in ("strides", "pads"):
            conv_node.attribute.append(onnx.AttributeProto(name=a, ref_attr_name=a, type=onnx.AttributeProto.INTS))
        nodes += [helper.make_node("Concat", ["ndim", "cm1", "kshape"], ["w4shape"], axis=0),
                  helper.make_node("Reshape", ["W", "w4shape"], ["W4"]), conv_node]
        if op == OP_KXK_RELU:
            nodes.append(helper.make_node("Relu", ["pre"], ["Y"]))
        return helper.make_function(DOMAIN, op, ["X", "data", "indices", "indptr", "bias"], ["Y"], nodes,
                                    [helper.make_opsetid("", opset)], attributes=["kernel_shape", "strides", "pads"])
    if conv:
        nodes += [helper.make_node("Concat", ["c2", "c3"], ["hw_axes"], axis=0),
                  helper.make_node("Unsqueeze", ["W", "hw_axes"], ["W4"])]
        if op == OP_CONV_RELU:
            nodes += [helper.make_node("Conv", ["X", "W4", "bias"], ["pre"]), helper.make_node("Relu", ["pre"], ["Y"])]
        else:
            nodes.append(helper.make_node("Conv", ["X", "W4", "bias"], ["Y"]))
        return helper.make_function(DOMAIN, op, ["X", "data", "indices", "indptr", "bias"], ["Y"], nodes,
                                    [helper.make_opsetid("", opset)])
    if op == OP_DQ:  # DynamicQuantizeLinear per call, then the same integer product and epilogue
        nodes += [
            helper.make_node("DynamicQuantizeLinear", ["X"], ["Xq", "xs", "xz"]),
            helper.make_node("Transpose", ["W"], ["WT"], perm=[1, 0]),
            helper.make_node("MatMulInteger", ["Xq", "WT"], ["acc"]),
            helper.make_node("Cast", ["xz"], ["xz32"], to=TensorProto.INT32),
            helper.make_node("Mul", ["xz32", "rowsum"], ["corr"]),
            helper.make_node("Sub", ["acc", "corr"], ["acc_c"]),
            helper.make_node("Cast", ["acc_c"], ["acc_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["xs", "w_scale"], ["scale"]),
            helper.make_node("Mul", ["acc_f", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "bias"], ["Y"]),
        ]
        return helper.make_function(DOMAIN, op, ["X", "data", "indices", "indptr", "w_scale", "rowsum", "bias"], ["Y"],
                                    nodes, [helper.make_opsetid("", opset)])
    if quant:  # acc = Xq @ Wq^T exactly (int32), then the kernel's epilogue
        nodes += [
            helper.make_node("QuantizeLinear", ["X", "x_scale", "x_zero_point"], ["Xq"]),
            helper.make_node("Transpose", ["W"], ["WT"], perm=[1, 0]),
            helper.make_node("MatMulInteger", ["Xq", "WT"], ["acc"]),
            helper.make_node("Sub", ["acc", "corr"], ["acc_c"]),
            helper.make_node("Cast", ["acc_c"], ["acc_f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["acc_f", "scale"], ["scaled"]),
            helper.make_node("Add", ["scaled", "bias"], ["pre" if op == OP_Q_RELU else "Y"]),
        ]
        if op == OP_Q_RELU:
            nodes.append(helper.make_node("Relu", ["pre"], ["Y"]))
        return helper.make_function(DOMAIN, op, ["X", "data", "indices", "indptr", "scale", "corr", "bias", "x_scale",
                                                 "x_zero_point"], ["Y"], nodes, [helper.make_opsetid("", opset)])
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

# plain (stride 1, unpadded) sparse 1x1 convs: the sparse direct kernel (SparseConv, flat offsets,
# power-of-two vector tiles) or the channel-major BSR conv1x1 kernel (SparseConv1x1). Measured per
# ResNet-50 1x1 shape at 70/90%, unstructured and 8x1 (bench/cnn_zoo.md, "1x1 kernels"): with R x 1
# blocks the direct kernel was 1.0-1.7x faster nearly everywhere; unstructured, the BSR kernel is
# faster from 28x28 pixels up (0.58-0.90x for direct on AVX-512, 0.67-1.05x on AVX2) and the direct
# kernel at 14x14 and 7x7 (1.0-1.4x)
PLAIN_1X1_BSR_MIN_PIXELS = {"x86-avx512": 784, "x86-avx2": 784}


def plain_1x1_kernel(block: tuple[int, int], pixels: int, isa: str) -> str:
    """``sparse_direct`` | ``conv1x1`` for a plain sparse 1x1 conv (see PLAIN_1X1_BSR_MIN_PIXELS);
    targets without measurements (arm) keep the BSR conv1x1 kernel."""
    if isa not in PLAIN_1X1_BSR_MIN_PIXELS:
        return "conv1x1"
    if block[0] >= 2 and block[1] == 1:
        return "sparse_direct"
    return "conv1x1" if pixels >= PLAIN_1X1_BSR_MIN_PIXELS[isa] else "sparse_direct"


# default-domain ops whose meaning (not just their type lists) changes between opset 13 and 16
_SEMANTIC_CHANGES_13_16 = frozenset({"RoiAlign"})


def _opset_bump_blocker(graph: gs.Graph) -> str | None:
    """Why the graph cannot be relabelled from opset 13..15 to 16, or None. Between 13 and 16 the
    standard ops only gained types or attributes whose defaults keep the old behaviour (Reshape's
    allowzero, BatchNormalization's training_mode, GRU/LSTM's layout, the Scatter reductions),
    except RoiAlign (a new default coordinate mode); model-local functions carry their own
    opset imports, which would then disagree with the model's."""
    if graph.opset is None or graph.opset < 13:
        return f"opset {graph.opset}"
    if graph.functions:
        return "it has model-local functions"
    ops = sorted({n.op for n in graph.nodes if n.domain in ("", "ai.onnx", None) and n.op in _SEMANTIC_CHANGES_13_16})
    return f"{', '.join(ops)} changes meaning at opset 16" if ops else None



def _consumers(t: gs.Tensor) -> list[gs.Node]:
    return list(t.outputs)


def _inferred_shapes(graph: gs.Graph, ctx: PassContext) -> dict[str, list]:
    """Tensor name -> shape from ONNX shape inference on the current graph."""
    if ctx.template is None:
        return {}
    try:
        model = ir.inferred_structure(ctx.export(graph))
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


def _conv_weight(node: gs.Node, shapes: dict[str, list]) -> tuple[np.ndarray | None, str | None, list[int] | None, dict]:
    """(W[O, I*KH*KW], why-not, static NCHW input shape, SparseConv attributes) for a Conv node. The
    attributes are empty for a plain 1x1 conv (stride 1, unpadded: ``SparseConv1x1``); otherwise they
    are the ``kernel_shape`` / ``strides`` / ``pads`` of ``compressor::SparseConv`` (group 1, dilation 1,
    explicit pads). W is None when the node cannot be lowered (why-not then says why, or is None for a
    non-candidate)."""
    w, x = node.inputs[1], node.inputs[0]
    if not isinstance(w, gs.Constant) or isinstance(x, gs.Constant):
        return None, None, None, {}
    wv = np.asarray(w.values)
    if wv.ndim != 4 or wv.dtype != np.float32:
        return None, None, None, {}
    a = node.attrs
    kh, kw = int(wv.shape[2]), int(wv.shape[3])
    strides = [int(v) for v in a.get("strides", [1, 1])]
    pads = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
    auto_pad = str(a.get("auto_pad", "NOTSET"))
    plain = (kh, kw) == (1, 1) and strides == [1, 1] and not any(pads) and auto_pad in ("NOTSET", "VALID")
    if int(a.get("group", 1)) != 1:
        return None, f"grouped Conv (group={a.get('group')})", None, {}
    if not plain and any(int(v) != 1 for v in a.get("dilations", [1, 1])):
        return None, f"dilated Conv (dilations={list(a.get('dilations'))})", None, {}
    if auto_pad not in ("NOTSET", "VALID"):
        return None, f"Conv auto_pad={auto_pad}", None, {}
    shape = getattr(x, "shape", None) or shapes.get(x.name)
    if not shape or len(shape) != 4 or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in shape):
        return None, f"input {x.name} has no static NCHW shape", None, {}
    attrs = {} if plain else {"kernel_shape": [kh, kw], "strides": strides, "pads": pads}
    return np.ascontiguousarray(wv.reshape(wv.shape[0], -1)), None, [int(d) for d in shape], attrs


def _relabel_opset(graph: gs.Graph, opset: int, warnings: list[str]) -> int:
    """Relabel a 13-15 graph's default domain to MIN_OPSET (the caller checked ``_opset_bump_blocker``)."""
    if opset >= MIN_OPSET:
        return opset
    warnings.append(f"lower.sparse: default-domain opset {opset} -> {MIN_OPSET} (the BSR reference "
                    "functions need ScatterElements with reduction; no op of this graph changes meaning)")
    graph.opset = MIN_OPSET
    doms = [d for d in (graph.import_domains or []) if d.domain not in ("", "ai.onnx")]
    graph.import_domains = [helper.make_opsetid("", MIN_OPSET), *doms]
    return MIN_OPSET


def _const(t) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _producer(t: gs.Tensor, op: str) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 and t.inputs[0].op == op else None


def _qdq_weight(node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """``(Wq [N, K] int8, w_scale [N])`` of a MatMul / Gemm (transA 0) whose weight input is
    ``DequantizeLinear(int8 constant, constant per-output-channel or per-tensor scale, zero points 0)``."""
    dq = _producer(node.inputs[1], "DequantizeLinear")
    if dq is None:
        return None
    q, sc = _const(dq.inputs[0]), _const(dq.inputs[1])
    zp = _const(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2].name else np.zeros(1, np.int8)
    if q is None or sc is None or zp is None or q.dtype != np.int8 or q.ndim != 2 or np.any(zp != 0):
        return None
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0:
            return None
        nk = bool(int(node.attrs.get("transB", 0)))
    else:
        nk = False
    wq = q if nk else q.T  # [N, K]
    n = wq.shape[0]
    axis = int(dq.attrs.get("axis", 1)) % 2
    if sc.size == 1:
        sw = np.full(n, float(sc.reshape(())), np.float32)
    elif sc.size == n and axis == (0 if nk else 1):
        sw = sc.reshape(n).astype(np.float32)
    else:
        return None
    return np.ascontiguousarray(wq), sw


def _qdq_input(node: gs.Node) -> tuple[gs.Tensor, gs.Constant, gs.Constant, float, int] | None:
    """``(X, x_scale, x_zero_point, sx, zx)`` when the node's first input is
    ``DequantizeLinear(QuantizeLinear(X))`` with one constant per-tensor scale and uint8 or int8 zero point."""
    dq = _producer(node.inputs[0], "DequantizeLinear")
    q = _producer(dq.inputs[0], "QuantizeLinear") if dq is not None else None
    if q is None or len(q.inputs) < 3 or len(dq.inputs) < 3:
        return None
    s_q, z_q, s_d, z_d = (_const(t) for t in (q.inputs[1], q.inputs[2], dq.inputs[1], dq.inputs[2]))
    if any(v is None for v in (s_q, z_q, s_d, z_d)) or z_q.dtype not in (np.uint8, np.int8) or s_q.size != 1 \
            or z_q.size != 1:
        return None
    if float(s_q.reshape(())) != float(s_d.reshape(())) or int(z_q.reshape(())) != int(z_d.reshape(())):
        return None
    return q.inputs[0], q.inputs[1], q.inputs[2], float(s_q.reshape(())), int(z_q.reshape(()))


def _dynamic_int8(node: gs.Node) -> tuple[gs.Tensor, np.ndarray, np.ndarray, gs.Node] | None:
    """``(X, Wq [N, K] int8, w_scale [N], final Mul)`` when ``node`` is onnxruntime's dynamic int8 MatMul:
    ``MatMulInteger(DynamicQuantizeLinear(X), Wq const, its zero point, zero)`` -> ``Cast`` -> ``Mul`` by
    ``Mul(the DQL scale, w_scale const)``."""
    if node.op != "MatMulInteger" or len(node.inputs) < 3:
        return None
    dql = _producer(node.inputs[0], "DynamicQuantizeLinear")
    wq = _const(node.inputs[1])
    if dql is None or wq is None or wq.dtype != np.int8 or wq.ndim != 2 or node.inputs[2] is not dql.outputs[2]:
        return None
    if len(node.inputs) > 3 and node.inputs[3].name:
        wz = _const(node.inputs[3])
        if wz is None or np.any(wz != 0):
            return None
    cons = _consumers(node.outputs[0])
    if len(cons) != 1 or cons[0].op != "Cast" or int(cons[0].attrs.get("to", 0)) != TensorProto.FLOAT:
        return None
    mcons = _consumers(cons[0].outputs[0])
    if len(mcons) != 1 or mcons[0].op != "Mul":
        return None
    mul = mcons[0]
    other = [t for t in mul.inputs if t is not cons[0].outputs[0]]
    smul = _producer(other[0], "Mul") if len(other) == 1 else None
    if smul is None or dql.outputs[1] not in smul.inputs:
        return None
    ws = [_const(t) for t in smul.inputs if t is not dql.outputs[1]]
    n = wq.shape[1]
    if len(ws) != 1 or ws[0] is None or ws[0].size not in (1, n):
        return None
    sw = np.broadcast_to(np.asarray(ws[0], np.float32).reshape(-1), (n,)).astype(np.float32)
    return dql.inputs[0], np.ascontiguousarray(wq.T), sw, mul


@dataclass
class _Int8Layer:
    """An int8 MatMul/Gemm the int8 kernels take: static QDQ (``x_scale``/``x_zp`` tensors, ``sx``/``zx``) or
    onnxruntime's dynamic form (``dyn_mul``: the Mul whose output the layer's result is)."""
    x: gs.Tensor
    wq: np.ndarray  # [N, K] int8
    sw: np.ndarray  # [N]
    dyn_mul: gs.Node | None = None
    x_scale: gs.Tensor | None = None
    x_zp: gs.Tensor | None = None
    sx: float = 1.0
    zx: int = 0


def _int8_layer(node: gs.Node) -> _Int8Layer | None:
    dyn = _dynamic_int8(node)
    if dyn is not None:
        return _Int8Layer(dyn[0], dyn[1], dyn[2], dyn_mul=dyn[3])
    if node.op not in ("Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    wq_sw = _qdq_weight(node)
    xin = _qdq_input(node) if wq_sw is not None else None
    if xin is None:
        return None
    return _Int8Layer(xin[0], wq_sw[0], wq_sw[1], None, *xin[1:])


def _int8_sparse_layers(graph: gs.Graph, tvm_target, min_sparsity: float) -> list[str]:
    from targets import sparse_int8 as si

    r = si.BLOCK_ROWS.get(si.variant_for(tvm_target), 4)
    out = []
    for node in graph.nodes:
        L = _int8_layer(node)
        if L is None or L.wq.shape[0] % r or L.wq.shape[1] % 4:
            continue
        if si.block_density(L.wq, r) <= 1.0 - min_sparsity:
            out.append(node.name or node.outputs[0].name)
    return out


def _lower_int8(graph: gs.Graph, cfg: LowerSparseConfig, tvm_target, shapes: dict, outputs: set[str], opset: int,
                warnings: list[str], layers: list[dict]) -> tuple[int, int]:
    """Int8 MatMul/Gemm layers (static QDQ, or onnxruntime's dynamic form) with a block-sparse weight ->
    ``compressor::SparseQMatMul[Relu]`` / ``SparseDQMatMul`` (``targets.sparse_int8``: x86 VNNI / AVX2,
    aarch64 sdot or the generic kernel). Decision: no int8 cost fit yet; a layer is lowered when at least
    ``min_sparsity`` of its R x 4 weight blocks are empty (the build's alternative is the frontend's
    dequantized float code), and then the model's other int8 layers too, with every block stored.
    Returns (lowered count, opset)."""
    from targets import sparse_int8 as si
    from targets.sparse_kernels import target_family

    if target_family(tvm_target) not in ("x86", "arm"):
        return 0, opset
    variant = si.variant_for(tvm_target)
    r = si.BLOCK_ROWS.get(variant, 4)
    # once one int8 layer runs the sparse kernel the model is compiled for TVM: its dense int8 layers then
    # take the same kernel with every block stored (the dense int8 path), not TVM's generic
    # dequantize / MatMulInteger code (MiniLM, 16 sparse + 20 dense int8 layers: 156 ms with the generic code)
    any_sparse = bool(_int8_sparse_layers(graph, tvm_target, cfg.min_sparsity))
    lowered = 0
    for node in list(graph.nodes):
        L = _int8_layer(node)
        if L is None:
            continue
        x, wq, sw, dyn_mul = L.x, L.wq, L.sw, L.dyn_mul
        dyn = dyn_mul is not None
        label = node.name or node.outputs[0].name
        if any(fnmatch.fnmatch(label, p) for p in cfg.ignore):
            continue
        n, k = wq.shape
        zeros = 1.0 - np.count_nonzero(wq) / wq.size
        if zeros < cfg.min_sparsity and not any_sparse:
            continue
        m = _static_m(x, shapes)
        rec = {"node": label, "op": node.op, "shape": [n, k], "batch": m, "sparsity": round(float(zeros), 4),
               "block": f"{r}x4", "precision": "int8" + (" dynamic" if dyn else ""),
               "kernel": f"int8 {variant}",
               "cost_model": "int8: empty-block share (no int8 kernel fit yet)"}
        why = None
        if n % r or k % 4:
            why = f"weight {n}x{k} not divisible by the {r}x4 blocks of the {variant} int8 kernel"
        elif m is None:
            why = f"input {x.name} has no static shape"
        bias = np.zeros(n, np.float32)
        if why is None and node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
            c = node.inputs[2]
            dqc = _producer(c, "DequantizeLinear")
            cv = _const(c)
            if dqc is not None and _const(dqc.inputs[0]) is not None and _const(dqc.inputs[1]) is not None:
                qb, sb = _const(dqc.inputs[0]), _const(dqc.inputs[1])
                zb = _const(dqc.inputs[2]) if len(dqc.inputs) > 2 and dqc.inputs[2].name else np.zeros(1)
                cv = (qb.astype(np.float64) - zb.astype(np.float64)) * sb.astype(np.float64)
            if cv is None or cv.size not in (1, n):
                why = "Gemm C is not a constant per-output bias"
            else:
                bias = np.broadcast_to(np.asarray(cv, np.float32).reshape(-1) * np.float32(node.attrs.get("beta", 1.0)),
                                       (n,)).astype(np.float32)
        b = None
        if why is None:
            density = si.block_density(wq, r)
            rec["stored_density"] = round(density, 4)
            dense = density > 1.0 - cfg.min_sparsity
            if dense and not any_sparse:
                why = (f"{density:.0%} of its {r}x4 blocks hold a non-zero (needs <= "
                       f"{1 - cfg.min_sparsity:.0%}: use a block pattern, e.g. --pattern {r}x4)")
            else:
                b = si.to_bsr_int8(wq, sw, r, keep_all=dense)
                if dense:
                    rec.update(stored_density=1.0, kernel=f"int8 {variant} (dense: every block)")
        if why is not None:
            rec["lowered"] = False
            layers.append(rec)
            warnings.append(f"{label}: int8 layer kept dense ({why}; {zeros:.0%} zeros)")
            continue
        pre = f"{label}_bsr8"
        arrays = [gs.Constant(f"{pre}_data", b.data), gs.Constant(f"{pre}_indices", b.indices),
                  gs.Constant(f"{pre}_indptr", b.indptr)]
        relu_node = None
        opset = _relabel_opset(graph, opset, warnings)
        if dyn:  # the scale and correction depend on X's range: computed per call
            op, result = OP_DQ, dyn_mul.outputs[0]
            _ensure_function(graph, op, opset)
            new = gs.Node(op=op, name=f"{label}_sparse8", domain=DOMAIN, inputs=[
                x, *arrays, gs.Constant(f"{pre}_w_scale", sw), gs.Constant(f"{pre}_rowsum", b.row_sums()),
                gs.Constant(f"{pre}_bias", bias)], outputs=[result])
            dead_nodes = (node, dyn_mul)
        else:
            out = node.outputs[0]
            op = OP_Q
            cons = _consumers(out)
            if cfg.fuse_activation and len(cons) == 1 and cons[0].op == "Relu" and out.name not in outputs:
                relu_node, op = cons[0], OP_Q_RELU
            result = relu_node.outputs[0] if relu_node is not None else out
            _ensure_function(graph, op, opset)
            scale, corr, bias_ = si.epilogue_args(b, L.sx, L.zx, bias)
            consts = [*arrays, gs.Constant(f"{pre}_scale", scale), gs.Constant(f"{pre}_corr", corr),
                      gs.Constant(f"{pre}_bias", bias_)]
            new = gs.Node(op=op, name=f"{label}_sparse8", domain=DOMAIN, inputs=[x, *consts, L.x_scale, L.x_zp],
                          outputs=[result])
            dead_nodes = (node, relu_node)
        for dead in dead_nodes:
            if dead is not None:
                dead.outputs.clear()
                dead.inputs.clear()
        graph.nodes.append(new)
        rec.update(lowered=True, kernel_op=op, fused=["Relu"] if relu_node is not None else [])
        layers.append(rec)
        lowered += 1
    return lowered, opset


def int8_sparse_candidates(model: onnx.ModelProto, tvm_target, min_sparsity: float = 0.5) -> list[str]:
    """QDQ int8 MatMul/Gemm layers of ``model`` that ``lower.sparse`` would turn into int8 sparse kernels on
    ``tvm_target`` (x86 or aarch64; ``min_sparsity`` of the R x 4 blocks empty): the pipeline compiles a quantized
    model for TVM instead of shipping it to onnxruntime when there is at least one."""
    from targets.sparse_kernels import target_family

    if target_family(tvm_target) not in ("x86", "arm") or not any(
            n.op_type in ("DequantizeLinear", "DynamicQuantizeLinear") for n in model.graph.node):
        return []
    return _int8_sparse_layers(gs.import_onnx(model), tvm_target, min_sparsity)


def lower_int8_all(model: onnx.ModelProto, target_spec) -> onnx.ModelProto:
    """Every QDQ int8 MatMul/Gemm layer the int8 kernels take, lowered whatever its sparsity (the dense
    twin of ``compress bench``: its int8 layers then run the int8 kernel with every block stored)."""
    g = gs.import_onnx(model)
    ctx = PassContext(target=target_spec, opset=g.opset or 17, template=model)
    tvm_target = getattr(target_spec, "tvm_target", None) or "x86"
    _lower_int8(g, LowerSparseConfig(min_sparsity=0.0), tvm_target, _inferred_shapes(g, ctx),
                {t.name for t in g.outputs}, g.opset or 17, [], [])
    g.cleanup(remove_unused_graph_inputs=False).toposort()
    return ctx.export(g)


class LowerSparse(Pass):
    name = "lower.sparse"
    description = ("rewrite sparse constant-weight Gemm/MatMul and Conv into compressor::SparseMatMul / "
                   "SparseConv1x1 / SparseConv (BSR) when a cost model predicts a speed-up")
    Config = LowerSparseConfig

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        from targets import sparse_kernels as sk

        cfg: LowerSparseConfig = self.config
        warnings: list[str] = []
        layers: list[dict] = []
        opset = ctx.opset
        if opset < MIN_OPSET:
            why = _opset_bump_blocker(graph)
            if why:
                warnings.append(f"lower.sparse: opset {opset} < {MIN_OPSET} (no onnxruntime reference for the BSR op) "
                                f"and the model cannot be relabelled ({why}): all layers kept dense")
                return PassResult(False, {"lowered": 0, "layers": []}, warnings)
        tvm_target = getattr(ctx.target, "tvm_target", None) or "x86"
        family = sk.target_family(tvm_target)
        isa = cost_isa(tvm_target) if family != "cuda" else None
        outputs = {t.name for t in graph.outputs}
        shapes = _inferred_shapes(graph, ctx)
        lowered = 0
        shared = 0
        if family != "cuda":
            lowered, opset = _lower_int8(graph, cfg, tvm_target, shapes, outputs, opset, warnings, layers)
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
            kxk_attrs: dict = {}
            if conv:
                w_nk, why, xshape, kxk_attrs = _conv_weight(node, shapes)
                if w_nk is not None and kxk_attrs and family == "cuda":
                    w_nk, why = None, (f"{'x'.join(map(str, kxk_attrs['kernel_shape']))} Conv, strides "
                                       f"{kxk_attrs['strides']}, pads {kxk_attrs['pads']}: the CUDA target has no "
                                       "KxK sparse kernel")
                if w_nk is None:
                    if why:
                        warnings.append(f"{label}: kept dense ({why}; {zeros:.0%} zeros)")
                    continue
                bsz, m = xshape[0], xshape[2] * xshape[3]
                if kxk_attrs:  # output pixels, not input: what the kernel computes per image
                    from targets.conv_kernels import ConvShape

                    kh, kw = kxk_attrs["kernel_shape"]
                    cs = ConvShape(1, xshape[1], xshape[2], xshape[3], int(wv.shape[0]), kh, kw,
                                   *kxk_attrs["strides"], tuple(kxk_attrs["pads"]))
                    m = cs.oh * cs.ow
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
            if conv and not kxk_attrs and family != "cuda" and plain_1x1_kernel(block, m, isa) == "sparse_direct":
                kxk_attrs = {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0]}
            if kxk_attrs and block[1] != 1:  # the KxK kernel runs R x 1 blocks (one tap per block)
                block = (1, 1)
            # the permute-SELL kernel repacks the weight itself: no lanes padding stored
            perm = not conv and family == "x86" and sk.perm_eligible(block, m * bsz, tvm_target, n, k)
            group = 1 if (conv or family == "cuda" or perm) else sk.lanes_group(block, tvm_target)
            key = (w.name, node.op, int(node.attrs.get("transB", 0)), float(node.attrs.get("alpha", 1.0)), block, group)
            cached = bsr_cache.get(key)
            b = cached[0] if cached is not None else sk.to_bsr(w_nk, block, group)
            ratio, basis = predict(node.op, n, k, m, bsz, b.density(), block, family, perm, isa=isa)
            if kxk_attrs:  # (decision) the conv1x1 kernel fit stands in for the shifted-GEMM KxK kernels
                basis = basis.replace("conv1x1 ", f"conv {kxk_attrs['kernel_shape'][0]}x{kxk_attrs['kernel_shape'][1]} "
                                      f"/{kxk_attrs['strides'][0]} (conv1x1 kernel fit) ")
            rec = {"node": label, "op": node.op, "shape": [n, k], "batch": m * bsz, "sparsity": round(float(zeros), 4),
                   "block": f"{block[0]}x{block[1]}", "stored_density": round(b.density(), 4),
                   "predicted_ratio": round(ratio, 2), "cost_model": basis,
                   "kernel": ("sparse_direct" if kxk_attrs else "conv1x1") if conv
                   else sk.kernel_params(block, m * bsz, tvm_target, n, k).variant}
            if ratio < cfg.min_speedup or b.nnzb == 0:
                rec["lowered"] = False
                layers.append(rec)
                why = "all-zero weight" if b.nnzb == 0 else f"predicted {ratio:.2f}x < {cfg.min_speedup}x ({basis})"
                what = (f"{'x'.join(map(str, kxk_attrs['kernel_shape'])) if kxk_attrs else '1x1'} conv {n}x{k}, "
                        f"{bsz}x{m} pixels") if conv else f"{n}x{k}, batch {m}"
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
            op = (OP_KXK if kxk_attrs else OP_CONV) if conv else OP
            relu_node = None
            fcons = _consumers(final)
            if cfg.fuse_activation and len(fcons) == 1 and fcons[0].op == "Relu" and final.name not in outputs:
                relu_node = fcons[0]
                op = (OP_KXK_RELU if kxk_attrs else OP_CONV_RELU) if conv else OP_RELU
            result = relu_node.outputs[0] if relu_node is not None else final
            opset = _relabel_opset(graph, opset, warnings)  # first lowered layer (see _opset_bump_blocker)
            _ensure_function(graph, op, opset)
            pre = f"{label}_bsr"
            if cached is None:
                arrays = [gs.Constant(f"{pre}_data", b.data), gs.Constant(f"{pre}_indices", b.indices),
                          gs.Constant(f"{pre}_indptr", b.indptr)]
                bsr_cache[key] = (b, arrays)
            else:
                arrays = cached[1]
                shared += 1
            consts = [*arrays, gs.Constant(f"{pre}_bias", bias)]
            new = gs.Node(op=op, name=f"{label}_sparse", domain=DOMAIN, inputs=[x, *consts], outputs=[result],
                          attrs=dict(kxk_attrs))
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
