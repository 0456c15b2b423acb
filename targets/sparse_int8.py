"""Int8 x uint8 block-sparse matrix products (issue 21, first step: the kernels and their exact oracle).

``Y[m, n] = dequant(sum_k Xq[m, k] * Wq[n, k])`` with ``Xq`` uint8 activations (per-tensor scale
``sx``, zero point ``zx``) and ``Wq`` int8 weights (symmetric, per output row scale ``sw[n]``)
stored block-sparse in **R x 4 blocks**: R consecutive output rows times 4 consecutive inputs, the
shape of one ``vpdpbusd`` (AVX-512 VNNI: 16 int32 lanes, each the dot product of 4 uint8 x 4 int8)
and of NEON's ``sdot``/``udot`` (4 lanes of 4 bytes). Block ``j`` of block row ``i`` covers rows
``i*R .. i*R+R-1`` and inputs ``4*indices[j] .. 4*indices[j]+3``; its 4R bytes are stored row after
row (``data[j, rr, 0:4]``), so that reinterpreted as R int32 values lane ``rr`` holds row ``rr``'s four
weights and the 4 input bytes are one broadcast int32.

Epilogue (fused): ``y = (acc - corr[n]) * scale[n] + bias[n]`` (+ ReLU), with ``corr[n] = zx *
sum_k Wq[n, k]`` (the zero point's contribution, exact in int32) and ``scale[n] = sx * sw[n]``;
``acc_only=True`` compiles the kernel that writes the int32 accumulators instead, the form the exact
tests compare bit for bit with numpy's integer product.

Variants by the target's code (``variant_for``):

* ``vnni``: ``llvm.x86.avx512.vpdpbusd.512`` on 16-row blocks (AVX-512 VNNI);
* ``avx2``: 8-row blocks; the block's bytes sign-extended to int16 (``vpmovsxbw``), x's 4 bytes
  zero-extended and repeated, two ``vpmaddwd`` (int16 pairs into int32: unlike ``vpmaddubsw``'s int16
  sums they cannot saturate, 255 * 127 * 2 > 32767) and one ``vphaddd`` per block and batch row; the
  rows are stored in ``AVX2_ROW_ORDER`` so that the horizontal add leaves them in order;
* ``sdot``: aarch64 with the dot-product extension (Cortex-A55/A76 and later: ``arm-a55``, ``arm-a76``):
  4-row blocks, one ``sdot`` (4 lanes x 4 signed bytes) per block and batch row; X comes in as int8
  (``x - 128``, see ``SIGNED_X``) since ``sdot`` is signed x signed (``usdot`` needs i8mm, which those
  cores lack);
* ``avx2_ubs``: the avx2 kernel when every weight has ``|w| <= 64`` (the 7-bit weights quantize.int8 writes
  for x86 without VNNI): ``vpmaddubsw`` (u8 x s8 pairs into int16, which then cannot saturate) and
  ``vpmaddwd`` with ones, rows in order; chosen per layer by ``refine_variant``;
* ``generic``: the same loop written as int32 multiply-adds of widened bytes, which LLVM vectorises
  for any ISA (plain ``--target arm``: NEON widening multiplies).

Accumulation is int32: a row overflows only past 2^31 / (255 * 128) = 65 793 stored inputs per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from targets.sparse_kernels import CPU_STACK, llvm_features, target_family

BLOCK_C = 4  # inputs per block: one 32-bit group of vpdpbusd / sdot
MAX_ROW_INPUTS = (2 ** 31 - 1) // (255 * 128)  # stored inputs per row below which int32 cannot overflow
PARALLEL_MIN_STORED_BYTES = 1 << 17  # stored weight bytes x batch rows below which the kernel runs serially


@dataclass(frozen=True)
class BSRInt8:
    """An int8 weight ``[N, K]`` in R x 4 blocks (``data[nnzb, R, 4]``) with its per-row scale."""

    shape: tuple[int, int]
    r: int
    data: np.ndarray  # int8 [nnzb, R, 4]
    indices: np.ndarray  # int32 [nnzb]: block column (input group of 4)
    indptr: np.ndarray  # int32 [N/R + 1]
    row_scale: np.ndarray  # float32 [N]: sw

    @property
    def nnzb(self) -> int:
        return int(len(self.indices))

    def density(self) -> float:
        n, k = self.shape
        return self.nnzb * self.r * BLOCK_C / float(n * k)

    def block_rows(self) -> np.ndarray:
        """The block row of every stored block (``indptr`` expanded)."""
        return np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))

    def dense(self) -> np.ndarray:
        """The int8 weight ``[N, K]`` (zeros where no block is stored)."""
        n, k = self.shape
        w = np.zeros((n // self.r, k // BLOCK_C, self.r, BLOCK_C), np.int8)
        w[self.block_rows(), self.indices] = self.data
        return w.transpose(0, 2, 1, 3).reshape(n, k)

    def row_sums(self) -> np.ndarray:
        """``sum_k Wq[n, k]`` per row (int32), from the stored blocks."""
        sums = np.zeros((len(self.indptr) - 1, self.r), np.int64)
        np.add.at(sums, self.block_rows(), self.data.astype(np.int64).sum(axis=2))
        return sums.reshape(-1).astype(np.int32)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-row int8: ``(Wq [N, K] int8 in [-127, 127], sw [N] float32)``; zeros stay zero."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=1)
    sw = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    return np.clip(np.rint(w / sw[:, None]), -127, 127).astype(np.int8), sw


def _blocks(wq: np.ndarray, r: int) -> np.ndarray:
    """``wq [N, K]`` as its R x 4 blocks ``[N/R, K/4, R, 4]`` (a view)."""
    n, k = wq.shape
    if n % r or k % BLOCK_C:
        raise ValueError(f"weight [{n}, {k}] not divisible by {r}x{BLOCK_C} blocks")
    return wq.reshape(n // r, r, k // BLOCK_C, BLOCK_C).transpose(0, 2, 1, 3)


def _nonempty(blocks: np.ndarray) -> np.ndarray:
    return (blocks != 0).any(axis=(2, 3))


def block_density(wq: np.ndarray, r: int) -> float:
    """Share of ``wq``'s R x 4 blocks that hold a non-zero (what :func:`to_bsr_int8` would store)."""
    return float(_nonempty(_blocks(wq, r)).mean())


