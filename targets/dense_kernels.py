"""Dense ``X @ W^T + bias`` kernels written in TIR for TVM 0.27 CPU targets, and the Relax ONNX
importer converters that route constant-weight ``MatMul`` / ``Gemm`` layers to them.

Why: TVM 0.27's untuned CPU code for a dense matmul is the legalized TOPI loop nest with no
schedule at all (serial, scalar): 10-100x slower than onnxruntime's MLAS on the models of
``bench/end_to_end.py``. meta_schedule closes the gap only after many trials; the default
build (``--tune-trials 0``) must not depend on them. Like the BSR kernels of
:mod:`targets.sparse_kernels`, these are hand-scheduled low-level TIR marked
``tirx.is_scheduled`` (so neither dlight nor meta_schedule touches them again).

Semantics::

    Y[m, n] = act( sum_k X[m, k] * W[n, k] + bias[n] )     X: [M, K], W: [N, K], Y: [M, N]

Weight layout (packed once at compile time, :func:`pack_weight`): the output features are
cut into column tiles of ``NW = NV * V`` (``V`` = fp32 SIMD lanes, :func:`vector_floats`;
``NV`` vectors per tile), ``W`` zero-padded to ``NT * NW`` rows and stored as
``Wp[NT, K, NW]`` with ``Wp[t, k, j] = W[t*NW + j, k]``: for every ``k`` the ``NW`` weights
of a tile are contiguous (``NV`` aligned vector loads), and a tile streams its ``K x NW``
panel front to back. ``bias`` is padded the same way to ``[NT * NW]``.

Schedule (one TIR for x86 AVX2 / AVX-512 and aarch64 NEON; LLVM lowers the ``NW``-wide
``T.vectorized`` axis to ``NV`` registers):

* one task per column tile (``T.parallel(NT)``; serial when the layer is too small to pay
  the thread-pool wake-up, :data:`PARALLEL_MIN_MACS`);
* inside, the batch rows in register tiles of ``MT`` rows (``MT x NV`` vector accumulators,
  initialised with the bias): for every ``k`` one broadcast of ``X[m, k]`` per row and one
  FMA per accumulator vector (the outer-product micro-kernel of every BLAS). Row tiles
  start at ``min(i * MT, M - MT)``: the last one overlaps its neighbour instead of needing
  a remainder loop (those rows are computed twice, identically). The panel of a tile
  (``K x NW`` floats) stays in L2 across the row tiles;
* ``k`` unrolled by ``KU`` (independent loads in flight for the memory-bound GEMV);
* epilogue: optional ReLU, vector stores; the last tile stores only its ``N - (NT-1)*NW``
  valid columns.

Batch 1 (GEMV) is bound by streaming ``W``: ``NV`` independent FMA chains per task are
enough there. Larger batches (``M`` up to a few hundred: transformer tokens) reuse every
weight vector ``MT`` times from registers.

Importer hook (:func:`relax_converters`): ``MatMul(X, B)`` with ``B`` a 2-D float32 relax
``Constant`` (``X`` any rank >= 1; leading dims flattened into ``M``) and ``Gemm(A, B, C)``
with constant ``B`` (and constant or absent ``C``), ``transA = 0``, any ``transB``/``alpha``/
``beta`` (``alpha`` folded into ``W``, ``beta * C`` into the bias when ``C`` broadcasts
over rows, i.e. has shape ``[N]``, ``[1, N]`` or is a scalar). Everything else (activation x
activation MatMuls in attention, non-constant weights, other dtypes, dynamic shapes, a
row-dependent ``C``) is handed to the frontend's own converter unchanged. Nodes reading the
same weight (``lower.rnn``'s per-step recurrent MatMuls) share one packed constant, so an
unrolled RNN streams one copy of ``R`` (cache-resident across steps). Counts of taken /
shared / fallen-back layers are logged and recorded on the imported IRModule
(:func:`annotate`, read back with :func:`module_stats`).

Threads: TVM sizes its CPU pool to half the logical CPUs on x86 (it assumes 2-way SMT);
:func:`default_runtime_threads` (called by ``targets.tvm_backend``) sets one worker per
physical core, as onnxruntime's default intra-op pool has, unless ``TVM_NUM_THREADS`` is set.

Measured (AMD EPYC Zen 4, AVX-512, 2 shared cores; one thread each, interleaved runs):
0.7-1.1x onnxruntime's MLAS time for GEMV (M = 1, N, K in 1024..3072) and GEMM
(M = 8..128, N, K in 256..2048).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from targets.frontend_util import const_array, frontend_converter, model_opset

from targets.sparse_kernels import CPU_STACK, target_family, vector_floats

log = logging.getLogger(__name__)

ACTIVATIONS = ("none", "relu")
# below this many multiply-adds a layer runs on the calling thread: a fork-join of TVM's
# thread pool costs a few microseconds, what a [1, 512] x [512, 512] GEMV (2^18 MACs, ~7 us on
# one Zen 4 core from L2) would save by splitting in two
PARALLEL_MIN_MACS = 1 << 18


@dataclass(frozen=True)
class DenseParams:
    lanes: int  # V: fp32 lanes of one SIMD register
    nvec: int  # NV: vectors per column tile (NW = NV * V columns)
    mtile: int  # MT: batch rows per register tile
    kunroll: int  # KU: k-loop unroll
    parallel: bool

    @property
    def width(self) -> int:
        return self.lanes * self.nvec


def kernel_params(m: int, n: int, k: int, target: Any) -> DenseParams:
    """Tile shape per target: ``MT x NV`` accumulator vectors fill about 3/4 of the register
    file (AVX-512 and NEON: 32 registers -> 6 x 4; AVX2: 16 registers -> 6 x 2), leaving
    room for the ``NV`` weight vectors and the broadcast. Narrow layers use fewer vectors
    (no tile wider than the padded ``N``)."""
    fam = target_family(target)
    if fam not in ("x86", "arm", "cpu"):
        raise ValueError(f"dense TIR kernels are for CPU targets, not {fam!r}")
    v = vector_floats(target)
    nv_max = 2 if (fam == "x86" and v == 8) else 4
    nv = max(1, min(nv_max, -(-n // v)))
    mt_max = 6
    mt = mtile_for(m, mt_max)
    ku = 4 if k % 4 == 0 else (2 if k % 2 == 0 else 1)
    return DenseParams(v, nv, mt, ku, m * n * k >= PARALLEL_MIN_MACS)


def mtile_for(m: int, mt_max: int) -> int:
    """Rows per register tile: all of ``m`` when it fits, else the tile size in
    ``[mt_max/2, mt_max]`` wasting the fewest recomputed rows (larger on ties)."""
    if m <= mt_max:
        return m
    best = min(range(max(1, mt_max // 2), mt_max + 1), key=lambda t: (-(-m // t) * t, -t))
    return best


def num_tiles(n: int, p: DenseParams) -> int:
    return -(-n // p.width)


# ------------------------------------------------------------------ packing / oracle


def pack_weight(w_nk: np.ndarray, p: DenseParams) -> np.ndarray:
    """``W[N, K]`` -> ``Wp[NT, K, NW]`` (zero-padded columns)."""
    w_nk = np.asarray(w_nk, dtype=np.float32)
    n, k = w_nk.shape
    nw = p.width
    nt = num_tiles(n, p)
    pad = np.zeros((nt * nw, k), np.float32)
    pad[:n] = w_nk
    return np.ascontiguousarray(pad.reshape(nt, nw, k).transpose(0, 2, 1))


def pack_bias(bias: np.ndarray | None, n: int, p: DenseParams) -> np.ndarray:
    out = np.zeros(num_tiles(n, p) * p.width, np.float32)
    if bias is not None:
        out[:n] = np.asarray(bias, np.float32).reshape(-1)
    return out


def reference(x: np.ndarray, w_nk: np.ndarray, bias: np.ndarray | None = None, activation: str = "none") -> np.ndarray:
    """numpy oracle (float64 accumulate)."""
    y = x.astype(np.float64) @ np.asarray(w_nk, np.float64).T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if activation == "relu":
        y = np.maximum(y, 0)
    return y.astype(np.float32)


# ------------------------------------------------------------------ TIR


def make_primfunc(m: int, n: int, k: int, activation: str = "none", target: Any = "x86",
                  params: DenseParams | None = None):
    """PrimFunc ``f(x[M, K], wp[NT, K, NW], bias[NT*NW], y[M, N])`` (see the module docstring).

    The TVMScript is generated as text because the accumulators are ``MT`` separate
    ``[NW]`` buffers: TVM keeps a constant-size CPU allocation on the stack (where LLVM
    promotes it to registers) only below 1024 bytes (``kMaxStackAlloca``); one ``[MT, NW]``
    buffer of 6 x 64 floats would become a heap workspace that every FMA stores back to."""
    import tvm

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not in {ACTIVATIONS}")
    if min(m, n, k) < 1:
        raise ValueError(f"empty matmul [{m}, {k}] x [{k}, {n}]")
    p = params or kernel_params(m, n, k, target)
    nw, mt, ku = p.width, min(p.mtile, m), p.kunroll
    if k % ku:
        raise ValueError(f"k unroll {ku} does not divide K = {k}")
    if nw * 4 >= 1024:
        raise ValueError(f"column tile of {nw} floats does not fit a stack accumulator")
    nt = num_tiles(n, p)
    nmt = -(-m // mt)
    last = n - (nt - 1) * nw  # valid columns of the last tile
    full = nt if last == nw else nt - 1  # tiles whose every column is a real output
    outer = "T.parallel" if p.parallel else "T.serial"
    row = "T.min(mo * {mt}, {lim}) + {r}"
    rows = [row.format(mt=mt, lim=m - mt, r=r) for r in range(mt)]

    def act(v: str) -> str:
        return f"T.max({v}, T.float32(0))" if activation == "relu" else v

    src = [
        "@T.prim_func",
        f"def dense(x: T.Buffer(({m}, {k}), 'float32'), wp: T.Buffer(({nt}, {k}, {nw}), 'float32'),",
        f"          bias: T.Buffer(({nt * nw},), 'float32'), y: T.Buffer(({m}, {n}), 'float32')):",
        "    T.func_attr({'tir.noalias': True, 'tirx.is_scheduled': True})",
        f"    for t in {outer}({nt}):",
        f"        for mo in T.serial({nmt}):",
    ]
    ind = " " * 12
    for r in range(mt):
        src.append(f"{ind}acc{r} = T.decl_buffer(({nw},), 'float32', scope='{CPU_STACK}')")
    for r in range(mt):
        src += [f"{ind}for j in T.vectorized({nw}):", f"{ind}    acc{r}[j] = bias[t * {nw} + j]"]
    src += [f"{ind}for ko in T.serial({k // ku}):", f"{ind}    for kk in T.unroll({ku}):"]
    for r in range(mt):
        src += [f"{ind}        for j in T.vectorized({nw}):",
                f"{ind}            acc{r}[j] = acc{r}[j] + x[{rows[r]}, ko * {ku} + kk] * wp[t, ko * {ku} + kk, j]"]
    src.append(f"{ind}if t < {full}:")
    for r in range(mt):
        src += [f"{ind}    for j in T.vectorized({nw}):",
                f"{ind}        y[{rows[r]}, t * {nw} + j] = {act(f'acc{r}[j]')}"]
    src.append(f"{ind}else:")
    for r in range(mt):
        src += [f"{ind}    for j in T.vectorized({last}):",
                f"{ind}        y[{rows[r]}, t * {nw} + j] = {act(f'acc{r}[j]')}"]
    from tvm.script import tirx as T

    return tvm.script.from_source("\n".join(src) + "\n", extra_vars={"T": T})


def kernel_args(x: np.ndarray, w_nk: np.ndarray, bias: np.ndarray | None, p: DenseParams) -> list[np.ndarray]:
    n = w_nk.shape[0]
    return [np.ascontiguousarray(x, np.float32), pack_weight(w_nk, p), pack_bias(bias, n, p)]


def build(m: int, n: int, k: int, activation: str, tvm_target: Any, params: DenseParams | None = None):
    """Compile a standalone kernel: returns ``(f, params)``; call ``f(*kernel_args, y)``."""
    import tvm

    tgt = tvm_target if isinstance(tvm_target, tvm.target.Target) else tvm.target.Target(tvm_target)
    p = params or kernel_params(m, n, k, tgt)
    f = make_primfunc(m, n, k, activation, tgt, p).with_attr("global_symbol", "dense_kernel")
    mod = tvm.IRModule({"dense_kernel": f})
    with tgt:
        lib = tvm.compile(mod, target=tgt)
    return lib["dense_kernel"], p


# ------------------------------------------------------------------ Relax ONNX frontend hook

OPS = ("MatMul", "Gemm")


@dataclass
class DenseState:
    """Per-import bookkeeping of the converters (one per :func:`relax_converters` call)."""

    kernels: int = 0  # layers lowered to the packed kernel
    shared: int = 0  # of those, layers reusing another layer's packed weight constant
    fallbacks: list[str] = field(default_factory=list)  # "op node: reason" handed to the frontend
    _packed: dict = field(default_factory=dict, repr=False)  # weight digest -> relax.Constant

    def summary(self) -> dict[str, Any]:
        return {"dense_kernels": self.kernels, "dense_shared_weights": self.shared,
                "dense_fallbacks": len(self.fallbacks)}


def _static_shape(e) -> list[int] | None:
    try:
        return [int(d) for d in e.ty.shape]
    except Exception:  # dynamic dims, tuples, shape values
        return None


def _dtype(e) -> str | None:
    try:
        return str(e.ty.dtype)
    except Exception:
        return None


def gemm_bias(c: np.ndarray | None, beta: float, n: int) -> np.ndarray | None | str:
    """``beta * C`` as a per-column ``[N]`` bias, ``None`` without ``C``, or the reason it is
    not one (``C`` varies over rows)."""
    if c is None:
        return None
    c = np.asarray(c, np.float32)
    if c.size == 1:
        return np.full(n, float(c.reshape(())) * beta, np.float32)
    if c.ndim >= 1 and c.shape[-1] == n and c.size == n:
        return (c.reshape(n).astype(np.float64) * beta).astype(np.float32)
    return f"C of shape {list(c.shape)} is not a per-column bias"


def relax_converters(tvm_target: Any, model=None) -> tuple[dict[str, type], DenseState]:
    """Converters for ``MatMul`` and ``Gemm`` on CPU targets (``({}, state)`` for CUDA, whose
    dlight rules schedule dense matmuls already). A layer the packed kernel does not cover
    is converted by the frontend's own converter (listed in ``state.fallbacks``)."""
    import hashlib

    from tvm import relax

    state = DenseState()
    if target_family(tvm_target) not in ("x86", "arm", "cpu"):
        return {}, state
    original = frontend_converter(model_opset(model))

    def fallback(op: str, name: str, reason: str, bb, inputs, attr, params):
        state.fallbacks.append(f"{op} {name or '<unnamed>'}: {reason}")
        log.debug("%s %s: %s; frontend converter", op, name, reason)
        return original(op, bb, inputs, attr, params)

    def emit(bb, x, x_shape: list[int], w_nk: np.ndarray, bias: np.ndarray | None, key: tuple):
        n, k = (int(v) for v in w_nk.shape)
        m = int(np.prod(x_shape[:-1])) if len(x_shape) > 1 else 1
        p = kernel_params(m, n, k, tvm_target)
        digest = (hashlib.sha1(np.ascontiguousarray(w_nk).tobytes()).hexdigest(), w_nk.shape, p.width, *key)
        wconst = state._packed.get(digest)
        if wconst is None:
            wconst = state._packed[digest] = relax.const(pack_weight(w_nk, p))
        else:
            state.shared += 1
        prim = make_primfunc(m, n, k, "none", tvm_target, p).without_attr("global_symbol")
        gv = bb.add_func(prim, "dense_packed")
        x2 = x if len(x_shape) == 2 else relax.op.reshape(x, (m, k))
        y = relax.call_tir(gv, [x2, wconst, relax.const(pack_bias(bias, n, p))], relax.TensorType((m, n), "float32"))
        state.kernels += 1
        if len(x_shape) != 2:
            y = relax.op.reshape(bb.normalize(y), (*x_shape[:-1], n))
        return y

    def check_x(x, k: int) -> tuple[list[int] | None, str]:
        shape = _static_shape(x)
        if shape is None or len(shape) < 1:
            return None, "input shape not static"
        if _dtype(x) != "float32":
            return None, f"input dtype {_dtype(x)}"
        if shape[-1] != k:
            return None, f"input {shape} does not match weight K = {k}"
        if int(np.prod(shape)) == 0:
            return None, "empty input"
        return shape, ""

    def matmul_impl(cls, bb, inputs, attr, params):
        name = str(attr.get("tvm_custom", {}).get("name", ""))
        x, b = inputs[0], inputs[1]
        w = const_array(b)
        if w is None:
            return fallback("MatMul", name, "second input is not a constant", bb, inputs, attr, params)
        if w.ndim != 2 or w.dtype != np.float32:
            return fallback("MatMul", name, f"weight {w.dtype}{list(w.shape)} is not 2-D float32", bb, inputs,
                            attr, params)
        shape, reason = check_x(x, int(w.shape[0]))
        if shape is None:
            return fallback("MatMul", name, reason, bb, inputs, attr, params)
        y = emit(bb, x, shape, np.ascontiguousarray(w.T), None, ("matmul",))
        if len(shape) == 1:  # [K] @ [K, N] -> [N]
            y = relax.op.reshape(bb.normalize(y), (int(w.shape[1]),))
        return y

    def gemm_impl(cls, bb, inputs, attr, params):
        name = str(attr.get("tvm_custom", {}).get("name", ""))
        a, b = inputs[0], inputs[1]
        c = inputs[2] if len(inputs) > 2 else None
        alpha, beta = float(attr.get("alpha", 1.0)), float(attr.get("beta", 1.0))
        w = const_array(b)
        if int(attr.get("transA", 0)):
            return fallback("Gemm", name, "transA=1", bb, inputs, attr, params)
        if w is None:
            return fallback("Gemm", name, "B is not a constant", bb, inputs, attr, params)
        if w.ndim != 2 or w.dtype != np.float32:
            return fallback("Gemm", name, f"B {w.dtype}{list(w.shape)} is not 2-D float32", bb, inputs, attr, params)
        c_np = const_array(c) if c is not None else None
        if c is not None and c_np is None:
            return fallback("Gemm", name, "C is not a constant", bb, inputs, attr, params)
        w_nk = w if int(attr.get("transB", 0)) else w.T
        shape, reason = check_x(a, int(w_nk.shape[1]))
        if shape is not None and len(shape) != 2:
            shape, reason = None, f"A of rank {len(shape)}"
        if shape is None:
            return fallback("Gemm", name, reason, bb, inputs, attr, params)
        bias = gemm_bias(c_np, beta, int(w_nk.shape[0]))
        if isinstance(bias, str):
            return fallback("Gemm", name, bias, bb, inputs, attr, params)
        if alpha != 1.0:
            w_nk = (w_nk.astype(np.float64) * alpha).astype(np.float32)
        return emit(bb, a, shape, np.ascontiguousarray(w_nk, np.float32), bias, ("gemm",))

    from tvm.relax.frontend.onnx import onnx_frontend

    base = onnx_frontend.OnnxOpConverter
    return ({"MatMul": type("MatMulDenseKernelConverter", (base,), {"_impl_v1": classmethod(matmul_impl)}),
             "Gemm": type("GemmDenseKernelConverter", (base,), {"_impl_v1": classmethod(gemm_impl)})}, state)


