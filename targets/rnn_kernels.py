"""Fused recurrence kernels: a whole ONNX ``GRU`` / ``LSTM`` (every time step, every
direction) as one TIR function, for the CPU targets.

Why. ``lower.rnn`` unrolls a recurrence into one MatMul and a handful of elementwise ops per
time step. For small hidden sizes the time is then the VM's per-call overhead, not
arithmetic: the 32-wide GRU of ``models/`` (16 steps) ran 16 us as 31 kernel calls, 70
allocations and 16 reshapes per inference (VM profile), the same as onnxruntime, while its
arithmetic is ~60 K MACs. Here one call runs the recurrence with the state in stack
buffers; ``lower.rnn`` keeps small RNN nodes (``fuse_max_macs``) for this converter and
unrolls the large ones, whose per-step GEMVs are worth the parallel sparse kernels.

Weights as "segments" (sparse where the weight is). A weight ``M [G*H, K]`` (ONNX ``W[d]``
``[G*H, input]`` or ``R[d]`` ``[G*H, H]``) is cut into segments of ``V`` consecutive
output rows x one input column (``V`` = SIMD lanes dividing ``H``: 16 on AVX-512, 8 on
AVX2, 4 on NEON). Output rows go in chunks of ``u <= 8`` segments whose accumulators stay
in registers for the whole input loop. Each weight runs in one of two modes:

* ``dense``: per input column one broadcast of ``x[k]`` and ``u`` FMAs
  (``W^T`` stored ``[K, G*H]``);
* ``seg`` (ELL): per chunk, each of its ``u`` row groups keeps the list of its non-zero
  segments ``(k, values)``, padded with zero segments to the chunk's longest list, and a
  step is ``acc[q] += x[k[q]] * val[q]`` for the ``u`` groups (:func:`pack_segments`).

Block-structured sparsity (``8x1`` / ``16x1`` output blocks: whole segments zero) drops
steps in proportion. Unstructured 90% leaves ``1 - 0.9^V`` of the segments non-zero, so its
steps stay near dense and it runs dense. :func:`weight_mode` picks by padded steps
(:data:`ELL_STEP_COST`).

Semantics are ONNX's (opset 14 ``GRU`` / ``LSTM``, default activations, layout 0 inside;
the converter transposes layout 1): ``Y [S, D, B, H]``, ``Y_h [D, B, H]``, ``Y_c``. The
gate functions use the same rational tanh approximation as TVM's ``fast_tanh``
(sigmoid(v) = 0.5 tanh(v/2) + 0.5), |error| < 1e-6 (``tests/targets/test_rnn_kernels.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from targets.sparse_kernels import CPU_STACK, target_family, vector_floats

CELLS = {"GRU": 3, "LSTM": 4}  # gates per cell (ONNX order: GRU z, r, h; LSTM i, o, f, c)
DEFAULT_ACTIVATIONS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"]}

# TVM's topi.fast_tanh (a 13/6 rational approximation on [-9, 9]); the coefficients are
# printed by ``topi.fast_tanh(te.placeholder(...)).op.body``.
_TANH_ALPHA = (-2.76076847742355e-16, 2.0001879048247699e-13, -8.60467152213735e-11, 5.1222970903711401e-08,
               1.4857223571797901e-05, 0.00063726192887543596, 0.0048935245589178597)
_TANH_BETA = (1.1982583946670199e-06, 0.000118534705686654, 0.0022684346324390002, 0.0048935251855438504)


def fast_tanh_np(v: np.ndarray) -> np.ndarray:
    """numpy float32 twin of the kernels' tanh (what the unit tests check the bound of)."""
    x = np.clip(np.asarray(v, np.float32), -9, 9)
    x2 = x * x
    p = np.float32(_TANH_ALPHA[0])
    for a in _TANH_ALPHA[1:]:
        p = x2 * p + np.float32(a)
    q = np.float32(_TANH_BETA[0])
    for b in _TANH_BETA[1:]:
        q = x2 * q + np.float32(b)
    return (x * p / q).astype(np.float32)


def segment_width(hidden: int, target: Any) -> int:
    """Largest power of two <= the target's fp32 SIMD lanes that divides ``hidden``."""
    v = vector_floats(target)
    while v > 1 and hidden % v:
        v //= 2
    return v