def to_bsr_int8(wq: np.ndarray, sw: np.ndarray, r: int, keep_all: bool = False) -> BSRInt8:
    """Store the R x 4 blocks of ``wq`` that hold any non-zero (``N % R == 0``, ``K % 4 == 0``); ``keep_all``:
    every block (the dense int8 layer through the same kernel)."""
    n, k = wq.shape
    blocks = _blocks(wq, r)
    keep = np.ones(blocks.shape[:2], bool) if keep_all else _nonempty(blocks)
    bi, bj = np.nonzero(keep)
    data = np.ascontiguousarray(blocks[bi, bj], np.int8)
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return BSRInt8((n, k), r, data.reshape(-1, r, BLOCK_C), bj.astype(np.int32), indptr,
                   np.asarray(sw, np.float32))


def quantize_activation(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Asymmetric per-tensor uint8 of ``x``: ``(Xq, sx, zx)`` (min/max calibration on ``x`` itself)."""
    x = np.asarray(x, np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    sx = (hi - lo) / 255.0 or 1.0
    zx = int(np.clip(round(-lo / sx), 0, 255))
    return np.clip(np.rint(x / sx) + zx, 0, 255).astype(np.uint8), sx, zx


def variant_for(target: Any) -> str:
    """``vnni`` where the target's code has AVX-512 VNNI (and AVX-512 BW), ``avx2`` where it has AVX2,
    else ``generic``."""
    fam = target_family(target)
    if fam == "x86":
        feats = llvm_features(target)
        if {"avx512vnni", "avx512bw"} <= feats:
            return "vnni"
        if "avx2" in feats:
            return "avx2"
    if fam == "arm" and "dotprod" in llvm_features(target):
        return "sdot"
    return "generic"


BLOCK_ROWS = {"vnni": 16, "avx2": 8, "avx2_ubs": 8, "sdot": 4}  # block height per ISA variant (generic: any)
# |w| <= 64 (quantize.int8's 7-bit weights on x86 without VNNI, onnxruntime's reduce_range): vpmaddubsw's
# int16 pair sums stay below 255 * 64 * 2 = 32640 < 32767, so the AVX2 kernel can use it
UBS_MAX_ABS_W = 64


# sdot multiplies signed bytes: that kernel takes X as int8 with the zero point shifted by -128
# (x_s8 = x_u8 - 128 exactly), so its zero-point correction is (zx - 128) * rowsum(Wq)
SIGNED_X = frozenset({"sdot"})
# avx2: rows of an 8 x 4 block stored as 0, 1, 4, 5, 2, 3, 6, 7: vphaddd of the two vpmaddwd results
# (rows 0,1,4,5 and 2,3,6,7, one int16 pair each) then yields rows 0..7 in order
AVX2_ROW_ORDER = (0, 1, 4, 5, 2, 3, 6, 7)


def refine_variant(variant: str, wq_blocks: np.ndarray) -> str:
    """``avx2_ubs`` for the avx2 kernel when every weight fits ``UBS_MAX_ABS_W`` (no int16 saturation)."""
    if variant == "avx2" and (wq_blocks.size == 0 or int(np.abs(wq_blocks.astype(np.int16)).max()) <= UBS_MAX_ABS_W):
        return "avx2_ubs"
    return variant


def weight_arrays(b: BSRInt8, variant: str) -> tuple[np.ndarray, np.ndarray]:
    """``(data, indices)`` as the ``variant``'s kernel reads them: the blocks flat (rows in
    ``AVX2_ROW_ORDER`` for avx2), one zero block / index for an empty weight (buffers may not be empty)."""
    blocks = b.data if b.nnzb else np.zeros((1, b.r, BLOCK_C), np.int8)
    if variant == "avx2":
        blocks = blocks[:, list(AVX2_ROW_ORDER)]
    return np.ascontiguousarray(blocks).reshape(-1), (b.indices if b.nnzb else np.zeros(1, np.int32))


def reference_acc(xq: np.ndarray, b: BSRInt8) -> np.ndarray:
    """numpy oracle: the exact int32 accumulators ``Xq @ Wq^T`` (int64 product, checked to fit)."""
    acc = xq.astype(np.int64) @ b.dense().astype(np.int64).T
    assert np.abs(acc).max(initial=0) < 2 ** 31
    return acc.astype(np.int32)


def epilogue_args(b: BSRInt8, sx: float, zx: int, bias: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """``(scale[N] f32, corr[N] i32, bias[N] f32)`` of the fused dequantizing epilogue."""
    n = b.shape[0]
    scale = (np.float32(sx) * b.row_scale).astype(np.float32)
    corr = (np.int64(zx) * b.row_sums().astype(np.int64)).astype(np.int32)
    return scale, corr, np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32)


def reference(xq: np.ndarray, b: BSRInt8, sx: float, zx: int, bias: np.ndarray | None = None,
              relu: bool = False, requant: tuple[float, int] | None = None) -> np.ndarray:
    """numpy oracle of the fused epilogue (float32 epilogue arithmetic on the exact accumulators, as the
    kernel does it; with ``requant`` the uint8 output)."""
    scale, corr, bias_ = epilogue_args(b, sx, zx, bias)
    y = (reference_acc(xq, b) - corr).astype(np.float32) * scale + bias_
    y = np.maximum(y, np.float32(0)) if relu else y
    if requant:
        q = np.rint(y * np.float32(1.0 / requant[0])) + np.float32(requant[1])
        return np.clip(q, 0, 255).astype(np.uint8)
    return y


def m_tile(m: int, r: int) -> int:
    """Batch rows per accumulator tile: the largest divisor of ``m`` up to ``min(8, 64 // r)`` (at most 64
    int32 accumulators: 4 zmm / 8 ymm / 8-16 q registers, and a stack buffer far below 1 KiB)."""
    cap = max(1, min(8, 64 // r))
    return max(d for d in range(1, cap + 1) if m % d == 0)


def _block_update(variant: str, r: int):
    """``update(acc, xq, data, row, col4, j) -> acc'``: one stored block ``j`` (its ``4 * r`` bytes at
    ``data[j * 4r]``) times the 4 inputs ``xq[row, col4 : col4 + 4]`` added to the ``r`` int32 lanes of
    ``acc`` (TIR expressions; the kernel skeleton in :func:`make_primfunc` is the same for every variant)."""
    from tvm.script import tirx as T

    def x_dword(xq, row, col4, lanes):  # the 4 input bytes as one int32, repeated over the lanes
        return T.broadcast(T.reinterpret("int32", xq[row, T.ramp(col4, 1, 4)]), lanes)

    if variant == "vnni":
        vpdpbusd = T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512")
        return lambda acc, xq, data, row, col4, j: T.call_llvm_pure_intrin(
            "int32x16", vpdpbusd, acc, T.reinterpret("int8x64", x_dword(xq, row, col4, 16)), data[T.ramp(j * 64, 1, 64)])
    if variant == "sdot":
        sdot = T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8")
        return lambda acc, xq, data, row, col4, j: T.call_llvm_pure_intrin(
            "int32x4", sdot, acc, data[T.ramp(j * 16, 1, 16)], T.reinterpret("int8x16", x_dword(xq, row, col4, 4)))
    if variant == "avx2_ubs":
        # u8 x s8 pairs into int16 (cannot saturate: |w| <= 64), then pairs of those into int32 by a
        # multiply-add with ones: one row's 4 products per int32 lane, rows in order
        ubs = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw")
        wd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
        return lambda acc, xq, data, row, col4, j: acc + T.call_llvm_pure_intrin(
            "int32x8", wd, T.call_llvm_pure_intrin("int16x16", ubs, T.reinterpret("int8x32", x_dword(xq, row, col4, 8)),
                                                  data[T.ramp(j * 32, 1, 32)]), T.broadcast(T.int16(1), 16))
    if variant == "avx2":
        # x's 4 bytes as 4 int16 (zero-extended) repeated over the 4 64-bit groups; int16 x int16 -> int32
        # (vpmaddwd): no saturation whatever the values; rows stored in AVX2_ROW_ORDER so that vphaddd of
        # the two halves leaves them in order
        wd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
        hadd = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.phadd.d")

        def avx2(acc, xq, data, row, col4, j):
            x16 = T.reinterpret("int16x16", T.broadcast(T.reinterpret("int64", T.Cast("int16x4", xq[row, T.ramp(col4, 1, 4)])), 4))
            return acc + T.call_llvm_pure_intrin(
                "int32x8", hadd,
                T.call_llvm_pure_intrin("int32x8", wd, T.Cast("int16x16", data[T.ramp(j * 32, 1, 16)]), x16),
                T.call_llvm_pure_intrin("int32x8", wd, T.Cast("int16x16", data[T.ramp(j * 32 + 16, 1, 16)]), x16))

        return avx2

    def generic(acc, xq, data, row, col4, j):  # int32 multiply-adds of widened bytes (any ISA, any R)
        for c in range(BLOCK_C):
            acc = acc + T.Cast(f"int32x{r}", T.broadcast(xq[row, col4 + c], r)) * T.Cast(
                f"int32x{r}", data[T.ramp(j * r * BLOCK_C + c, BLOCK_C, r)])
        return acc

    return generic


def make_primfunc(m: int, b_shape: tuple[int, int], r: int, nnzb: int, target: Any, relu: bool = False,
                  acc_only: bool = False, variant: str | None = None, requant: tuple[float, int] | None = None):
    """PrimFunc ``f(xq[M, K] u8, data[nnzb*R*4] i8, indices[nnzb] i32, indptr[N/R+1] i32, scale[N] f32,
    corr[N] i32, bias[N] f32, y[M, N])`` (``y`` int32 with ``acc_only``; uint8 with ``requant = (s_y, z_y)``:
    ``clip(round(y / s_y) + z_y, 0, 255)``, the next layer's quantized input; else float32). One task per
    block row; batch rows in tiles of ``m_tile`` (their accumulators live in registers); the per-block
    update is the variant's (:func:`_block_update`)."""
    from tvm.script import tirx as T

    n, k = b_shape
    if n % r or k % BLOCK_C:
        raise ValueError(f"weight [{n}, {k}] not divisible by {r}x{BLOCK_C} blocks")
    variant = variant or variant_for(target)
    if BLOCK_ROWS.get(variant, r) != r:
        raise ValueError(f"the {variant} kernel takes {BLOCK_ROWS[variant]}x4 blocks (one vector of int32 lanes)")
    nbr = n // r
    nnzb_ = max(nnzb, 1)
    mt = m_tile(m, r)
    task = T.parallel if nnzb * r * BLOCK_C * m >= PARALLEL_MIN_STORED_BYTES else T.serial
    ydt = "int32" if acc_only else ("uint8" if requant else "float32")
    xdt = "int8" if variant in SIGNED_X else "uint8"
    zero_f = T.float32(0)
    update = _block_update(variant, r)

    def out(v, s, c, bb):
        if acc_only:
            return v
        y = T.Cast("float32", v - c) * s + bb
        y = T.max(y, zero_f) if relu else y
        if requant:
            q = T.round(y * T.float32(1.0 / requant[0])) + T.float32(requant[1])
            return T.Cast("uint8", T.min(T.max(q, zero_f), T.float32(255)))
        return y

    @T.prim_func
    def kernel(xq: T.Buffer((m, k), xdt), data: T.Buffer((nnzb_ * r * BLOCK_C,), "int8"),
               indices: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
               scale: T.Buffer((n,), "float32"), corr: T.Buffer((n,), "int32"), bias: T.Buffer((n,), "float32"),
               y: T.Buffer((m, n), ydt)):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        for i in task(nbr):
            for mo in T.serial(m // mt):
                acc = T.decl_buffer((mt * r,), "int32", scope=CPU_STACK)
                for mi in T.unroll(mt):
                    acc[T.ramp(mi * r, 1, r)] = T.broadcast(T.int32(0), r)
                for j in T.serial(indptr[i], indptr[i + 1]):
                    for mi in T.unroll(mt):
                        acc[T.ramp(mi * r, 1, r)] = update(acc[T.ramp(mi * r, 1, r)], xq, data, mo * mt + mi,
                                                           indices[j] * BLOCK_C, j)
                for mi in T.serial(mt):
                    for rr in T.vectorized(r):
                        y[mo * mt + mi, i * r + rr] = out(acc[mi * r + rr], scale[i * r + rr], corr[i * r + rr],
                                                          bias[i * r + rr])

    return kernel


def kernel_args(xq: np.ndarray, b: BSRInt8, sx: float, zx: int, bias: np.ndarray | None = None,
                variant: str = "generic") -> list[np.ndarray]:
    """Inputs of the ``variant``'s PrimFunc (output buffer not included): the avx2 kernel reads its
    blocks' rows in ``AVX2_ROW_ORDER``; the sdot kernel takes ``x - 128`` as int8 and the correction
    for it (its ``acc_only`` output is then ``(Xq - 128) @ Wq^T``)."""
    scale, corr, bias_ = epilogue_args(b, sx, zx, bias)
    data, idx = weight_arrays(b, variant)
    xq = np.ascontiguousarray(xq, np.uint8)
    if variant in SIGNED_X:
        xq = (xq.astype(np.int16) - 128).astype(np.int8)
        corr = (corr.astype(np.int64) - 128 * b.row_sums().astype(np.int64)).astype(np.int32)
    return [xq, data, idx, b.indptr, scale, corr, bias_]


def build(m: int, b: BSRInt8, target: Any, relu: bool = False, acc_only: bool = False, variant: str | None = None,
          requant: tuple[float, int] | None = None):
    """Compile a standalone kernel: ``f(*kernel_args, y)``."""
    import tvm

    tgt = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    f = make_primfunc(m, b.shape, b.r, b.nnzb, tgt, relu, acc_only, variant, requant).with_attr(
        "global_symbol", "bsr_int8")
    with tgt:
        lib = tvm.compile(tvm.IRModule({"bsr_int8": f}), target=tgt)
    return lib["bsr_int8"]


def make_dynamic_quantize(size: int, target: Any, signed: bool = False):
    """``f(x[size] f32, xq[size] u8|i8, xs[1] f32, xz[1] f32)``: ONNX DynamicQuantizeLinear over the whole
    tensor (``xs = (max(x, 0) - min(x, 0)) / 255``, ``xz = clip(round(-min / xs), 0, 255)``,
    ``xq = clip(round(x / xs) + xz, 0, 255)``), ``signed``: ``xq - 128`` as int8 (the sdot kernel's input;
    ``xz`` stays the uint8 zero point). One pass for the range (vector min/max), one to quantize."""
    from tvm.script import tirx as T

    from targets.sparse_kernels import vector_floats

    v = vector_floats(target)
    nv = size // v
    qdt = "int8" if signed else "uint8"
    shift = T.float32(-128.0 if signed else 0.0)
    zero = T.float32(0)

    @T.prim_func(s_tir=True)
    def dql(x: T.Buffer((size,), "float32"), xq: T.Buffer((size,), qdt), xs: T.Buffer((1,), "float32"),
            xz: T.Buffer((1,), "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        with T.sblock("dynamic_quantize"):
            lo = T.decl_buffer((v,), "float32", scope=CPU_STACK)
            hi = T.decl_buffer((v,), "float32", scope=CPU_STACK)
            rng = T.decl_buffer((2,), "float32", scope=CPU_STACK)
            for l in T.vectorized(v):
                lo[l] = zero
                hi[l] = zero
            for j in T.serial(nv):
                for l in T.vectorized(v):
                    lo[l] = T.min(lo[l], x[j * v + l])
                    hi[l] = T.max(hi[l], x[j * v + l])
            rng[0] = zero
            rng[1] = zero
            for l in T.serial(v):
                rng[0] = T.min(rng[0], lo[l])
                rng[1] = T.max(rng[1], hi[l])
            for j in T.serial(size - nv * v):
                rng[0] = T.min(rng[0], x[nv * v + j])
                rng[1] = T.max(rng[1], x[nv * v + j])
            xs[0] = (rng[1] - rng[0]) / T.float32(255.0)
            xz[0] = T.min(T.max(T.round(zero - rng[0] / xs[0]), zero), T.float32(255.0))
            for j in T.serial(nv):
                for l in T.vectorized(v):
                    xq[j * v + l] = T.Cast(qdt, T.min(T.max(T.round(x[j * v + l] / xs[0]) + xz[0], zero),
                                                      T.float32(255.0)) + shift)
            for j in T.serial(size - nv * v):
                xq[nv * v + j] = T.Cast(qdt, T.min(T.max(T.round(x[nv * v + j] / xs[0]) + xz[0], zero),
                                                   T.float32(255.0)) + shift)

    return dql


# ------------------------------------------------------------------ Relax ONNX frontend hook


def relax_converters(tvm_target: Any) -> dict[str, type]:
    """Converters for ``compressor::SparseQMatMul[Relu]`` and ``SparseDQMatMul`` (``compressor.sparse_ops``):
    ``X`` quantized with Relax ops (static: ``clip(round(X / x_scale) + x_zero_point)``) or by the
    ``dynamic_quantize`` kernel (once per input tensor), then ``call_tir`` of the int8 kernel for the target
    (the layer's R x 4 blocks must be the variant's height; the generic kernel takes any R)."""
    from tvm import relax
    from tvm.ir import expr as tvm_ir_expr
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from compressor.errors import TargetError
    from compressor.sparse_ops import DQMATMUL, QMATMUL_OPS

    variant = variant_for(tvm_target)

    def make(op: str) -> type:
        relu = op.endswith("Relu")
        dynamic = op == DQMATMUL

        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            consts = inputs[1:7] if dynamic else inputs[1:9]
            if len(consts) != (6 if dynamic else 8) or not all(isinstance(c, tvm_ir_expr.Constant) for c in consts):
                raise TargetError(f"compressor::{op}: every input but X must be an initializer")
            if dynamic:
                data, indices, indptr, w_scale, rowsum, bias = (c.value.numpy() for c in consts)
            else:
                data, indices, indptr, scale, corr, bias, xs, xz = (c.value.numpy() for c in consts)
            shape = [int(d) for d in x.ty.shape]
            k = shape[-1]
            m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            r = int(data.shape[1])
            n = (len(indptr) - 1) * r
            v = variant if BLOCK_ROWS.get(variant, r) == r else "generic"
            v = refine_variant(v, data)
            b = BSRInt8((n, k), r, data.astype(np.int8), indices.astype(np.int32), indptr.astype(np.int32),
                        np.ones(n, np.float32))
            prim = make_primfunc(m, (n, k), r, b.nnzb, tvm_target, relu, variant=v).without_attr("global_symbol")
            gv = bb.add_func(prim, f"bsr_int8_{r}x4_{v}" + ("_relu" if relu else ""))
            x2 = x if len(shape) == 2 else relax.op.reshape(x, (m, k))

            def call(xq, scale_, corr_):  # the kernel on this layer's arrays, back to X's leading dims
                wdata, widx = weight_arrays(b, v)
                args = [bb.normalize(xq), relax.const(wdata), relax.const(widx), relax.const(b.indptr),
                        scale_, corr_, relax.const(bias.astype(np.float32))]
                y = relax.call_tir(gv, args, relax.TensorType((m, n), "float32"))
                return y if len(shape) == 2 else relax.op.reshape(bb.normalize(y), (*shape[:-1], n))

            if dynamic:
                return dynamic_call(bb, call, x2, v, b, w_scale, rowsum, shape, m)
            sx, zx = float(np.asarray(xs).reshape(())), float(np.asarray(xz).reshape(()))
            # X is quantized in its zero point's type (uint8, or int8 as quantize.int8 does for aarch64) and
            # shifted by +-128 into the kernel's (int8 for sdot, else uint8); sum((x + shift) w) adds
            # shift * rowsum(W) to the accumulators, which the correction takes back
            zp_signed, k_signed = np.asarray(xz).dtype == np.int8, v in SIGNED_X
            shift = (128 if zp_signed and not k_signed else (-128 if k_signed and not zp_signed else 0))
            lo = (-128.0 if zp_signed else 0.0) + shift
            q = relax.op.add(relax.op.round(relax.op.divide(x2, relax.const(np.float32(sx)))),
                             relax.const(np.float32(zx + shift)))
            xq = relax.op.astype(relax.op.clip(q, lo, lo + 255), "int8" if k_signed else "uint8")
            corr = corr.astype(np.int64) + shift * b.row_sums().astype(np.int64)
            return call(xq, relax.const(scale.astype(np.float32)), relax.const(corr.astype(np.int32)))

        return type(f"Convert{op}", (OnnxOpConverter,), {"_impl_v1": classmethod(_impl_v1)})

    quantized: dict[tuple, tuple] = {}  # (id of X, signed) -> (X, xq, xs, xz): X quantized once per tensor

    def dynamic_call(bb, call, x2, v, b, w_scale, rowsum, shape, m):
        """DynamicQuantizeLinear (``make_dynamic_quantize``, once per input tensor: the q/k/v projections
        share it), then the kernel with the per-call scale and correction vectors."""
        f32 = lambda v_: relax.const(np.float32(v_))  # noqa: E731
        shift = -128 if v in SIGNED_X else 0
        key = (id(x2), bool(shift))
        if key not in quantized:
            size = m * int(shape[-1])
            prim = make_dynamic_quantize(size, tvm_target, bool(shift)).without_attr("global_symbol")
            qv = bb.add_func(prim, "dynamic_quantize")
            res = bb.normalize(relax.call_tir(qv, [relax.op.reshape(x2, (size,))], [
                relax.TensorType((size,), "int8" if shift else "uint8"), relax.TensorType((1,), "float32"),
                relax.TensorType((1,), "float32")]))
            xq = bb.normalize(relax.op.reshape(relax.TupleGetItem(res, 0), (m, int(shape[-1]))))
            quantized[key] = (x2, xq, bb.normalize(relax.TupleGetItem(res, 1)), bb.normalize(relax.TupleGetItem(res, 2)))
        _, xq, xs, xz = quantized[key]
        scale = relax.op.multiply(xs, relax.const(w_scale.astype(np.float32)))
        corr = relax.op.multiply(relax.op.astype(relax.op.add(xz, f32(shift)), "int32"),
                                 relax.const(rowsum.astype(np.int32)))
        return call(xq, bb.normalize(scale), bb.normalize(corr))

    if target_family(tvm_target) not in ("x86", "arm"):
        return {}
    return {op: make(op) for op in QMATMUL_OPS}