MODULE_ATTR = "compressor_dense"


def annotate(mod, state: DenseState):
    """Log how many layers got the packed kernel and record it on the IRModule
    (attribute :data:`MODULE_ATTR`, read back with :func:`module_stats`)."""
    if state.kernels or state.fallbacks:
        log.info("dense kernels: %d MatMul/Gemm layer(s) packed (%d sharing a weight), %d left to the "
                 "frontend%s", state.kernels, state.shared, len(state.fallbacks),
                 f" ({'; '.join(state.fallbacks[:4])}{' ...' if len(state.fallbacks) > 4 else ''})"
                 if state.fallbacks else "")
    return mod.with_attr(MODULE_ATTR, state.summary())


def module_stats(mod) -> dict[str, int]:
    """The counts :func:`annotate` recorded (empty when the import had no MatMul/Gemm)."""
    attrs = mod.attrs
    if attrs is None or MODULE_ATTR not in attrs:
        return {}
    return {str(k): int(v) for k, v in attrs[MODULE_ATTR].items()}


# ------------------------------------------------------------------ runtime threads


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once),
    from Linux sysfs; the affinity count where the topology is not readable."""
    import os
    from pathlib import Path

    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for c in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{c}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(c)))
    return max(1, len(cores))


def default_runtime_threads() -> None:
    """Give TVM's CPU thread pool one worker per physical core, as onnxruntime's default
    intra-op pool has. TVM itself assumes 2-way SMT on every x86 host and halves the
    logical CPU count, which on a VM without SMT (2 vCPUs = 2 cores) runs every
    ``T.parallel`` kernel on one thread while onnxruntime uses two. Takes effect only before
    the pool is first used; an explicit ``TVM_NUM_THREADS`` is kept."""
    import os

    if not os.environ.get("TVM_NUM_THREADS"):
        os.environ["TVM_NUM_THREADS"] = str(physical_cores())
