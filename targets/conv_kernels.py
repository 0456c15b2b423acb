"""Hand-scheduled dense convolution kernels (NCHW, float32) in TIR for the CPU targets, and
the Relax ONNX frontend converters that use them.

Why: TVM 0.27's CPU Relax pipeline legalizes ``nn.conv2d`` into an unscheduled TE loop nest
(scalar, single-threaded): ~25x slower than onnxruntime on a MobileNetV2, and meta_schedule
needs many trials per conv to recover. These kernels are written scheduled (parallel,
vectorized, register-tiled, ``tirx.is_scheduled`` so neither dlight nor meta_schedule touch
them) and used untuned.

Semantics (ONNX ``Conv``, NCHW, dilation 1, explicit ``pads = [top, left, bottom, right]``)::

    y[b, o, oh, ow] = act( bias[o] + sum_{i, kh, kw} W[o, i, kh, kw] * xpad[b, g(o) + i, oh*sh + kh, ow*sw + kw] )

with ``xpad`` the zero-padded input and ``act(v) = min(max(v, lo), hi)`` (``lo = -inf,
hi = inf``: none; ``lo = 0``: Relu; ``0..6``: ReLU6 as torch exports it, ``Clip``).

Kernels (parallel over independent output tiles with ``T.parallel``; layers under
``PARALLEL_MIN_MACS`` run serially -- waking TVM's thread pool costs more than it saves there:
the 32 px MobileNetV2 ran 0.236 ms all-parallel, 0.160 ms serial on the 2-core dev host):

* ``conv1x1`` (group 1, 1x1, stride 1, no padding): a matrix product per image,
  ``y[b, :, p] = W[O, I] @ x[b, :, p]`` over the ``M = H*W`` pixels. Channel-major like the
  BSR kernel (:func:`targets.sparse_kernels.make_conv1x1_primfunc`): one task per (image,
  pixel tile, output-channel tile), ``R x MT`` accumulators (``MT`` pixels vectorized, ``R``
  output channels unrolled) in registers; each input channel costs ``MT / lanes`` vector loads
  of ``x``, ``R`` broadcasts of the weight (packed per channel tile ``[O/R, I, R]``, one
  contiguous stream per task) and ``R * MT / lanes`` FMAs. Tiles that do not divide ``M`` /
  ``O`` start at ``min(t * T, size - T)``: the last tile overlaps its neighbour (identical
  values written twice) instead of needing a remainder loop. The 4-D tensors are viewed as
  ``[B, C, H*W]`` inside the kernel (no Relax reshapes).
* ``depthwise`` (``group == I == O``, any ``KH x KW``, strides, padding): per channel, the
  zero-padded input is copied into *polyphase planes* ``pp[qh, qw, R, J] = xpad[R*sh + qh,
  J*sw + qw]`` stored flat with a row pitch ``WQ``, so output ``(i, j)`` (flat ``i*WQ + j``)
  reads tap ``(kh, kw)`` at the constant offset ``(kh//sh)*WQ + kw//sw`` of plane
  ``(kh%sh, kw%sw)``: each tap is one vector FMA over ``VL`` contiguous outputs -- several
  whole rows at once on small planes (a 4x4 plane is two AVX-512 vectors), no gathers for any
  stride. Stride-2 rows are deinterleaved from a stack copy of the input row (LLVM shuffles
  instead of 2 x W scalar loads: the 56 px stride-2 layer 80 -> 38 us). The planes' padding is
  zeroed once per task; a task handles ``cpt`` channels (tiny planes: the per-channel loop
  overhead, not the FMAs, is the cost).
* ``direct`` (group 1, anything else: KxK, strided, padded): a shifted matrix product over
  flat zero-padded polyphase planes (:func:`make_direct`): every tap is a broadcast-FMA over
  contiguous wide output positions, ``R`` output channels x two accumulator vectors per task.
  On two Zen 5 cores (AVX-512) the ResNet-50 3x3 / strided layers run at 170-215 GMAC/s,
  0.73-0.90x onnxruntime's per-layer time (the row-per-task kernel before it: 31-150 GMAC/s,
  0.16-0.66x; 7x7 planes were the worst).
* ``add`` (a residual ``Add`` reading a conv output, same shapes, + a following Relu/Clip):
  flat, chunked, vectorized. TVM's own elementwise code is unscheduled on CPU.

Output rows wider than the tile are processed in overlapping column tiles.

Fusion: the converter plan (:func:`plan_fusion`) looks at the ONNX graph: a ``Conv`` (or a
``compressor::SparseConv1x1`` of ``lower.sparse``, or a residual ``Add``) whose only consumer
is a ``Relu`` or a ``Clip`` with constant bounds (and whose output is not a graph output)
gets the activation fused into its kernel; the activation node then converts to its input.
``BatchNormalization`` is folded into the conv before import by the ``cleanup`` passes. All
kernels carry ``op_pattern = kOpaque`` so Relax FuseOps never merges a neighbour into them.

Unsupported cases (non-float32, non-4D, non-constant weight or bias, dilation != 1,
``auto_pad`` other than ``NOTSET``, grouped convs that are not depthwise, depthwise with a
channel multiplier) fall back to the frontend's own ``Conv`` converter; each fallback is
logged as a warning with its reason and counted in the converter state's ``fallbacks``.
CUDA keeps the frontend's converter (dlight schedules it).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compressor import sparse_ops
from targets.frontend_util import const_array, frontend_converter, model_opset

from targets.sparse_kernels import CPU_STACK, target_family, vector_floats

log = logging.getLogger(__name__)

DIRECT_1X1_MAX_PIXELS = 196  # plain 1x1 convs on at most this many pixels run the direct kernel (ConvShape.kernel)
MAX_ROW = 128  # widest output row (floats) one depthwise/direct task accumulates at once
# TVM keeps a constant-size "global" allocation on the stack (LowerTVMBuiltin) only below 1024
# bytes; larger ones become a TVMBackendAllocWorkspace call per task
STACK_FLOATS = 256
# relax OpPatternKind kOpaque: AnnotateTIROpPattern keeps a preset "op_pattern", and FuseOps then
# never fuses a neighbour into our kernels (FuseTIR cannot merge the flat buffer views they declare)
OPAQUE = 8
PARALLEL_MIN_MACS = 1_100_000  # below: one thread (_task_loop). 32 px MobileNetV2: its two 1.05 M-MAC 1x1 layers
# parallel 0.317 ms, serial 0.160 ms; 112 px: layers from 1.2 M MACs parallel 1.87 ms, from 2.1 M 2.06 ms
ADD_MAC_EQUIV = 4  # an add kernel element costs about this many conv MACs (memory bound)
INF = float("inf")


@dataclass(frozen=True)
class Act:
    """``act(v) = min(max(v, lo), hi)``; infinite bounds are not emitted."""

    lo: float = -INF
    hi: float = INF

    @property
    def name(self) -> str:
        if self.lo == -INF and self.hi == INF:
            return "none"
        if self.lo == 0 and self.hi == INF:
            return "relu"
        if self.lo == 0 and self.hi == 6:
            return "relu6"
        return "clip"

    def apply_np(self, y: np.ndarray) -> np.ndarray:
        return np.minimum(np.maximum(y, self.lo), self.hi)


NONE = Act()
RELU = Act(0.0, INF)
RELU6 = Act(0.0, 6.0)


def _task_loop(work: int):
    """``T.parallel`` for kernels of at least ``PARALLEL_MIN_MACS`` multiply-adds, else
    ``T.serial``: waking the thread pool costs more than it saves on tiny layers."""
    from tvm.script import tirx as T

    return T.parallel if work >= PARALLEL_MIN_MACS else T.serial


def _act_fn(act: Act):
    from tvm.script import tirx as T

    lo = None if act.lo == -INF else T.float32(act.lo)
    hi = None if act.hi == INF else T.float32(act.hi)

    def f(v):
        if lo is not None:
            v = T.max(v, lo)
        if hi is not None:
            v = T.min(v, hi)
        return v

    return f


# ------------------------------------------------------------------ shapes and tiling


@dataclass(frozen=True)
class ConvShape:
    """NCHW conv geometry (dilation 1)."""

    b: int
    i: int  # input channels
    h: int
    w: int
    o: int  # output channels
    kh: int
    kw: int
    sh: int = 1
    sw: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    group: int = 1

    @property
    def oh(self) -> int:
        return (self.h + self.pads[0] + self.pads[2] - self.kh) // self.sh + 1

    @property
    def ow(self) -> int:
        return (self.w + self.pads[1] + self.pads[3] - self.kw) // self.sw + 1

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.b, self.o, self.oh, self.ow)

    def kernel(self) -> str:
        """The dense kernel that runs this conv: ``kind()``, except that a plain 1x1 conv on at most
        ``DIRECT_1X1_MAX_PIXELS`` pixels runs the direct kernel (its 12 x 2 vector tiles beat the
        conv1x1 kernel's 8 x 1 there: ResNet-50's 7x7 -> 2048 layer 134 -> 189 GMAC/s, 14x14 layers
        1.07-1.11x; from 28x28 px on the conv1x1 kernel is as fast or faster)."""
        k = self.kind()
        return "direct" if k == "conv1x1" and self.h * self.w <= DIRECT_1X1_MAX_PIXELS else k

    def kind(self) -> str:
        """conv1x1 | depthwise | direct | unsupported"""
        if self.group == 1:
            if (self.kh, self.kw, self.sh, self.sw) == (1, 1, 1, 1) and not any(self.pads):
                return "conv1x1"
            return "direct"
        if self.group == self.i == self.o:
            return "depthwise"
        return "unsupported"


def _tile(size: int, want: int) -> int:
    return max(1, min(size, want))


def conv1x1_tiles(m: int, o: int, target: Any) -> tuple[int, int]:
    """(R output channels, MT pixels) per task. ``R * MT`` accumulators must stay below
    ``STACK_FLOATS`` (else TVM allocates them per task from the heap workspace, ~5x slower);
    measured on the dev host (Zen 4, AVX-512; 16..144 -> 16..192 channels, 196..1024 pixels):
    8 x 16 (8 zmm) was 0.6-1.3x onnxruntime's Conv time, 6 x 32 and 12 x 16 about the same,
    4 x 48 5-9x slower. AVX2: 6 x 16 (12 of 16 ymm); NEON: 8 x 8 (16 of 32 q registers)."""
    v = vector_floats(target)
    fam = target_family(target)
    if fam == "arm":
        r, mt = 8, 2 * v
    elif v >= 16:
        r, mt = 8, v
    else:
        r, mt = 6, 2 * v
    return _tile(o, r), _tile(m, mt)


def row_tile(ow: int, v: int, cap: int = MAX_ROW) -> int:
    """Output columns per vectorized row tile: a multiple of the SIMD width ``v`` (LLVM splits
    a ``<56 x float>`` badly: a 56-wide stem row ran 6x slower than 16-wide tiles), chosen to
    minimise the computed columns ``ceil(ow / t) * t`` (tiles overlap at the end), then the
    widest; rows narrower than ``v`` are one tile."""
    if ow <= v:
        return ow
    cands = [t for t in range(v, min(ow, cap) + 1, v)]
    return min(cands, key=lambda t: (math.ceil(ow / t) * t, -t))


def direct_tiles(o: int, q: int, target: Any) -> tuple[int, int]:
    """(R output channels, QT wide output positions) per task of the direct kernel: ``R`` rows
    of two accumulator vectors of ``QT / 2`` floats each (each set a separate stack buffer of
    ``R * QT / 2 < STACK_FLOATS`` floats, so both stay allocas LLVM keeps in registers).
    AVX-512: 12 x 2 x 16 = 24 of 32 zmm (the 14x14 3x3 256 -> 256 layer: 197 GMAC/s on two Zen 5
    cores, 0.81x onnxruntime; 6 x 4 x 16: 185; 8 x 2 x 16: 103 single-threaded as 12 x 2);
    AVX2: 6 x 2 x 8 (12 of 16 ymm); NEON: 12 x 2 x 4 (24 of 32 q). ``q`` narrower than a tile:
    one vector set of ``q`` rounded down to the SIMD width (or all ``q`` under one vector)."""
    v = vector_floats(target)
    fam = target_family(target)
    r = 12 if (fam == "arm" or v >= 16) else 6
    qt = 2 * v
    if q < qt:
        qt = (q // v) * v if q >= v else q
    return _tile(o, r), qt


# ------------------------------------------------------------------ TIR kernels


def make_conv1x1(s: ConvShape, act: Act = NONE, target: Any = "x86", residual: bool = False):
    """``f(x[B, I, H, W], wp[ceil(O/R), I, R], bias[O], y[B, O, H, W])`` (viewed as
    ``[B, C, M = H*W]``); ``residual``: ``f(x, wp, bias, z[B, O, H, W], y)`` computing
    ``y = act(conv(x) + bias + z)`` (a residual Add fused: ``z`` starts the accumulators).
    ``wp`` = the weight packed per output-channel tile
    (:func:`kernel_weights`), so every task streams one contiguous ``I x R`` block.
    Task order: pixel tiles outer when the input is the larger operand (neighbouring tasks
    share the ``x`` slice), channel tiles outer when the weight is (late, small-image layers:
    each thread streams its half of the weight once, reused over the pixel tiles from L1)."""
    from tvm.script import tirx as T

    assert s.kind() == "conv1x1", s
    bsz, k, n, m = s.b, s.i, s.o, s.h * s.w
    r, mt = conv1x1_tiles(m, n, target)
    nmt, nrt = math.ceil(m / mt), math.ceil(n / r)
    d_o, d_p = (nmt, 1) if n > m else (1, nrt)  # strides of (channel tile, pixel tile) in the task id
    f = _act_fn(act)
    par = _task_loop(bsz * m * n * k)

    @T.macro
    def body(x4, wp, bias, z4, y4):
        x = T.decl_buffer((bsz, k, m), "float32", data=x4.data)  # NCHW viewed as [B, C, H*W]
        y = T.decl_buffer((bsz, n, m), "float32", data=y4.data)
        for t in par(bsz * nmt * nrt):
            acc = T.decl_buffer((r, mt), "float32", scope=CPU_STACK)
            if residual:  # (static) the residual input starts the accumulators
                z = T.decl_buffer((bsz, n, m), "float32", data=z4.data)
                for rr in T.unroll(r):
                    for mi in T.vectorized(mt):
                        acc[rr, mi] = bias[T.min(t // d_o % nrt * r, n - r) + rr] + z[
                            t // (nmt * nrt), T.min(t // d_o % nrt * r, n - r) + rr, T.min(t // d_p % nmt * mt, m - mt) + mi]
            else:
                for rr in T.unroll(r):
                    for mi in T.vectorized(mt):
                        acc[rr, mi] = bias[T.min(t // d_o % nrt * r, n - r) + rr]
            for kk in T.serial(k):
                for rr in T.unroll(r):
                    for mi in T.vectorized(mt):
                        acc[rr, mi] = acc[rr, mi] + wp[t // d_o % nrt, kk, rr] * x[
                            t // (nmt * nrt), kk, T.min(t // d_p % nmt * mt, m - mt) + mi]
            for rr in T.unroll(r):
                for mi in T.vectorized(mt):
                    y[t // (nmt * nrt), T.min(t // d_o % nrt * r, n - r) + rr,
                      T.min(t // d_p % nmt * mt, m - mt) + mi] = f(acc[rr, mi])

    if residual:
        @T.prim_func
        def conv1x1_residual(x4: T.Buffer((bsz, k, s.h, s.w), "float32"), wp: T.Buffer((nrt, k, r), "float32"),
                             bias: T.Buffer((n,), "float32"), z4: T.Buffer((bsz, n, s.h, s.w), "float32"),
                             y4: T.Buffer((bsz, n, s.h, s.w), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            body(x4, wp, bias, z4, y4)

        return conv1x1_residual

    @T.prim_func
    def conv1x1(x4: T.Buffer((bsz, k, s.h, s.w), "float32"), wp: T.Buffer((nrt, k, r), "float32"),
                bias: T.Buffer((n,), "float32"), y4: T.Buffer((bsz, n, s.h, s.w), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        body(x4, wp, bias, None, y4)

    return conv1x1


def _pad_geometry(s: ConvShape) -> tuple[int, int]:
    """(padded rows, phase width) of the zero-padded phase planes."""
    return s.h + s.pads[0] + s.pads[2], s.ow + (s.kw - 1) // s.sw


def _phase_range(s: ConvShape, q: int) -> tuple[int, int]:
    """(first phase column, count) of phase ``q`` that holds input pixels (not padding):
    ``0 <= j * sw + q - pl < W`` and ``j < wq`` (the depthwise kernel's phase width)."""
    return _plane_cols(s, _pad_geometry(s)[1], q)


DW_ACC_FLOATS = 128  # accumulators per depthwise step (8 AVX-512 registers): full padded rows when they fit
DW_ROWBUF = 240  # widest input row deinterleaved through a stack copy (stride 2)
DW_MAX_ROWS = 4  # output rows per step of the row form (56 px rows: 1 -> 4 rows 0.13 -> 0.10 ms)
DW_TASK_MACS = 32_768  # channels per parallel task: at least this many MACs (tiny planes: per-task overhead)


def depthwise_plan(s: ConvShape, target: Any) -> dict[str, int]:
    """Geometry of the depthwise kernel. Polyphase planes ``pp[qh, qw, R, J] = xpad[R*sh + qh,
    J*sw + qw]`` (``RQ`` rows of pitch ``WQ >= OW + (KW-1)//SW`` each) make every tap a constant
    flat offset: output ``(i, j)`` reads plane ``(dh%sh, dw%sw)`` at ``(i + dh//sh)*WQ + j +
    dw//sw``. Two step shapes:

    * ``flat`` (rows narrower than a vector, ``full = 1``): one step covers ``rb`` whole padded
      rows as ``VL = ceil(rb*WQ / lanes) * lanes`` contiguous accumulators (the pad columns and
      rounding lanes are computed and dropped); the pitch is rounded up to a power of two so
      the rows are stored out of the accumulators without lane shuffles (a 9-float pitch on
      7x7 planes ran 1.3x slower than 16).
    * ``rows`` (``full = 0``): ``rb`` output rows x ``owt`` columns (the whole row up to
      ``MAX_ROW``, else overlapping column tiles), each row its own accumulators (no padded
      lanes: a 32 px row in a 48-float pitch of the flat form was 1.5x slower).

    ``cpt`` channels per task (tiny planes: the per-channel loop, not the FMAs, costs)."""
    v = vector_floats(target)
    hp, wq = _pad_geometry(s)
    rq = -(-hp // s.sh)
    pw = 1 << (wq - 1).bit_length()
    if s.ow < v and pw <= DW_ACC_FLOATS:
        wq = pw
        rb = max(1, min(s.oh, DW_ACC_FLOATS // wq))
        vl = -(-rb * wq // v) * v
        full, owt = 1, s.ow
    else:
        full = 0
        owt = s.ow if s.ow <= MAX_ROW else row_tile(s.ow, v)
        rb = max(1, min(s.oh, DW_MAX_ROWS, (STACK_FLOATS - 1) // owt))
        vl = owt
    per_ch = s.oh * s.ow * s.kh * s.kw
    cpt = max(1, min(s.i, DW_TASK_MACS // max(per_ch, 1)))
    return {"wq": wq, "rq": rq, "rb": rb, "vl": vl, "full": full, "owt": owt, "cpt": cpt,
            "plane": rq * wq, "size": s.sh * s.sw * rq * wq + vl + wq}


def make_depthwise(s: ConvShape, act: Act = NONE, target: Any = "x86"):
    """``f(x[B, C, H, W], w[C, KH*KW], bias[C], y[B, C, OH, OW])``: per channel, the zero-padded
    input is copied into polyphase planes (:func:`depthwise_plan`; their padding is zeroed once
    per task, the copies only write the interior), then every tap is one vector FMA over ``VL``
    contiguous outputs -- several whole rows of small planes at once, no gathers for any stride.
    Tasks: ``cpt`` channels each (the last group overlapping its neighbour)."""
    from tvm.script import tirx as T

    assert s.kind() == "depthwise", s
    bsz, c, h, w, kh, kw, sh, sw = s.b, s.i, s.h, s.w, s.kh, s.kw, s.sh, s.sw
    pt, pl = s.pads[0], s.pads[1]
    oh, ow = s.oh, s.ow
    g = depthwise_plan(s, target)
    wq, rb, vl, full, owt, cpt, plane, size = (g[k] for k in ("wq", "rb", "vl", "full", "owt", "cpt", "plane", "size"))
    nrb = math.ceil(oh / rb)
    nct = 1 if full else math.ceil(ow / owt)
    ncg = math.ceil(c / cpt)
    (jlo0, jn0), (jlo1, jn1) = _phase_range(s, 0), _phase_range(s, min(1, sw - 1))
    par = _task_loop(bsz * c * oh * ow * kh * kw)
    zero = T.float32(0)
    f = _act_fn(act)

    @T.prim_func
    def depthwise(x: T.Buffer((bsz, c, h, w), "float32"), wk: T.Buffer((c, kh * kw), "float32"),
                  bias: T.Buffer((c,), "float32"), y: T.Buffer((bsz, c, oh, ow), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        for t in par(bsz * ncg):
            pp = T.decl_buffer((size,), "float32")
            for j in T.vectorized(size):
                pp[j] = zero
            for cc in T.serial(cpt):
                # interior of the polyphase planes: input row r -> plane row (r + pt) // sh, phase (r + pt) % sh
                for r in T.serial(h):
                    if sw == 2 and w <= DW_ROWBUF:  # deinterleave from a register copy of the row (shuffles, not
                        rowbuf = T.decl_buffer((w,), "float32", scope=CPU_STACK)  # 2 x W scalar loads)
                        for j in T.vectorized(w):
                            rowbuf[j] = x[t // ncg, T.min(t % ncg * cpt, c - cpt) + cc, r, j]
                        for j in T.vectorized(jn0):
                            pp[((r + pt) % sh * sw) * plane + (r + pt) // sh * wq + jlo0 + j] = rowbuf[(jlo0 + j) * 2 - pl]
                        if jn1 > 0:
                            for j in T.vectorized(jn1):
                                pp[((r + pt) % sh * sw + 1) * plane + (r + pt) // sh * wq + jlo1 + j] = rowbuf[
                                    (jlo1 + j) * 2 + 1 - pl]
                    elif sw <= 2:  # (static) constant-extent vector copies, one per phase
                        for j in T.vectorized(jn0):
                            pp[((r + pt) % sh * sw) * plane + (r + pt) // sh * wq + jlo0 + j] = x[
                                t // ncg, T.min(t % ncg * cpt, c - cpt) + cc, r, (jlo0 + j) * sw - pl]
                        if sw == 2 and jn1 > 0:
                            for j in T.vectorized(jn1):
                                pp[((r + pt) % sh * sw + 1) * plane + (r + pt) // sh * wq + jlo1 + j] = x[
                                    t // ncg, T.min(t % ncg * cpt, c - cpt) + cc, r, (jlo1 + j) * sw + 1 - pl]
                    else:
                        for q in T.serial(sw):
                            for j in T.serial(T.min(wq, (w - 1 + pl - q) // sw + 1) - (pl - q + sw - 1) // sw):
                                pp[((r + pt) % sh * sw + q) * plane + (r + pt) // sh * wq + (pl - q + sw - 1) // sw
                                   + j] = x[t // ncg, T.min(t % ncg * cpt, c - cpt) + cc, r,
                                            ((pl - q + sw - 1) // sw + j) * sw + q - pl]
                for rt in T.serial(nrb):
                    for ct in T.serial(nct):
                        if full == 1:  # (static) flat form: rb padded rows as one vector run
                            acc = T.decl_buffer((vl,), "float32", scope=CPU_STACK)
                            for l in T.vectorized(vl):
                                acc[l] = bias[T.min(t % ncg * cpt, c - cpt) + cc]
                            for dh in T.unroll(kh):
                                for dw in T.unroll(kw):
                                    for l in T.vectorized(vl):
                                        acc[l] = acc[l] + wk[T.min(t % ncg * cpt, c - cpt) + cc, dh * kw + dw] * pp[
                                            ((dh % sh) * sw + dw % sw) * plane
                                            + (T.min(rt * rb, oh - rb) + dh // sh) * wq + dw // sw + l]
                            for i in T.unroll(rb):
                                for j in T.vectorized(ow):
                                    y[t // ncg, T.min(t % ncg * cpt, c - cpt) + cc, T.min(rt * rb, oh - rb) + i,
                                      j] = f(acc[i * wq + j])
                        else:  # row form: rb rows x owt columns
                            acr = T.decl_buffer((rb, owt), "float32", scope=CPU_STACK)
                            for i in T.unroll(rb):
                                for j in T.vectorized(owt):
                                    acr[i, j] = bias[T.min(t % ncg * cpt, c - cpt) + cc]
                            for dh in T.unroll(kh):
                                for dw in T.unroll(kw):
                                    for i in T.unroll(rb):
                                        for j in T.vectorized(owt):
                                            acr[i, j] = acr[i, j] + wk[T.min(t % ncg * cpt, c - cpt) + cc,
                                                                       dh * kw + dw] * pp[
                                                ((dh % sh) * sw + dw % sw) * plane
                                                + (T.min(rt * rb, oh - rb) + i + dh // sh) * wq
                                                + T.min(ct * owt, ow - owt) + dw // sw + j]
                            for i in T.unroll(rb):
                                for j in T.vectorized(owt):
                                    y[t // ncg, T.min(t % ncg * cpt, c - cpt) + cc, T.min(rt * rb, oh - rb) + i,
                                      T.min(ct * owt, ow - owt) + j] = f(acr[i, j])

    return depthwise


def direct_geometry(s: ConvShape) -> tuple[int, int]:
    """(rows, pitch) of each of the ``sh * sw`` zero-padded polyphase planes of an input
    channel: input pixel ``(r, c)`` lands in plane ``((r + pt) % sh, (c + pl) % sw)`` at row
    ``(r + pt) // sh``, column ``(c + pl) // sw``; wide output ``q = oh * pitch + ow`` reads tap
    ``(kh, kw)`` at ``q + (kh // sh) * pitch + kw // sw`` of plane ``(kh % sh, kw % sw)``."""
    hp, wp = s.h + s.pads[0] + s.pads[2], s.w + s.pads[1] + s.pads[3]
    return (max(-(-hp // s.sh), s.oh + (s.kh - 1) // s.sh),
            max(-(-wp // s.sw), s.ow + (s.kw - 1) // s.sw))


def _plane_cols(s: ConvShape, pitch: int, qw: int) -> tuple[int, int]:
    """(first column, count) of column phase ``qw`` that holds input pixels:
    ``0 <= j * sw + qw - pl < W`` and ``j < pitch``."""
    pl = s.pads[1]
    lo = max(0, -((qw - pl) // s.sw))  # ceil((pl - qw) / sw)
    hi = min(pitch, (s.w - 1 + pl - qw) // s.sw + 1) if s.w - 1 + pl - qw >= 0 else 0
    return lo, max(0, hi - lo)


def _wide_tile_macros(r: int, hw: int, two: bool, wq: int, ow: int, f, residual: bool):
    """``init(acc0, acc1, bias, o0)`` and ``store(acc0, acc1, z, y, b, o0, q0)`` of the direct kernels'
    ``R x QT`` tiles (two accumulator sets of ``hw`` positions when ``two``): accumulators start at the
    bias of output channels ``o0..o0+R``; the store drops the wide columns past ``OW`` of each row
    (position ``q0 + j`` is row ``(q0 + j) // wq``, column ``(q0 + j) % wq``), adds the residual
    ``z`` when the kernel has one and applies the activation ``f``."""
    from tvm.script import tirx as T

    @T.macro
    def init(acc0, acc1, bias, o0):
        for rr in T.unroll(r):
            for j in T.vectorized(hw):
                acc0[rr, j] = bias[o0 + rr]
            if two:
                for j in T.vectorized(hw):
                    acc1[rr, j] = bias[o0 + rr]

    @T.macro
    def store_set(acc, z, y, b, o0, q1):  # one accumulator set, positions q1 .. q1 + hw
        for rr in T.unroll(r):
            for j in T.serial(hw):
                if (q1 + j) % wq < ow:
                    if residual:  # (static)
                        y[b, o0 + rr, (q1 + j) // wq, (q1 + j) % wq] = f(
                            acc[rr, j] + z[b, o0 + rr, (q1 + j) // wq, (q1 + j) % wq])
                    else:
                        y[b, o0 + rr, (q1 + j) // wq, (q1 + j) % wq] = f(acc[rr, j])

    @T.macro
    def store(acc0, acc1, z, y, b, o0, q0):
        store_set(acc0, z, y, b, o0, q0)
        if two:
            store_set(acc1, z, y, b, o0, q0 + hw)

    return init, store


ZERO_CHUNK = 64  # floats per vector store of the direct kernel's plane zeroing


def _planes_macro(s: ConvShape, nx: int, par):
    """``planes(x, xf, b)``: image ``b`` of ``x`` copied into the flat zero-padded polyphase
    planes ``xf[nx]`` (:func:`direct_geometry`; the tail past the last channel zeroed too)."""
    from tvm.script import tirx as T

    ci, h, w, sh, sw = s.i, s.h, s.w, s.sh, s.sw
    pt, pl = s.pads[0], s.pads[1]
    hq, wq = direct_geometry(s)
    plane = hq * wq
    ps = sh * sw * plane
    zero = T.float32(0)
    cols = [_plane_cols(s, wq, qw) for qw in range(sw)]
    (jlo0, jn0) = cols[0]
    (jlo1, jn1) = cols[min(1, sw - 1)]

    @T.macro
    def planes(x, xf, b):
        for i in par(ci):
            for jc in T.serial(ps // ZERO_CHUNK):  # (a vectorized loop over a whole 115x115 plane: LLVM error)
                for j in T.vectorized(ZERO_CHUNK):
                    xf[i * ps + jc * ZERO_CHUNK + j] = zero
            for j in T.serial(ps % ZERO_CHUNK):
                xf[i * ps + ps // ZERO_CHUNK * ZERO_CHUNK + j] = zero
            if sw <= 2:  # (static) constant-extent vector copies, one per column phase
                for rr in T.serial(h):
                    for j in T.vectorized(jn0):
                        xf[i * ps + (rr + pt) % sh * sw * plane + (rr + pt) // sh * wq + jlo0 + j] = x[
                            b, i, rr, (jlo0 + j) * sw - pl]
                    if sw == 2 and jn1 > 0:
                        for j in T.vectorized(jn1):
                            xf[i * ps + ((rr + pt) % sh * sw + 1) * plane + (rr + pt) // sh * wq + jlo1 + j] = x[
                                b, i, rr, (jlo1 + j) * sw + 1 - pl]
            else:
                for rr in T.serial(h):
                    for c in T.serial(w):
                        xf[i * ps + ((rr + pt) % sh * sw + (c + pl) % sw) * plane + (rr + pt) // sh * wq
                           + (c + pl) // sw] = x[b, i, rr, c]
        for j in T.serial(nx - ci * ps):
            xf[ci * ps + j] = zero

    return planes


def make_direct(s: ConvShape, act: Act = NONE, target: Any = "x86", residual: bool = False):
    """``f(x[B, I, H, W], wp[ceil(O/R), I*KH*KW, R], bias[O], y[B, O, OH, OW])`` (group 1;
    ``residual``: ``f(x, wp, bias, z, y)``, ``y = act(conv + bias + z)``, ``z`` added at the store): the
    conv as a *shifted matrix product*. Each input channel is copied once into ``sh * sw``
    zero-padded polyphase planes (:func:`direct_geometry`), flat; an output row is computed
    ``pitch`` wide (the ``pitch - OW`` extra columns are discarded), so output position ``q``
    of every tap ``(i, kh, kw)`` reads the flat input at ``q + off(i, kh, kw)``: every tap is one
    broadcast of the weight and one FMA per accumulator vector over contiguous positions, for
    any stride and padding, and small planes (7x7, 14x14) fill whole vectors across rows
    instead of one short row per task. Tasks: ``R`` output channels x ``QT`` wide positions
    (:func:`direct_tiles`; the last tile of each overlaps its neighbour); the store crops the
    discarded columns and applies the activation. Park et al. 2017 (direct sparse convolution)
    use the same flat-offset form for their sparse kernel."""
    from tvm.script import tirx as T

    assert s.kind() in ("direct", "conv1x1") and s.group == 1, s
    bsz, ci, h, w, co, kh, kw, sh, sw = s.b, s.i, s.h, s.w, s.o, s.kh, s.kw, s.sh, s.sw
    oh, ow = s.oh, s.ow
    hq, wq = direct_geometry(s)
    plane = hq * wq
    ps = sh * sw * plane  # floats per input channel
    q = oh * wq  # wide output positions
    r, qt = direct_tiles(co, q, target)
    v = vector_floats(target)
    two = qt >= 2 * v  # two accumulator sets (else one of qt floats)
    hw = qt // 2 if two else qt
    nqt = -(-q // qt)
    nrt = -(-co // r)
    nx = ci * ps + ((kh - 1) // sh) * wq + (kw - 1) // sw + qt  # + the last tile's reach
    par = _task_loop(bsz * co * oh * ow * ci * kh * kw)
    f = _act_fn(act)
    planes = _planes_macro(s, nx, par)
    init, store = _wide_tile_macros(r, hw, two, wq, ow, f, residual)

    @T.macro
    def body(x, wt, bias, z, y):
        xf = T.decl_buffer((nx,), "float32")
        for b in T.serial(bsz):
            planes(x, xf, b)
            # phase 2: R output channels x QT wide positions per task
            for t in par(nrt * nqt):
                acc0 = T.decl_buffer((r, hw), "float32", scope=CPU_STACK)
                acc1 = T.decl_buffer((r, hw), "float32", scope=CPU_STACK)
                init(acc0, acc1, bias, T.min(t // nqt * r, co - r))
                for i in T.serial(ci):
                    for dh in T.serial(kh):
                        for dw in T.unroll(kw):
                            for rr in T.unroll(r):
                                for j in T.vectorized(hw):
                                    acc0[rr, j] = acc0[rr, j] + wt[t // nqt, (i * kh + dh) * kw + dw, rr] * xf[
                                        i * ps + (dh % sh * sw + dw % sw) * plane + dh // sh * wq + dw // sw
                                        + T.min(t % nqt * qt, q - qt) + j]
                                if two:
                                    for j in T.vectorized(hw):
                                        acc1[rr, j] = acc1[rr, j] + wt[t // nqt, (i * kh + dh) * kw + dw, rr] * xf[
                                            i * ps + (dh % sh * sw + dw % sw) * plane + dh // sh * wq + dw // sw
                                            + T.min(t % nqt * qt, q - qt) + hw + j]
                store(acc0, acc1, z, y, b, T.min(t // nqt * r, co - r), T.min(t % nqt * qt, q - qt))

    if residual:
        @T.prim_func
        def direct_residual(x: T.Buffer((bsz, ci, h, w), "float32"), wt: T.Buffer((nrt, ci * kh * kw, r), "float32"),
                            bias: T.Buffer((co,), "float32"), z: T.Buffer((bsz, co, oh, ow), "float32"),
                            y: T.Buffer((bsz, co, oh, ow), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            body(x, wt, bias, z, y)

        return direct_residual

    @T.prim_func
    def direct(x: T.Buffer((bsz, ci, h, w), "float32"), wt: T.Buffer((nrt, ci * kh * kw, r), "float32"),
               bias: T.Buffer((co,), "float32"), y: T.Buffer((bsz, co, oh, ow), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        body(x, wt, bias, None, y)

    return direct


def sparse_direct_tile(r: int, q: int, target: Any) -> int:
    """Wide output positions per task of the sparse direct kernel with ``r``-row blocks: about
    16 (AVX-512) / 12 (AVX2) / 24 (NEON) accumulator registers (``r = 1``: 8 vectors, enough
    independent FMA chains to hide their latency), at most ``q``. Always a power-of-two number of
    SIMD vectors (two sets of half each): LLVM scalarises a loop-carried ``<24 x float>`` (AVX2,
    49-pixel 1x1 layers ran 8x slower with 48-wide tiles than with 32)."""
    v = vector_floats(target)
    fam = target_family(target)
    regs = 24 if fam == "arm" else (16 if v >= 16 else 12)
    nv = max(1, min(8, regs // max(r, 1)))
    if q < nv * v:
        nv = max(1, q // v)
    nv = 1 << (nv.bit_length() - 1)  # largest power of two <= nv
    return nv * v if q >= v else q


def sparse_direct_offsets(s: ConvShape, cols: np.ndarray) -> np.ndarray:
    """Flat input offset (into :func:`make_direct`'s polyphase planes) of each weight column
    ``(i * KH + kh) * KW + kw`` of the ``[O, I*KH*KW]`` matrix."""
    hq, wq = direct_geometry(s)
    plane = hq * wq
    cols = np.asarray(cols, np.int64)
    i, rest = np.divmod(cols, s.kh * s.kw)
    dh, dw = np.divmod(rest, s.kw)
    off = i * (s.sh * s.sw * plane) + ((dh % s.sh) * s.sw + dw % s.sw) * plane + (dh // s.sh) * wq + dw // s.sw
    return off.astype(np.int32)


def make_sparse_direct(s: ConvShape, r: int, nnzb: int, act: Act = NONE, target: Any = "x86",
                       residual: bool = False):
    """``f(x[B, I, H, W], data[nnzb, R], offs[nnzb], indptr[O/R + 1], bias[O], y[B, O, OH, OW])``
    (``residual``: ``f(x, data, offs, indptr, bias, z, y)``, ``y = act(conv + bias + z)``): the
    direct kernel's shifted matrix product over a block-sparse weight (``R x 1`` blocks: ``R``
    consecutive output channels sharing one tap; ``R = 1`` unstructured). ``offs`` = each stored
    block's flat tap offset (:func:`sparse_direct_offsets`), so a stored block costs ``R``
    broadcasts and ``R * QT / lanes`` FMAs over contiguous positions, whatever the kernel size,
    stride and padding (the direct sparse convolution of Park et al. 2017, "Faster CNNs with
    Direct Sparse Convolutions and Guided Pruning"). One task per (block row, position tile). A
    plain 1x1 conv (stride 1, no padding) reads ``x`` itself: its planes would be a copy."""
    from tvm.script import tirx as T

    assert s.kind() in ("direct", "conv1x1") and s.group == 1 and s.o % r == 0, (s, r)
    bsz, ci, h, w, co, kh, kw, sh, sw = s.b, s.i, s.h, s.w, s.o, s.kh, s.kw, s.sh, s.sw
    oh, ow = s.oh, s.ow
    hq, wq = direct_geometry(s)
    ps = sh * sw * hq * wq
    q = oh * wq
    qt = sparse_direct_tile(r, q, target)
    v = vector_floats(target)
    two = qt >= 2 * v
    hw = qt // 2 if two else qt
    nqt = -(-q // qt)
    nbr = co // r
    nnzb_ = max(nnzb, 1)
    plain = s.kind() == "conv1x1"  # planes == x: no copy
    xs = ci * h * w
    nx = ci * ps + ((kh - 1) // sh) * wq + (kw - 1) // sw + (0 if plain else qt)
    par = _task_loop(bsz * max(nnzb, 1) * r * oh * ow)
    f = _act_fn(act)
    planes = _planes_macro(s, nx, par)
    init, store = _wide_tile_macros(r, hw, two, wq, ow, f, residual)

    @T.macro
    def body(x, data, offs, indptr, bias, z, y):
        xf = T.decl_buffer((1 if plain else nx,), "float32")
        xv = T.decl_buffer((bsz * ci * h * w,), "float32", data=x.data)  # plain 1x1: x is its own plane
        for b in T.serial(bsz):
            if not plain:
                planes(x, xf, b)
            for t in par(nbr * nqt):
                acc0 = T.decl_buffer((r, hw), "float32", scope=CPU_STACK)
                acc1 = T.decl_buffer((r, hw), "float32", scope=CPU_STACK)
                init(acc0, acc1, bias, t // nqt * r)
                for e in T.serial(indptr[t // nqt], indptr[t // nqt + 1]):
                    for rr in T.unroll(r):
                        for j in T.vectorized(hw):
                            acc0[rr, j] = acc0[rr, j] + data[e, rr] * (
                                xv[b * xs + offs[e] + T.min(t % nqt * qt, q - qt) + j] if plain
                                else xf[offs[e] + T.min(t % nqt * qt, q - qt) + j])
                        if two:
                            for j in T.vectorized(hw):
                                acc1[rr, j] = acc1[rr, j] + data[e, rr] * (
                                    xv[b * xs + offs[e] + T.min(t % nqt * qt, q - qt) + hw + j] if plain
                                    else xf[offs[e] + T.min(t % nqt * qt, q - qt) + hw + j])
                store(acc0, acc1, z, y, b, t // nqt * r, T.min(t % nqt * qt, q - qt))

    if residual:
        @T.prim_func
        def sparse_direct_residual(x: T.Buffer((bsz, ci, h, w), "float32"), data: T.Buffer((nnzb_, r), "float32"),
                                   offs: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
                                   bias: T.Buffer((co,), "float32"), z: T.Buffer((bsz, co, oh, ow), "float32"),
                                   y: T.Buffer((bsz, co, oh, ow), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
            body(x, data, offs, indptr, bias, z, y)

        return sparse_direct_residual

    @T.prim_func
    def sparse_direct(x: T.Buffer((bsz, ci, h, w), "float32"), data: T.Buffer((nnzb_, r), "float32"),
                      offs: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
                      bias: T.Buffer((co,), "float32"), y: T.Buffer((bsz, co, oh, ow), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        body(x, data, offs, indptr, bias, None, y)

    return sparse_direct


def sparse_direct_arrays(s: ConvShape, w_nk: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(data[nnzb, R], offs[nnzb], indptr)`` of the ``[O, I*KH*KW]`` weight in ``R x 1`` blocks
    (a block is stored when any of its ``R`` values is non-zero)."""
    n, k = w_nk.shape
    blocks = w_nk.reshape(n // r, r, k)
    keep = np.any(blocks != 0, axis=1)  # [n/r, k]
    rows, cols = np.nonzero(keep)
    data = np.ascontiguousarray(blocks[rows, :, cols], dtype=np.float32).reshape(-1, r)
    indptr = np.zeros(n // r + 1, np.int32)
    np.cumsum(np.bincount(rows, minlength=n // r), out=indptr[1:])
    return data, sparse_direct_offsets(s, cols), indptr


ADD_CHUNK = 256  # floats per task of the residual add kernel


def make_add(shape: tuple[int, ...], act: Act = NONE, target: Any = "x86"):
    """``f(a[shape], b[shape], y[shape])``: ``y = act(a + b)`` over the flattened tensor, tasks
    of ``ADD_CHUNK`` floats (the last one overlapping its neighbour), vectorized. TVM's
    legalized elementwise ops are unscheduled on CPU (a 64x32x32 reshape+clip took 0.15 ms,
    ~30x this kernel); used for the residual ``Add`` after a conv."""
    from tvm.script import tirx as T

    n = int(np.prod(shape))
    ch = _tile(n, ADD_CHUNK)
    nch = math.ceil(n / ch)
    par = _task_loop(n * ADD_MAC_EQUIV)
    f = _act_fn(act)

    @T.prim_func
    def add(a_: T.Buffer(shape, "float32"), b_: T.Buffer(shape, "float32"), y_: T.Buffer(shape, "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        a = T.decl_buffer((n,), "float32", data=a_.data)
        b = T.decl_buffer((n,), "float32", data=b_.data)
        y = T.decl_buffer((n,), "float32", data=y_.data)
        for t in par(nch):
            for j in T.vectorized(ch):
                y[T.min(t * ch, n - ch) + j] = f(a[T.min(t * ch, n - ch) + j] + b[T.min(t * ch, n - ch) + j])

    return add


def make_global_avgpool(shape: tuple[int, int, int, int], target: Any = "x86"):
    """``f(x[B, C, H, W], y[B, C, 1, 1])``: per channel, ``V`` vector partial sums over the
    contiguous ``H*W`` pixels, a scalar tail, one horizontal sum, times ``1 / (H*W)``."""
    from tvm.script import tirx as T

    bsz, c, h, w = shape
    m = h * w
    v = vector_floats(target)
    mv = m // v
    inv = T.float32(1.0 / m)
    zero = T.float32(0)
    par = _task_loop(bsz * c * m * ADD_MAC_EQUIV)

    @T.prim_func(s_tir=True)
    def gap(x_: T.Buffer((bsz, c, h, w), "float32"), y_: T.Buffer((bsz, c, 1, 1), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": OPAQUE})
        # one opaque block around the body: Relax's RewriteDataflowReshape inspects every
        # single-input call_tir (HasReshapePattern) and requires a block-structured body
        with T.sblock("global_avgpool"):
            x = T.decl_buffer((bsz * c, m), "float32", data=x_.data)
            y = T.decl_buffer((bsz * c,), "float32", data=y_.data)
            for t in par(bsz * c):
                acc = T.decl_buffer((v,), "float32", scope=CPU_STACK)
                tot = T.decl_buffer((1,), "float32", scope=CPU_STACK)
                for l in T.vectorized(v):
                    acc[l] = zero
                for j in T.serial(mv):
                    for l in T.vectorized(v):
                        acc[l] = acc[l] + x[t, j * v + l]
                tot[0] = zero
                for l in T.serial(v):
                    tot[0] = tot[0] + acc[l]
                for j in T.serial(m - mv * v):
                    tot[0] = tot[0] + x[t, mv * v + j]
                y[t] = tot[0] * inv

    return gap


def kernel_weights(s: ConvShape, weight: np.ndarray, bias: np.ndarray | None,
                   target: Any = "x86") -> tuple[np.ndarray, np.ndarray]:
    """ONNX ``W[O, I/g, KH, KW]`` (+ bias) -> the kernel's weight layout for ``target`` and a
    bias vector. conv1x1: ``wp[i, k, rr] = W[min(i * R, O - R) + rr, k]`` (the tiles of the
    kernel, the last one overlapping its neighbour)."""
    weight = np.asarray(weight, np.float32)
    b = np.zeros(s.o, np.float32) if bias is None else np.asarray(bias, np.float32).reshape(s.o)
    kind = s.kernel()
    if kind == "conv1x1":
        r, _ = conv1x1_tiles(s.h * s.w, s.o, target)
        w2 = weight.reshape(s.o, s.i)
        starts = np.minimum(np.arange(math.ceil(s.o / r)) * r, s.o - r)
        wk = w2[starts[:, None] + np.arange(r)[None, :]].transpose(0, 2, 1)  # [tiles, I, R]
    elif kind == "depthwise":
        wk = weight.reshape(s.o, s.kh * s.kw)
    elif kind == "direct":
        hq, wq = direct_geometry(s)
        r, _ = direct_tiles(s.o, s.oh * wq, target)
        w2 = weight.reshape(s.o, s.i * s.kh * s.kw)
        starts = np.minimum(np.arange(math.ceil(s.o / r)) * r, s.o - r)
        wk = w2[starts[:, None] + np.arange(r)[None, :]].transpose(0, 2, 1)  # [tiles, I*KH*KW, R]
    else:
        raise ValueError(f"no kernel for {s}")
    return np.ascontiguousarray(wk), b


def make_primfunc(s: ConvShape, act: Act = NONE, target: Any = "x86", residual: bool = False):
    kind = s.kernel()
    if residual and kind not in ("conv1x1", "direct"):
        raise ValueError(f"no residual form of the {kind} kernel")
    if kind == "conv1x1":
        return make_conv1x1(s, act, target, residual)
    if kind == "depthwise":
        return make_depthwise(s, act, target)
    if kind == "direct":
        return make_direct(s, act, target, residual)
    raise ValueError(f"no kernel for {s}")


def build(s: ConvShape, act: Act, tvm_target: Any, residual: bool = False):
    """Compile one standalone kernel: ``f(x[B, I, H, W], w_kernel_layout, bias, [z,] y[B, O, OH, OW])``
    (weights from :func:`kernel_weights` for the same target)."""
    import tvm

    tgt = tvm_target if isinstance(tvm_target, tvm.target.Target) else tvm.target.Target(tvm_target)
    f = make_primfunc(s, act, tgt, residual).with_attr("global_symbol", "conv_kernel")
    mod = tvm.IRModule({"conv_kernel": f})
    with tgt:
        return tvm.compile(mod, target=tgt)


def reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, s: ConvShape,
              act: Act = NONE) -> np.ndarray:
    """numpy oracle (float64 accumulate) for any group count."""
    pt, pl, pb, pr = s.pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    w = weight.astype(np.float64)
    ig, og = s.i // s.group, s.o // s.group
    y = np.zeros(s.out_shape, np.float64)
    for g in range(s.group):
        for dh in range(s.kh):
            for dw in range(s.kw):
                patch = xp[:, g * ig:(g + 1) * ig, dh:dh + s.sh * (s.oh - 1) + 1:s.sh,
                           dw:dw + s.sw * (s.ow - 1) + 1:s.sw]
                y[:, g * og:(g + 1) * og] += np.einsum("oi,bihw->bohw", w[g * og:(g + 1) * og, :, dh, dw], patch)
    if bias is not None:
        y += np.asarray(bias, np.float64)[None, :, None, None]
    return act.apply_np(y).astype(np.float32)


# ------------------------------------------------------------------ ONNX graph plan (activation fusion)


def _constant_values(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    vals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_float":
                    vals[n.output[0]] = np.float32(a.f)
    return vals


def _activation_of(node, consts: dict[str, np.ndarray]) -> Act | None:
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Relu":
        return RELU
    if node.op_type != "Clip":
        return None
    lo, hi = -INF, INF
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            lo = float(a.f)
        elif a.name == "max":
            hi = float(a.f)
    bounds = list(node.input[1:3]) + [""] * (3 - len(node.input))
    for idx, name in enumerate(bounds[:2]):
        if not name:
            continue
        if name not in consts or np.asarray(consts[name]).size != 1:
            return None
        v = float(np.asarray(consts[name]).reshape(()))
        if math.isnan(v):
            return None
        if idx == 0:
            lo = v
        else:
            hi = v
    return Act(lo, hi)


def _name_counts(model) -> Counter:
    """How often each node name occurs (converters find nodes by name: only unique ones can be planned)."""
    return Counter(n.name for n in model.graph.node)


def plan_fusion(model, op_types: tuple[str, ...] = ("Conv",), domain: str = "") -> dict[str, tuple[str, Act]]:
    """``{producer node name: (activation node name, Act)}`` for every ``op_types`` node whose
    single output feeds exactly one Relu/constant-bound Clip and is not a graph output.
    Nodes without a unique non-empty name are never fused (converters find nodes by name)."""
    unique = {nm for nm, c in _name_counts(model).items() if nm and c == 1}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    consts = _constant_values(model)
    plan: dict[str, tuple[str, Act]] = {}
    for n in model.graph.node:
        if n.op_type not in op_types or n.domain != domain or n.name not in unique or len(n.output) != 1:
            continue
        out = n.output[0]
        users = consumers.get(out, [])
        if out in outputs or len(users) != 1 or users[0].name not in unique:
            continue
        act = _activation_of(users[0], consts)
        if act is not None and act.lo <= act.hi:
            plan[n.name] = (users[0].name, act)
    return plan


# ------------------------------------------------------------------ Relax ONNX frontend hook


@dataclass
class ConverterState:
    """Per-import bookkeeping of the converters (one per :func:`relax_converters` call)."""

    plan: dict[str, tuple[str, Act]]
    absorbed: set[str] = field(default_factory=set)
    kernels: dict[str, int] = field(default_factory=dict)  # kind -> count
    fallbacks: list[str] = field(default_factory=list)  # "node: reason"
    # Conv / SparseConv node name -> builder(act, z) -> (residual prim func, name, call args): what a
    # residual Add/Sum reading that node's (still un-emitted) call runs instead, its epilogue fused
    calls: dict[str, Any] = field(default_factory=dict)


def conv_shape_from(x_shape, w_shape, attr: dict) -> tuple[ConvShape | None, str]:
    """(ConvShape, "") or (None, reason) for the Conv attributes the frontend parsed."""
    if len(x_shape) != 4 or len(w_shape) != 4:
        return None, f"not 2-D NCHW (input rank {len(x_shape)})"
    auto_pad = attr.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", ""):
        return None, f"auto_pad={auto_pad}"
    if any(int(d) != 1 for d in attr.get("dilations", (1, 1))):
        return None, f"dilations={list(attr['dilations'])}"
    strides = [int(v) for v in attr.get("strides", (1, 1))]
    pads = [int(v) for v in attr.get("pads", (0, 0, 0, 0))]
    if len(strides) != 2 or len(pads) != 4 or min(strides) < 1 or min(pads) < 0:
        return None, f"strides={strides} pads={pads}"
    b, i, h, w = (int(v) for v in x_shape)
    o, ig, kh, kw = (int(v) for v in w_shape)
    if "kernel_shape" in attr and [int(v) for v in attr["kernel_shape"]] != [kh, kw]:
        return None, f"kernel_shape {list(attr['kernel_shape'])} != weight {[kh, kw]}"
    group = int(attr.get("group", 1))
    if group < 1 or i % group or ig * group != i or o % group:
        return None, f"group={group} inconsistent with shapes"
    # padding must stay below the kernel size (so every output reads an input pixel)
    if pads[0] >= kh or pads[2] >= kh or pads[1] >= kw or pads[3] >= kw:
        return None, f"pads {pads} >= kernel {kh}x{kw}"
    s = ConvShape(b, i, h, w, o, kh, kw, strides[0], strides[1], tuple(pads), group)
    if s.oh < 1 or s.ow < 1:
        return None, "empty output"
    if s.kind() == "unsupported":
        return None, f"grouped conv group={group} (only group 1 and depthwise)"
    return s, ""


def relax_converters(tvm_target: Any, model=None) -> tuple[dict[str, type], ConverterState]:
    """Converters for ``Conv`` (and, when ``model`` is given, the ``Relu``/``Clip`` nodes
    fused into a conv) on CPU targets; ``({}, state)`` for CUDA."""
    from tvm import relax

    state = ConverterState(plan_fusion(model) if model is not None else {})
    if target_family(tvm_target) == "cuda":
        return {}, state
    original = frontend_converter(model_opset(model))

    def conv_impl(cls, bb, inputs, attr, params):
        name = str(attr.get("tvm_custom", {}).get("name", ""))
        x = inputs[0]
        reason = ""
        s = None
        w = const_array(inputs[1]) if len(inputs) > 1 else None
        bias = inputs[2] if len(inputs) > 2 else None
        bias_np = const_array(bias) if bias is not None else None
        if w is None:
            reason = "weight is not a constant"
        elif bias is not None and bias_np is None:
            reason = "bias is not a constant"
        elif getattr(x.ty, "dtype", None) != "float32" or w.dtype != np.float32:
            reason = f"dtype {getattr(x.ty, 'dtype', '?')}"
        else:
            try:
                x_shape = [int(d) for d in x.ty.shape]
            except Exception:
                x_shape = None
            if x_shape is None:
                reason = "dynamic input shape"
            else:
                s, reason = conv_shape_from(x_shape, w.shape, attr)
        if s is None:
            state.fallbacks.append(f"{name or '<unnamed Conv>'}: {reason}")
            log.warning("Conv %s: %s; using TVM's generic conv2d (unscheduled unless tuned)", name, reason)
            return original("Conv", bb, inputs, attr, params)
        fused = state.plan.get(name)
        act = fused[1] if fused else NONE
        wk, bk = kernel_weights(s, w, bias_np, tvm_target)
        prim = make_primfunc(s, act, tvm_target).without_attr("global_symbol")
        kind = s.kernel()
        gv = bb.add_func(prim, f"conv_{kind}_{act.name}")
        state.kernels[kind] = state.kernels.get(kind, 0) + 1
        out_ty = relax.TensorType(s.out_shape, "float32")
        wc, bc = relax.const(wk), relax.const(bk)
        y = relax.call_tir(gv, [x, wc, bc], out_ty)
        if fused:
            state.absorbed.add(fused[0])
        elif kind in ("conv1x1", "direct") and name:
            state.calls[name] = lambda a_, z_, s=s, x=x, wc=wc, bc=bc: (
                make_primfunc(s, a_, tvm_target, residual=True), f"conv_{s.kernel()}_residual_{a_.name}", [x, wc, bc, z_])
        return y

    def act_impl(op: str):
        def impl(cls, bb, inputs, attr, params):
            if str(attr.get("tvm_custom", {}).get("name", "")) in state.absorbed:
                return inputs[0]  # already applied by the conv kernel
            return original(op, bb, inputs, attr, params)

        return impl

    from tvm.relax.frontend.onnx import onnx_frontend

    base = onnx_frontend.OnnxOpConverter
    conv_cls = type("ConvKernelConverter", (base,), {"_impl_v1": classmethod(conv_impl)})
    convs: dict[str, type] = {"Conv": conv_cls}

    # compressor::SparseConv1x1 (lower.sparse) followed by Relu / Clip(0, 6): fused into the BSR kernel
    sparse_plan = plan_fusion(model, (sparse_ops.CONV1X1,), sparse_ops.DOMAIN) if model is not None else {}
    sparse_plan = {k: v for k, v in sparse_plan.items() if v[1] in (RELU, RELU6)}
    if sparse_plan:
        from targets import sparse_kernels

        sconv = sparse_kernels.relax_converters(
            tvm_target, {k: ("relu" if a == RELU else "relu6") for k, (_, a) in sparse_plan.items()})["SparseConv1x1"]

        def sparse_impl(cls, bb, inputs, attr, params):
            y = sconv._impl_v1(bb, inputs, attr, params)
            fused = sparse_plan.get(str(attr.get("tvm_custom", {}).get("name", "")))
            if fused:
                state.absorbed.add(fused[0])
            return y

        convs["SparseConv1x1"] = type("SparseConv1x1FusedConverter", (base,), {"_impl_v1": classmethod(sparse_impl)})

    # compressor::SparseConv[Relu] (lower.sparse's KxK / strided / padded convs): the sparse direct kernel
    def sparse_kxk_impl(cls, bb, inputs, attr, params, relu=False):
        from tvm.ir import expr as tvm_ir_expr

        from compressor.errors import TargetError
        from targets.sparse_kernels import BSR, from_bsr

        x = inputs[0]
        consts_ = inputs[1:5]
        if len(consts_) != 4 or not all(isinstance(c, tvm_ir_expr.Constant) for c in consts_):
            raise TargetError("compressor::SparseConv: data/indices/indptr/bias must be initializers")
        data, indices, indptr, bias = (c.value.numpy() for c in consts_)
        bsz, ci, h, w = (int(d) for d in x.ty.shape)
        kh, kw = (int(v) for v in attr.get("kernel_shape", (1, 1)))
        sh, sw = (int(v) for v in attr.get("strides", (1, 1)))
        pads = tuple(int(v) for v in attr.get("pads", (0, 0, 0, 0)))
        r = int(data.shape[1])
        n = (len(indptr) - 1) * r
        cs = ConvShape(bsz, ci, h, w, n, kh, kw, sh, sw, pads)
        w_nk = from_bsr(BSR(data.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int32),
                            (n, ci * kh * kw)))
        rr = r if int(data.shape[2]) == 1 else 1
        d_, offs, ip = sparse_direct_arrays(cs, w_nk, rr)
        act = RELU if relu else NONE
        name = str(attr.get("tvm_custom", {}).get("name", ""))
        fused = sparse_kxk_plan.get(name)
        if fused and not relu:
            act = fused[1]
            state.absorbed.add(fused[0])
        prim = make_sparse_direct(cs, rr, len(d_), act, tvm_target).without_attr("global_symbol")
        gv = bb.add_func(prim, f"sparse_direct_{rr}x1_{act.name}")
        state.kernels["sparse_direct"] = state.kernels.get("sparse_direct", 0) + 1
        args = [x, relax.const(d_.reshape(max(len(d_), 1), rr) if len(d_) else np.zeros((1, rr), np.float32)),
                relax.const(offs if len(offs) else np.zeros(1, np.int32)), relax.const(ip),
                relax.const(np.asarray(bias, np.float32).reshape(n))]
        if name and not relu and not fused:
            state.calls[name] = lambda a_, z_, cs=cs, rr=rr, nz=len(d_), args=args: (
                make_sparse_direct(cs, rr, nz, a_, tvm_target, residual=True), f"sparse_direct_{rr}x1_residual_{a_.name}",
                [*args, z_])
        return relax.call_tir(gv, args, relax.TensorType(cs.out_shape, "float32"))

    sparse_kxk_plan = plan_fusion(model, (sparse_ops.KXK,), sparse_ops.DOMAIN) if model is not None else {}
    if model is not None and any(nd.domain == sparse_ops.DOMAIN and nd.op_type in sparse_ops.KXK_OPS
                                 for nd in model.graph.node):
        convs[sparse_ops.KXK] = type("SparseConvConverter", (base,), {"_impl_v1": classmethod(sparse_kxk_impl)})
        convs[sparse_ops.KXK_RELU] = type("SparseConvReluConverter", (base,), {"_impl_v1": classmethod(
            lambda cls, bb, inputs, attr, params: sparse_kxk_impl(cls, bb, inputs, attr, params, relu=True))})

    # residual Adds reading a conv output: scheduled add kernel (+ a following Relu/Clip)
    add_nodes = residual_adds(model) if model is not None else set()
    add_convs = residual_conv_inputs(model, add_nodes) if add_nodes else {}
    add_plan = {k: v for k, v in plan_fusion(model, ("Add", "Sum")).items() if k in add_nodes} if add_nodes else {}
    if add_nodes:

        def add_impl(cls, bb, inputs, attr, params, op="Add"):
            name = str(attr.get("tvm_custom", {}).get("name", ""))
            a, b = (inputs[0], inputs[1]) if len(inputs) == 2 else (None, None)
            try:
                sa = [int(d) for d in a.ty.shape] if a is not None else None
                sb = [int(d) for d in b.ty.shape] if b is not None else None
            except Exception:
                sa = sb = None
            if (name not in add_nodes or sa is None or sa != sb or getattr(a.ty, "dtype", "") != "float32"
                    or getattr(b.ty, "dtype", "") != "float32"):
                return original(op, bb, inputs, attr, params)
            fused = add_plan.get(name)
            act = fused[1] if fused else NONE
            for k, conv_name in enumerate(add_convs.get(name, ())):
                # the conv's call is still un-emitted (the frontend only normalizes a converter's
                # result; its single consumer is this Add): replace it by the conv kernel with the
                # residual input, so the sum never makes a separate pass over memory
                builder = state.calls.get(conv_name)
                if builder is None or not _is_call_tir(inputs[k]):
                    continue
                prim, fname, args = builder(act, inputs[1 - k])
                gv = bb.add_func(prim.without_attr("global_symbol"), fname)
                state.kernels["residual_fused"] = state.kernels.get("residual_fused", 0) + 1
                if fused:
                    state.absorbed.add(fused[0])
                return relax.call_tir(gv, args, relax.TensorType(tuple(sa), "float32"))
            gv = bb.add_func(make_add(tuple(sa), act, tvm_target).without_attr("global_symbol"), f"add_{act.name}")
            state.kernels["add"] = state.kernels.get("add", 0) + 1
            if fused:
                state.absorbed.add(fused[0])
            return relax.call_tir(gv, [a, b], relax.TensorType(tuple(sa), "float32"))

        convs["Add"] = type("ResidualAddConverter", (base,), {"_impl_v1": classmethod(add_impl)})

        def sum_impl(cls, bb, inputs, attr, params):
            return add_impl(cls, bb, inputs, attr, params, op="Sum")

        convs["Sum"] = type("ResidualSumConverter", (base,), {"_impl_v1": classmethod(sum_impl)})
    def gap_impl(cls, bb, inputs, attr, params):
        x = inputs[0]
        try:
            shape = tuple(int(d) for d in x.ty.shape)
        except Exception:
            shape = ()
        if len(shape) != 4 or getattr(x.ty, "dtype", "") != "float32":
            return original("GlobalAveragePool", bb, inputs, attr, params)
        gv = bb.add_func(make_global_avgpool(shape, tvm_target).without_attr("global_symbol"), "global_avgpool")
        state.kernels["global_avgpool"] = state.kernels.get("global_avgpool", 0) + 1
        return relax.call_tir(gv, [x], relax.TensorType((shape[0], shape[1], 1, 1), "float32"))

    convs["GlobalAveragePool"] = type("GlobalAvgPoolConverter", (base,), {"_impl_v1": classmethod(gap_impl)})
    if state.plan or sparse_plan or add_plan or sparse_kxk_plan:
        for op in ("Relu", "Clip"):
            convs[op] = type(f"{op}FusedConverter", (base,), {"_impl_v1": classmethod(act_impl(op))})
    return convs, state


def _is_call_tir(expr) -> bool:
    from tvm import relax

    return isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir"


def residual_conv_inputs(model, add_nodes: set[str]) -> dict[str, tuple[str | None, ...]]:
    """``{Add name: (Conv name or None per input)}``: the standard-domain ``Conv`` producing an
    input of a residual Add whose only consumer is that Add (and that is not a graph output nor
    fused with an activation): the Add can run as that conv kernel's epilogue."""
    producers = {o: n for n in model.graph.node for o in n.output}
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    outputs = {o.name for o in model.graph.output}
    counts = _name_counts(model)
    out: dict[str, tuple[str | None, ...]] = {}
    for n in model.graph.node:
        if n.name not in add_nodes:
            continue
        convs: list[str | None] = []
        for i in n.input:
            p = producers.get(i)
            ok = (p is not None and (p.op_type == "Conv" and p.domain in ("", "ai.onnx")
                                     or p.op_type == sparse_ops.KXK and p.domain == sparse_ops.DOMAIN)
                  and p.name and counts[p.name] == 1 and uses.get(i, 0) == 1 and i not in outputs and n.input[0] != n.input[1])
            convs.append(p.name if ok else None)
        out[n.name] = tuple(convs)
    return out


def residual_adds(model) -> set[str]:
    """Names of the (uniquely named) two-input ``Add`` (or ``Sum``: Caffe2-converted ResNets) nodes that read a ``Conv`` /
    ``compressor::SparseConv1x1[Relu]`` output (the residual joins of ResNet/MobileNet)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    counts = _name_counts(model)
    out: set[str] = set()
    for n in model.graph.node:
        if n.op_type not in ("Add", "Sum") or n.domain not in ("", "ai.onnx") or len(n.input) != 2 or counts[n.name] != 1:
            continue
        srcs = [producers.get(i) for i in n.input]
        if any(p is not None and (p.op_type == "Conv" and p.domain in ("", "ai.onnx")
                                  or p.domain == sparse_ops.DOMAIN and p.op_type in sparse_ops.CONV_OPS + sparse_ops.KXK_OPS)
               for p in srcs):
            out.add(n.name)
    return out