def tile(rows: int, v: int) -> int:
    """SIMD vectors of accumulators a chunk of ``rows`` output rows keeps in registers (<= 8)."""
    q = rows // v
    return max(u for u in range(1, min(8, q) + 1) if q % u == 0)


@dataclass(frozen=True)
class Segments:
    """One weight (all directions) in ELL chunks of segments (see the module docstring).

    Chunk ``c`` (order: direction, phase, chunk of ``u*V`` output rows) holds
    ``steps_c = (ptr[c+1] - ptr[c]) / u`` steps of ``u`` slots; slot ``ptr[c] + st*u + q``
    is the ``st``-th stored segment of the chunk's ``q``-th ``V``-row group (input index
    ``k``, values ``val``), padded with zero segments to the chunk's longest list."""

    val: np.ndarray  # float32 [slots, V] (slots >= 1: a dummy row when nothing is stored)
    k: np.ndarray  # int32 [slots]
    ptr: np.ndarray  # int32 [chunks + 1], in slots
    stored: int  # non-zero segments
    dense: int  # segments of the dense weight
    steps: int  # padded steps over all chunks
    dense_steps: int  # steps of the dense loop (K per chunk)


def pack_segments(w: np.ndarray, v: int, phases: tuple[int, ...] = ()) -> Segments:
    """``w [D, N, K]`` -> :class:`Segments` of width ``v`` (``N % v == 0``); ``phases``:
    output-row boundaries that start a new phase (GRU with ``linear_before_reset=0``
    computes its h-gate rows after the reset gate: ``(2H,)``). Each phase's rows are cut in
    chunks of :func:`tile` ``(rows, v) * v`` rows, as the kernel's loops are."""
    d_, n, k = w.shape
    if n % v:
        raise ValueError(f"{n} output rows not divisible by the segment width {v}")
    bounds = [0, *phases, n]
    vals, ks, ptr = [], [], [0]
    stored = steps = dense_steps = 0
    for d in range(d_):
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            u = tile(hi - lo, v)
            for r0 in range(lo, hi, u * v):
                seg = w[d, r0:r0 + u * v].reshape(u, v, k)
                nz = np.any(seg != 0, axis=1)  # [u, k]
                lists = [np.nonzero(nz[q])[0] for q in range(u)]
                n_st = max(len(x) for x in lists)
                kk = np.zeros((n_st, u), np.int32)
                vv = np.zeros((n_st, u, v), np.float32)
                for q, x in enumerate(lists):
                    kk[:len(x), q] = x
                    vv[:len(x), q] = seg[q][:, x].T
                vals.append(vv.reshape(-1, v))
                ks.append(kk.reshape(-1))
                ptr.append(ptr[-1] + n_st * u)
                stored += int(nz.sum())
                steps += n_st
                dense_steps += k
    val = np.concatenate(vals) if ptr[-1] else np.zeros((1, v), np.float32)
    kx = np.concatenate(ks) if ptr[-1] else np.zeros(1, np.int32)
    return Segments(np.ascontiguousarray(val, np.float32), kx.astype(np.int32), np.asarray(ptr, np.int32), stored,
                    d_ * (n // v) * k, steps, dense_steps)


@dataclass(frozen=True)
class RNNSpec:
    cell: str  # "GRU" | "LSTM"
    seq: int
    batch: int
    input: int
    hidden: int
    direction: str  # "forward" | "reverse" | "bidirectional"
    linear_before_reset: int = 0

    @property
    def dirs(self) -> int:
        return 2 if self.direction == "bidirectional" else 1

    @property
    def gates(self) -> int:
        return CELLS[self.cell]

    def macs_per_step(self) -> int:
        """Dense multiply-adds of one time step, all directions and batch rows."""
        return self.dirs * self.batch * self.gates * self.hidden * (self.hidden + self.input)


def split_phase(spec: RNNSpec) -> tuple[int, ...]:
    """R's phase boundaries: GRU with linear_before_reset=0 multiplies R_h by r * H, known
    only after the z/r gates."""
    return (2 * spec.hidden,) if spec.cell == "GRU" and not spec.linear_before_reset else ()


def biases(spec: RNNSpec, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """ONNX ``B [D, 2*G*H]`` -> ``(bx, bh)`` [D, G*H]: the accumulators' initial values.
    Only GRU with linear_before_reset=1 keeps R's bias apart (it is scaled by r)."""
    gh = spec.gates * spec.hidden
    if b is None:
        b = np.zeros((spec.dirs, 2 * gh), np.float32)
    b = np.asarray(b, np.float32)
    wb, rb = b[:, :gh], b[:, gh:]
    if spec.cell == "GRU" and spec.linear_before_reset:
        return np.ascontiguousarray(wb), np.ascontiguousarray(rb)
    return np.ascontiguousarray(wb + rb), np.zeros_like(wb)


def make_primfunc(spec: RNNSpec, nw: int, nr: int, target: Any, modes: tuple[str, str] = ("seg", "seg")):
    """PrimFunc ``f(x [S,B,I], h0 [D,B,H], [c0 [D,B,H],] wval, wk, wptr, rval, rk, rptr, bx, bh,
    y [S,D,B,H], yh [D,B,H] [, yc [D,B,H]])``. ``modes`` (W, R): ``"seg"`` -- ``*val`` /
    ``*k`` / ``*ptr`` are a :class:`Segments` (values flattened: ``nw`` / ``nr`` floats);
    ``"dense"`` -- ``*val`` is the transposed weight ``[D, K, G*H]`` flattened, kept in
    registers ``u`` SIMD vectors at a time (the segment arrays are then unused dummies)."""
    from tvm import tirx
    from tvm.script import tirx as T

    cell, S, B, I, H, D = spec.cell, spec.seq, spec.batch, spec.input, spec.hidden, spec.dirs
    GH = spec.gates * H
    v = segment_width(H, target)
    ho, gho = H // v, GH // v
    P = 2 if split_phase(spec) else 1
    # R's phases as (first output row, rows): one for LSTM / GRU lbr=1, GRU lbr=0 splits off the h gate
    rphase = [(0, 2 * H), (2 * H, H)] if P == 2 else [(0, GH)]
    # chunks of u SIMD vectors of output rows (the kernel's and pack_segments' loops agree):
    # W in one phase; R per phase as (first row, u, chunks, first chunk id within a direction)
    uw = tile(GH, v)
    chw = GH // (uw * v)
    rph, chr_ = [], 0
    for row0, rows in rphase:
        rph.append((row0, tile(rows, v), rows // (tile(rows, v) * v), chr_))
        chr_ += rows // (tile(rows, v) * v)
    lbr = spec.linear_before_reset
    # time index of step t in direction d: reversed for "reverse" and the second direction
    rev0 = 1 if spec.direction == "reverse" else 0
    revd = 1 if spec.direction == "bidirectional" else 0
    half = T.float32(0.5)
    wmode, rmode = modes
    # segment index arrays (dummies of 1 when dense)
    nwi, nri = (1 if wmode == "dense" else nw // v), (1 if rmode == "dense" else nr // v)

    def tanh(u):
        # Let-bound: a shared sub-expression would be emitted once per use by the codegen
        c = tirx.Var("c", "float32")
        c2 = tirx.Var("c2", "float32")
        p = T.float32(_TANH_ALPHA[0])
        for a in _TANH_ALPHA[1:]:
            p = c2 * p + T.float32(a)
        q = T.float32(_TANH_BETA[0])
        for b in _TANH_BETA[1:]:
            q = c2 * q + T.float32(b)
        return tirx.Let(c, T.max(T.min(u, T.float32(9)), T.float32(-9)), tirx.Let(c2, c * c, c * p / q))

    def sigmoid(u):
        return tanh(u * half) * half + half

    @T.macro
    def ell_acc(acc, vec, val, kx, ptr, cid0, row0, chunks, u):
        for c in T.serial(chunks):
            tacc = T.decl_buffer((u * v,), "float32", scope=CPU_STACK)  # u SIMD registers
            for q in T.unroll(u):
                for ji in T.vectorized(v):
                    tacc[q * v + ji] = acc[row0 + c * u * v + q * v + ji]
            for st in T.serial((ptr[cid0 + c + 1] - ptr[cid0 + c]) // u):
                for q in T.unroll(u):
                    for ji in T.vectorized(v):
                        tacc[q * v + ji] = tacc[q * v + ji] + vec[kx[ptr[cid0 + c] + st * u + q]] * val[
                            (ptr[cid0 + c] + st * u + q) * v + ji]
            for q in T.unroll(u):
                for ji in T.vectorized(v):
                    acc[row0 + c * u * v + q * v + ji] = tacc[q * v + ji]

    @T.macro
    def dense_acc(acc, vec, val, base, row0, chunks, u, kdim):
        for c in T.serial(chunks):
            tacc = T.decl_buffer((u * v,), "float32", scope=CPU_STACK)  # u SIMD registers
            for q in T.unroll(u):
                for ji in T.vectorized(v):
                    tacc[q * v + ji] = acc[row0 + c * u * v + q * v + ji]
            for kk in T.serial(kdim):
                for q in T.unroll(u):
                    for ji in T.vectorized(v):
                        tacc[q * v + ji] = tacc[q * v + ji] + vec[kk] * val[
                            base + kk * GH + row0 + c * u * v + q * v + ji]
            for q in T.unroll(u):
                for ji in T.vectorized(v):
                    acc[row0 + c * u * v + q * v + ji] = tacc[q * v + ji]

    @T.macro
    def w_acc(acc, vec, val, kx, ptr, d):
        if wmode == "dense":
            dense_acc(acc, vec, val, d * I * GH, 0, chw, uw, I)
        else:
            ell_acc(acc, vec, val, kx, ptr, d * chw, 0, chw, uw)

    @T.macro
    def r_acc(acc, vec, val, kx, ptr, d, row0, u, chunks, cid):
        if rmode == "dense":
            dense_acc(acc, vec, val, d * H * GH, row0, chunks, u, H)
        else:
            ell_acc(acc, vec, val, kx, ptr, d * chr_ + cid, row0, chunks, u)

    @T.macro
    def vcopy(dst, dst0, src, src0, n):
        for jo in T.serial(n // v):
            for ji in T.vectorized(v):
                dst[dst0 + jo * v + ji] = src[src0 + jo * v + ji]

    if cell == "GRU":

        @T.prim_func
        def gru_fn(x_: T.Buffer((S, B, I), "float32"), h0_: T.Buffer((D, B, H), "float32"),
                   wval: T.Buffer((nw,), "float32"), wk: T.Buffer((nwi,), "int32"),
                   wptr: T.Buffer((D * chw + 1,), "int32"),
                   rval: T.Buffer((nr,), "float32"), rk: T.Buffer((nri,), "int32"),
                   rptr: T.Buffer((D * chr_ + 1,), "int32"),
                   bx: T.Buffer((D * GH,), "float32"), bh: T.Buffer((D * GH,), "float32"),
                   y_: T.Buffer((S, D, B, H), "float32"), yh_: T.Buffer((D, B, H), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            x = T.decl_buffer((S * B * I,), "float32", data=x_.data)
            h0 = T.decl_buffer((D * B * H,), "float32", data=h0_.data)
            y = T.decl_buffer((S * D * B * H,), "float32", data=y_.data)
            yh = T.decl_buffer((D * B * H,), "float32", data=yh_.data)
            for d in T.serial(D):
                for bi in T.serial(B):
                    hs = T.decl_buffer((H,), "float32", scope=CPU_STACK)
                    rh = T.decl_buffer((H,), "float32", scope=CPU_STACK)
                    xs = T.decl_buffer((I,), "float32", scope=CPU_STACK)
                    ax = T.decl_buffer((GH,), "float32", scope=CPU_STACK)
                    ah = T.decl_buffer((GH,), "float32", scope=CPU_STACK)
                    vcopy(hs, 0, h0, (d * B + bi) * H, H)
                    for t in T.serial(S):
                        tt = t + (rev0 + revd * d) * (S - 1 - 2 * t)
                        for i in T.serial(I):
                            xs[i] = x[(tt * B + bi) * I + i]
                        vcopy(ax, 0, bx, d * GH, GH)
                        vcopy(ah, 0, bh, d * GH, GH)
                        w_acc(ax, xs, wval, wk, wptr, d)
                        r_acc(ah, hs, rval, rk, rptr, d, rph[0][0], rph[0][1], rph[0][2], rph[0][3])
                        if lbr == 1:
                            for jo in T.serial(ho):
                                for ji in T.vectorized(v):
                                    ax[2 * H + jo * v + ji] = tanh(ax[2 * H + jo * v + ji] + sigmoid(
                                        ax[H + jo * v + ji] + ah[H + jo * v + ji]) * ah[2 * H + jo * v + ji])
                                    hs[jo * v + ji] = ax[2 * H + jo * v + ji] + sigmoid(
                                        ax[jo * v + ji] + ah[jo * v + ji]) * (hs[jo * v + ji] - ax[2 * H + jo * v + ji])
                        else:
                            for jo in T.serial(ho):
                                for ji in T.vectorized(v):
                                    rh[jo * v + ji] = sigmoid(ax[H + jo * v + ji] + ah[H + jo * v + ji]) * hs[
                                        jo * v + ji]
                            r_acc(ah, rh, rval, rk, rptr, d, rph[-1][0], rph[-1][1], rph[-1][2], rph[-1][3])
                            for jo in T.serial(ho):
                                for ji in T.vectorized(v):
                                    ax[2 * H + jo * v + ji] = tanh(ax[2 * H + jo * v + ji] + ah[2 * H + jo * v + ji])
                                    hs[jo * v + ji] = ax[2 * H + jo * v + ji] + sigmoid(
                                        ax[jo * v + ji] + ah[jo * v + ji]) * (hs[jo * v + ji] - ax[2 * H + jo * v + ji])
                        vcopy(y, ((tt * D + d) * B + bi) * H, hs, 0, H)
                    vcopy(yh, (d * B + bi) * H, hs, 0, H)

        return gru_fn

    @T.prim_func
    def lstm_fn(x_: T.Buffer((S, B, I), "float32"), h0_: T.Buffer((D, B, H), "float32"),
                c0_: T.Buffer((D, B, H), "float32"),
                wval: T.Buffer((nw,), "float32"), wk: T.Buffer((nwi,), "int32"),
                wptr: T.Buffer((D * chw + 1,), "int32"),
                rval: T.Buffer((nr,), "float32"), rk: T.Buffer((nri,), "int32"),
                rptr: T.Buffer((D * chr_ + 1,), "int32"),
                bx: T.Buffer((D * GH,), "float32"), bh: T.Buffer((D * GH,), "float32"),
                y_: T.Buffer((S, D, B, H), "float32"), yh_: T.Buffer((D, B, H), "float32"),
                yc_: T.Buffer((D, B, H), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        x = T.decl_buffer((S * B * I,), "float32", data=x_.data)
        h0 = T.decl_buffer((D * B * H,), "float32", data=h0_.data)
        c0 = T.decl_buffer((D * B * H,), "float32", data=c0_.data)
        y = T.decl_buffer((S * D * B * H,), "float32", data=y_.data)
        yh = T.decl_buffer((D * B * H,), "float32", data=yh_.data)
        yc = T.decl_buffer((D * B * H,), "float32", data=yc_.data)
        for d in T.serial(D):
            for bi in T.serial(B):
                hs = T.decl_buffer((H,), "float32", scope=CPU_STACK)
                cs = T.decl_buffer((H,), "float32", scope=CPU_STACK)
                xs = T.decl_buffer((I,), "float32", scope=CPU_STACK)
                ax = T.decl_buffer((GH,), "float32", scope=CPU_STACK)
                vcopy(hs, 0, h0, (d * B + bi) * H, H)
                vcopy(cs, 0, c0, (d * B + bi) * H, H)
                for t in T.serial(S):
                    tt = t + (rev0 + revd * d) * (S - 1 - 2 * t)
                    for i in T.serial(I):
                        xs[i] = x[(tt * B + bi) * I + i]
                    vcopy(ax, 0, bx, d * GH, GH)
                    w_acc(ax, xs, wval, wk, wptr, d)
                    r_acc(ax, hs, rval, rk, rptr, d, rph[0][0], rph[0][1], rph[0][2], rph[0][3])
                    for jo in T.serial(ho):
                        for ji in T.vectorized(v):
                            cs[jo * v + ji] = sigmoid(ax[2 * H + jo * v + ji]) * cs[jo * v + ji] + sigmoid(
                                ax[jo * v + ji]) * tanh(ax[3 * H + jo * v + ji])
                            hs[jo * v + ji] = sigmoid(ax[H + jo * v + ji]) * tanh(cs[jo * v + ji])
                    vcopy(y, ((tt * D + d) * B + bi) * H, hs, 0, H)
                vcopy(yh, (d * B + bi) * H, hs, 0, H)
                vcopy(yc, (d * B + bi) * H, cs, 0, H)

    return lstm_fn


# a weight runs as ELL segments when its padded steps x this are at most the dense loop's
# steps (an ELL step loads u indices and broadcasts u inputs where a dense step broadcasts one;
# measured break-even at 0.8-0.9 of the dense steps, GRU hidden 32-128);
# see bench/rnn_kernels.md
ELL_STEP_COST = 1.25


@dataclass(frozen=True)
class RNNWeights:
    """The constant kernel arguments of one RNN node and how each weight runs."""

    w: Segments
    r: Segments
    bx: np.ndarray
    bh: np.ndarray
    modes: tuple[str, str]  # (W, R): "seg" | "dense"
    w_dense: np.ndarray  # [D, K, G*H] (used when the mode is dense)
    r_dense: np.ndarray

    def args(self) -> list[np.ndarray]:
        """The arguments after x/h0[/c0], in :func:`make_primfunc` order."""
        out = []
        for seg, dense, mode in ((self.w, self.w_dense, self.modes[0]), (self.r, self.r_dense, self.modes[1])):
            if mode == "dense":
                out += [dense.reshape(-1), np.zeros(1, np.int32), np.zeros_like(seg.ptr)]
            else:
                out += [seg.val.reshape(-1), seg.k, seg.ptr]
        return out + [self.bx.reshape(-1), self.bh.reshape(-1)]

    @property
    def sizes(self) -> tuple[int, int]:
        args = self.args()
        return len(args[0]), len(args[3])


def weight_mode(seg: Segments, forced: str | None = None) -> str:
    if forced:
        return forced
    return "seg" if seg.steps * ELL_STEP_COST <= seg.dense_steps else "dense"


def step_macs(spec: RNNSpec, w: np.ndarray, r: np.ndarray, target: Any) -> int:
    """Multiply-adds per time step (all directions and batch rows) the fused kernel runs on
    ``target``: a weight it runs dense counts all of them, one it runs as segments its padded
    steps x :data:`ELL_STEP_COST` (``lower.rnn``'s fuse-or-unroll measure)."""
    v = segment_width(spec.hidden, target or "x86")
    total = 0.0
    for a, k, phases in ((w, spec.input, ()), (r, spec.hidden, split_phase(spec))):
        seg = pack_segments(np.asarray(a, np.float32), v, phases)
        f = 1.0 if weight_mode(seg) == "dense" else ELL_STEP_COST * seg.steps / max(seg.dense_steps, 1)
        total += f * spec.dirs * spec.batch * spec.gates * spec.hidden * k
    return int(round(total))


def kernel_weights(spec: RNNSpec, w: np.ndarray, r: np.ndarray, b: np.ndarray | None, target: Any,
                   modes: tuple[str | None, str | None] = (None, None)) -> RNNWeights:
    """ONNX W/R/B -> :class:`RNNWeights` (``modes`` forces "seg"/"dense"; default by
    :data:`ELL_STEP_COST`)."""
    v = segment_width(spec.hidden, target)
    w, r = np.asarray(w, np.float32), np.asarray(r, np.float32)
    ws = pack_segments(w, v)
    rs = pack_segments(r, v, split_phase(spec))
    bx, bh = biases(spec, b)
    m = (weight_mode(ws, modes[0]), weight_mode(rs, modes[1]))
    return RNNWeights(ws, rs, bx, bh, m, np.ascontiguousarray(w.transpose(0, 2, 1)),
                      np.ascontiguousarray(r.transpose(0, 2, 1)))


def reference(spec: RNNSpec, x: np.ndarray, w, r, b=None, h0=None, c0=None) -> list[np.ndarray]:
    """float64 numpy oracle of ONNX GRU/LSTM (layout 0, default activations): [Y, Y_h(, Y_c)]."""
    S, B, H, D, G = spec.seq, spec.batch, spec.hidden, spec.dirs, spec.gates
    w, r = np.asarray(w, np.float64), np.asarray(r, np.float64)
    b = np.zeros((D, 2 * G * H)) if b is None else np.asarray(b, np.float64)
    h0 = np.zeros((D, B, H)) if h0 is None else np.asarray(h0, np.float64)
    c0 = np.zeros((D, B, H)) if c0 is None else np.asarray(c0, np.float64)
    sig = lambda u: 1 / (1 + np.exp(-u))  # noqa: E731
    y = np.zeros((S, D, B, H))
    yh, yc = np.zeros((D, B, H)), np.zeros((D, B, H))
    for d in range(D):
        rev = spec.direction == "reverse" or d == 1
        h, c = h0[d].copy(), c0[d].copy()
        wb, rb = b[d, :G * H], b[d, G * H:]
        for t in (range(S - 1, -1, -1) if rev else range(S)):
            gx = x[t] @ w[d].T + wb
            if spec.cell == "GRU":
                gh = h @ r[d].T + rb
                z = sig(gx[:, :H] + gh[:, :H])
                rr = sig(gx[:, H:2 * H] + gh[:, H:2 * H])
                if spec.linear_before_reset:
                    n = np.tanh(gx[:, 2 * H:] + rr * gh[:, 2 * H:])
                else:
                    n = np.tanh(gx[:, 2 * H:] + (rr * h) @ r[d][2 * H:].T + rb[2 * H:])
                h = (1 - z) * n + z * h
            else:
                g = gx + h @ r[d].T + rb
                i, o, f, cc = sig(g[:, :H]), sig(g[:, H:2 * H]), sig(g[:, 2 * H:3 * H]), np.tanh(g[:, 3 * H:])
                c = f * c + i * cc
                h = o * np.tanh(c)
            y[t, d] = h
        yh[d], yc[d] = h, c
    return [y, yh] + ([yc] if spec.cell == "LSTM" else [])


def build(spec: RNNSpec, w, r, b, target: Any, modes: tuple[str | None, str | None] = (None, None)):
    """Compile a standalone kernel: returns ``(f, consts)``; call ``f(x, h0[, c0], *consts, y, yh[, yc])``."""
    import tvm

    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    kw = kernel_weights(spec, w, r, b, tgt, modes)
    f = make_primfunc(spec, *kw.sizes, tgt, kw.modes).with_attr("global_symbol", "rnn_kernel")
    with tgt:
        lib = tvm.compile(tvm.IRModule({"rnn_kernel": f}), target=tgt)
    return lib["rnn_kernel"], kw.args()


# ------------------------------------------------------------------ Relax ONNX frontend hook


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def attr_problem(op: str, attrs: dict, num_dir: int) -> str | None:
    """Why a GRU/LSTM's attributes (ONNX names; strings or bytes) are outside what both the
    fused kernel and ``lower.rnn``'s unrolling support, or None."""
    acts = attrs.get("activations")
    if acts is not None and [_text(a) for a in acts] != DEFAULT_ACTIVATIONS[op] * num_dir:
        return f"non-default activations {[_text(a) for a in acts]}"
    if attrs.get("clip") is not None:
        return "clip is set"
    if op == "LSTM" and int(attrs.get("input_forget", 0)):
        return "input_forget=1"
    return None


def _spec_from(op: str, inputs: list, attr: dict) -> tuple[RNNSpec, int, np.ndarray, np.ndarray, np.ndarray | None]:
    """(spec, layout, W, R, B) of a GRU/LSTM node as the frontend hands it over; raises
    ValueError with the reason when the fused kernel cannot run it."""
    from targets.frontend_util import const_array

    direction = _text(attr.get("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ValueError(f"unknown direction {direction!r}")
    d_ = 2 if direction == "bidirectional" else 1
    problem = attr_problem(op, attr, d_)
    if problem:
        raise ValueError(problem)
    layout = int(attr.get("layout", 0))
    if layout not in (0, 1):
        raise ValueError(f"unknown layout {layout}")
    get = lambda i: inputs[i] if i < len(inputs) else None  # noqa: E731
    w, r = const_array(get(1)), const_array(get(2))
    if w is None or r is None:
        raise ValueError("W and R must be initializers")
    b = const_array(get(3)) if get(3) is not None else None
    if get(3) is not None and b is None:
        raise ValueError("B is not an initializer")
    x = get(0)
    if getattr(x.ty, "dtype", None) != "float32" or w.dtype != np.float32 or r.dtype != np.float32:
        raise ValueError(f"dtype {getattr(x.ty, 'dtype', '?')} (the fused kernel is float32)")
    try:
        shape = [int(v) for v in x.ty.shape]
    except Exception as exc:
        raise ValueError("dynamic input shape") from exc
    s_, b_, i_ = (shape[1], shape[0], shape[2]) if layout == 1 else shape
    g = CELLS[op]
    h = int(r.shape[-1])
    if w.shape != (d_, g * h, i_) or r.shape != (d_, g * h, h):
        raise ValueError(f"unexpected W/R shapes {w.shape}/{r.shape}")
    if get(4) is not None:
        sl = const_array(get(4))
        if sl is None or np.any(sl != s_):
            raise ValueError("sequence_lens is not a constant equal to the sequence length")
    if op == "LSTM" and get(7) is not None:
        p = const_array(get(7))
        if p is None or np.any(p):
            raise ValueError("peepholes (P) are not supported")
    lbr = int(attr.get("linear_before_reset", 0)) if op == "GRU" else 0
    return RNNSpec(op, s_, b_, i_, h, direction, lbr), layout, w, r, b


@dataclass
class ConverterState:
    """What the converters built, for the artifact's kernel record."""

    kernels: list[dict[str, Any]]


def relax_converters(tvm_target: Any, modes: tuple[str, str] | None = None) -> tuple[dict[str, type], ConverterState]:
    """Converters for ONNX ``GRU`` / ``LSTM`` on CPU targets (``({}, state)`` for CUDA):
    one ``call_tir`` of the fused recurrence kernel per node (what ``lower.rnn`` leaves
    whole). A node the kernel cannot run raises TargetError with the reason. ``modes``
    forces every node's (W, R) modes (default: :func:`weight_mode`)."""
    from tvm import relax
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from compressor.errors import TargetError

    state = ConverterState([])
    if target_family(tvm_target) == "cuda":
        return {}, state

    def make(op: str) -> type:
        def _impl_v1(cls, bb, inputs, attr, params):
            name = _text(attr.get("tvm_custom", {}).get("name", "")) or op
            try:
                spec, layout, w, r, b = _spec_from(op, inputs, attr)
            except ValueError as exc:
                raise TargetError(f"{op} {name}: no fused kernel ({exc}); run lower.rnn to unroll it") from None
            S, B, I, H, D = spec.seq, spec.batch, spec.input, spec.hidden, spec.dirs
            kw = kernel_weights(spec, w, r, b, tvm_target, modes or (None, None))
            prim = make_primfunc(spec, *kw.sizes, tvm_target, kw.modes).without_attr("global_symbol")
            gv = bb.add_func(prim, f"fused_{op.lower()}")
            x = inputs[0]
            if layout == 1:
                x = relax.op.permute_dims(x, [1, 0, 2])
            states = []
            for i in ((5, 6) if op == "LSTM" else (5,)):
                given = i < len(inputs) and inputs[i] is not None
                st = inputs[i] if given else relax.const(np.zeros((D, B, H), np.float32))
                states.append(relax.op.permute_dims(st, [1, 0, 2]) if given and layout == 1 else st)
            outs = [relax.TensorType((S, D, B, H), "float32")] + [
                relax.TensorType((D, B, H), "float32")] * (2 if op == "LSTM" else 1)
            call = bb.emit(relax.call_tir(gv, [x, *states, *[relax.const(a) for a in kw.args()]], outs))
            y = relax.TupleGetItem(call, 0)
            finals = [relax.TupleGetItem(call, i) for i in range(1, len(outs))]
            if layout == 1:
                y = relax.op.permute_dims(y, [2, 0, 1, 3])
                finals = [relax.op.permute_dims(f, [1, 0, 2]) for f in finals]
            state.kernels.append({"node": name, "cell": op, "steps": S, "batch": B, "input": I, "hidden": H,
                                  "directions": D, "modes": list(kw.modes),
                                  "stored_w": round(kw.w.stored / max(kw.w.dense, 1), 4),
                                  "stored_r": round(kw.r.stored / max(kw.r.dense, 1), 4),
                                  "steps_w": round(kw.w.steps / max(kw.w.dense_steps, 1), 4),
                                  "steps_r": round(kw.r.steps / max(kw.r.dense_steps, 1), 4)})
            return relax.Tuple([bb.normalize(e) for e in (y, *finals)])

        return type(f"Convert{op}Fused", (OnnxOpConverter,), {"_impl_v1": classmethod(_impl_v1)})

    return {op: make(op) for op in CELLS}, state
