"""Block-sparse (BSR) x dense kernels written in TIR for TVM 0.27 (which has no sparse ops).

Semantics (one op, every target)::

    Y[m, n] = act( sum_k X[m, k] * W[n, k] + bias[n] )        X: [M, K], W: [N, K], Y: [M, N]

``W`` (output features x input features, i.e. Gemm's ``transB=1`` layout, MatMul's weight
transposed) is stored in BSR form with blocks of ``R`` output rows x ``C`` input columns
(``"8x1"`` = 8 consecutive output channels sharing one input column; ``"1x1"`` =
unstructured), in scipy's convention:

* ``data``    float32 ``[nnzb, R, C]`` -- the stored blocks, block-row major,
* ``indices`` int32   ``[nnzb]``       -- block-column index of each stored block,
* ``indptr``  int32   ``[N/R + 1]``    -- blocks of block-row ``i`` are ``indptr[i]:indptr[i+1]``.

Explicit zero blocks are allowed: for ``R == 1`` patterns every block row is padded
(:func:`to_bsr` ``group``) to a multiple of ``G`` blocks so the "lanes" kernel can run
``G*C`` independent accumulators without a remainder loop.

Kernels (hand-scheduled low-level TIR marked ``tirx.is_scheduled`` -- the attribute TVM
0.27's dlight ``ApplyDefaultSchedule`` and meta_schedule's task extraction check (the old
``tir.is_scheduled`` spelling is ignored) -- so no Relax/dlight rule touches them again):

* ``rows``  (``R >= 2``): one task per block row (``T.parallel``); the ``R`` outputs of
  the block row are a SIMD vector (``T.vectorized(R)``), every stored element is one
  broadcast-FMA per batch row; batch rows are register-tiled in tiles of ``MT``.
* ``lanes`` (``R == 1``, small batch): ``L = G*C`` accumulators per output row, vectorized
  over the lanes (the unstructured case is a gather of ``x``), reduced at the end.
* ``xt``    (``R == 1``, batch >= 4): ``X`` is transposed once into a scratch ``[K, M]``
  buffer, then every stored element is an FMA over a contiguous batch vector.
* ``perm``  (``1x1`` on AVX-512, batch <= 8, ``N % 16 == 0``, ``K % 32 == 0``): permute-SELL.
  Rows in groups of 16 (one zmm of accumulators, lane = output row), columns in chunks of
  32 (two zmm of ``x``); for each (group, chunk) ``steps`` = the most non-zeros any of the
  16 rows has in the chunk, and every step is one ``vpermi2ps`` (16 ``x`` values picked by
  16 one-byte column offsets) + one FMA (:func:`pack_perm`). It replaces the scalar
  gather (16 loads + 15 inserts per 16 non-zeros, ~1 non-zero/cycle: shuffle-port bound)
  by one shuffle; ~2x the padding (Poisson row counts per chunk) but 1.5-2.2x faster
  than ``lanes`` at 80-95% (bench/sparse_kernels.md).
* CUDA: one thread block per block row, ``32`` threads stride over its blocks, each keeps
  ``R x M`` partial sums, reduced through shared memory.
* 1x1 convolution (:func:`make_conv1x1_primfunc`, NCHW, ``x [B, K, H*W]``): channel-major,
  no transpose; CPU tiles pixels (vectorized) x block rows, CUDA one thread per pixel.

Per-target knobs (:func:`kernel_params`): vector lanes (x86 AVX2 8 / AVX-512 16 floats,
NEON 4 x2 for latency hiding), batch tile. The same TIR runs on x86 and aarch64; LLVM
lowers ``T.vectorized`` to AVX/NEON.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ACTIVATIONS = ("none", "relu", "relu6")  # relu6 = min(max(v, 0), 6): a Clip fused by targets.conv_kernels
CUDA_THREADS = 32
# CPU scratch: TVM's LowerTVMBuiltin keeps small constant-size allocations on the stack only
# for storage scope "global" ("local" ones become TVMBackendAllocWorkspace calls per loop
# iteration, which LLVM cannot promote to registers: ~3x slower kernels).
CPU_STACK = "global"


# ------------------------------------------------------------------ BSR format


@dataclass(frozen=True)
class BSR:
    data: np.ndarray  # float32 [nnzb, R, C]
    indices: np.ndarray  # int32 [nnzb]
    indptr: np.ndarray  # int32 [N/R + 1]
    shape: tuple[int, int]  # (N, K) of the dense weight

    @property
    def block(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[2])

    @property
    def nnzb(self) -> int:
        return int(self.data.shape[0])

    def density(self) -> float:
        """Stored (incl. padding) elements / dense elements."""
        return self.data.size / float(self.shape[0] * self.shape[1])


def parse_block(pattern: str) -> tuple[int, int]:
    """``"unstructured"`` -> (1, 1); ``"8x1"`` -> (8, 1); ``"1x4"`` -> (1, 4)."""
    if pattern in ("unstructured", "1x1"):
        return 1, 1
    try:
        r, c = (int(v) for v in pattern.lower().split("x"))
    except ValueError:
        raise ValueError(f"not a block pattern: {pattern!r} (want 'unstructured' or 'RxC')") from None
    if r < 1 or c < 1:
        raise ValueError(f"block dims must be >= 1: {pattern!r}")
    return r, c


def block_mask(w_nk: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """[N/R, K/C] bool: which blocks hold a non-zero."""
    n, k = w_nk.shape
    r, c = block
    if n % r or k % c:
        raise ValueError(f"weight {w_nk.shape} not divisible by block {block}")
    return (w_nk.reshape(n // r, r, k // c, c) != 0).any(axis=(1, 3))


def to_bsr(w_nk: np.ndarray, block: tuple[int, int], group: int = 1) -> BSR:
    """Dense [N, K] -> BSR keeping every block with a non-zero; each block row padded with
    explicit zero blocks (on block columns not already stored, so no duplicates) to a
    multiple of ``group`` blocks."""
    w_nk = np.asarray(w_nk, dtype=np.float32)
    n, k = w_nk.shape
    r, c = block
    keep = block_mask(w_nk, block)
    nbr, nbc = keep.shape
    if group > 1:
        keep = keep.copy()
        for i in range(nbr):
            short = (-int(keep[i].sum())) % group
            if short:
                free = np.flatnonzero(~keep[i])[:short]
                keep[i, free] = True  # zero blocks (w is zero there)
    bi, bj = np.nonzero(keep)
    blocks = w_nk.reshape(nbr, r, nbc, c).transpose(0, 2, 1, 3)[bi, bj]
    indptr = np.zeros(nbr + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return BSR(np.ascontiguousarray(blocks, dtype=np.float32), bj.astype(np.int32), indptr, (n, k))


def from_bsr(b: BSR) -> np.ndarray:
    n, k = b.shape
    r, c = b.block
    out = np.zeros((n // r, k // c, r, c), dtype=np.float32)
    rows = np.repeat(np.arange(n // r), np.diff(b.indptr))
    np.add.at(out, (rows, b.indices), b.data)
    return out.transpose(0, 2, 1, 3).reshape(n, k)


CANDIDATE_BLOCKS: tuple[tuple[int, int], ...] = ((16, 1), (8, 1), (4, 1), (1, 4), (1, 1))


def detect_block(w_nk: np.ndarray, candidates=CANDIDATE_BLOCKS) -> tuple[int, int]:
    """Largest candidate block shape under which the weight's zeros are exactly block
    structured (no zero stored inside a kept block beyond what chance gives: we require
    that storing blocks adds < 2% of the non-zero count in explicit zeros)."""
    nz = int(np.count_nonzero(w_nk))
    for r, c in candidates:
        if w_nk.shape[0] % r or w_nk.shape[1] % c:
            continue
        stored = int(block_mask(w_nk, (r, c)).sum()) * r * c
        if stored <= nz * 1.02 + r * c:
            return r, c
    return 1, 1


def reference(x: np.ndarray, b: BSR, bias: np.ndarray | None = None, activation: str = "none") -> np.ndarray:
    """numpy oracle (float64 accumulate)."""
    y = x.astype(np.float64) @ from_bsr(b).astype(np.float64).T
    if bias is not None:
        y = y + bias
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not in {ACTIVATIONS}")
    if activation in ("relu", "relu6"):
        y = np.maximum(y, 0)
    if activation == "relu6":
        y = np.minimum(y, 6)
    return y.astype(np.float32)


# ------------------------------------------------------------------ kernel choice


@dataclass(frozen=True)
class KernelParams:
    variant: str  # rows | lanes | xt | perm | cuda
    lanes: int  # fp32 lanes the lanes-kernel accumulates in (G*C)
    mtile: int  # batch rows per register tile (rows kernel)
    unroll: int = 1  # independent accumulator sets (rows kernel)
    vector: bool = True  # lanes kernel: SIMD lanes (True) or unrolled scalar accumulators


def target_family(target: Any) -> str:
    """'x86' | 'arm' | 'cuda' | 'cpu' from a tvm Target / dict / family string."""
    if isinstance(target, str):
        return target
    if isinstance(target, dict):
        kind, triple = target.get("kind"), str(target.get("mtriple", ""))
    else:
        kind, triple = target.kind.name, str(target.attrs.get("mtriple", ""))
    if kind == "cuda":
        return "cuda"
    if triple.startswith("aarch64") or triple.startswith("arm"):
        return "arm"
    return "x86"


@functools.lru_cache(maxsize=64)
def _llvm_features(key: str) -> frozenset[str]:
    import tvm
    from tvm.target import codegen

    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(json.loads(key))))


def llvm_features(target: Any) -> frozenset[str]:
    """The CPU features LLVM will generate code for: ``mcpu``'s defaults with ``mattr``'s ``+f``/``-f``
    applied, resolved by LLVM itself (``llvm_get_cpu_features``). A substring test on the target's
    strings is wrong: ``-avx512f`` in a Zen 3 host's feature list reads as AVX-512, and 16-lane
    kernels with AVX-512 intrinsics then abort LLVM for a CPU that has none (issue 16)."""
    if isinstance(target, str):
        return frozenset()
    if isinstance(target, dict):
        d = {k: v for k, v in target.items() if k in ("kind", "mtriple", "mcpu", "mattr")}
    else:
        d = {"kind": target.kind.name}
        for k in ("mtriple", "mcpu", "mattr"):
            v = target.attrs.get(k)
            if v is not None and str(v) != "":
                d[k] = [str(x) for x in v] if k == "mattr" else str(v)
    if d.get("kind") != "llvm":
        return frozenset()
    return _llvm_features(json.dumps(d, sort_keys=True))


def vector_floats(target: Any) -> int:
    """fp32 lanes of the widest SIMD register the target code may use (16 only where LLVM
    resolves ``avx512f`` for the target; a bare family string means the 8-lane baseline)."""
    fam = target_family(target)
    if fam == "arm":
        return 4
    return 16 if "avx512f" in llvm_features(target) else 8


def lanes_group(block: tuple[int, int], target: Any) -> int:
    """Blocks per padded group for R == 1 patterns (what :func:`to_bsr` ``group`` wants).
    Unstructured: one SIMD register of accumulators on x86, two on NEON (4 lanes: hides the
    FMA latency); 1xC, C > 1: one block (C contiguous lanes) per step measured fastest
    (bench/sparse_kernels.py). x86 (Zen 4, AVX-512, batch 1, 90%): 16 lanes ran 4-17% faster
    than 32 (3072x1024: 44.8 vs 53.8 us; 1760^2: 42.4 vs 46.8 us; 4096^2: 228 vs 236 us) --
    the rows are padded to a multiple of the lanes (17% padding at 102 non-zeros per row with
    32 lanes), and the x gather, not the FMA chain, bounds the loop (~1 non-zero per cycle)."""
    r, c = block
    if r != 1 or c > 1:
        return 1
    return vector_floats(target) * (2 if target_family(target) == "arm" else 1)


PERM_ROWS = 16  # output rows per permute-SELL group: one zmm of fp32 accumulators
PERM_CHUNK = 32  # input columns per chunk: the two zmm of x one vpermi2ps selects from
# stored elements x batch rows from which a CPU GEMM kernel forks the pool; below, one thread
# (fork + join ~1.3 us). perm: 128x128 at 90%, batch 1: 0.55 us serial, 1.51 us parallel, dense
# 0.97 us; crossover ~50 K: 256^2 90% batch 4 (54 K) 2.24 vs 2.87 us, 512^2 90% batch 1 (52 K)
# 3.52 vs 3.21 us. The others (same sweep, serial vs parallel): xt 30 K serial 4.35 vs 8.07 us,
# 82 K 13.8 vs 12.6 us; rows (8x1) 79 K at batch 16 2.19 vs 3.43 us, 105 K 3.06 vs 2.67 us;
# lanes (AVX2) 7.4 K even, 20 K 5.66 vs 4.18 us.
PARALLEL_MIN_STORED = {"perm": 1 << 16, "xt": 1 << 16, "rows": 90_000, "lanes": 1 << 13}
PERM_MAX_M = 9  # batch rows below which perm beats xt (m = 8: 89 vs 142 us at 1760^2 90%; m = 16 spills: 475 vs 172)


def task_loop_for(variant: str, stored_macs: int):
    """``T.parallel`` or ``T.serial`` for a kernel's outer task loop: serial below the
    variant's ``PARALLEL_MIN_STORED`` stored elements x batch rows."""
    from tvm.script import tirx as T

    return T.parallel if stored_macs >= PARALLEL_MIN_STORED.get(variant, 0) else T.serial


def perm_eligible(block: tuple[int, int], m: int, target: Any, n: int | None, k: int | None) -> bool:
    """The permute-SELL kernel applies: unstructured, batch <= 8, an x86 target with AVX-512
    (the ``vpermi2ps`` intrinsic), ``N``/``K`` multiples of the group/chunk."""
    return (block == (1, 1) and m < PERM_MAX_M and n is not None and k is not None and n % PERM_ROWS == 0
            and k % PERM_CHUNK == 0 and target_family(target) == "x86" and vector_floats(target) == 16)


def kernel_params(block: tuple[int, int], m: int, target: Any, n: int | None = None,
                  k: int | None = None) -> KernelParams:
    """Kernel variant and knobs, picked from measurements on x86 (AMD EPYC Zen 4, AVX-512,
    2 cores, N=K=4096, 90%, batch 1; /tmp sweeps recorded in bench/sparse_kernels.md):
    rows-kernel unroll 8/4/2 for R = 4/8/16 beat unroll 1 by 1.3-2.5x. ``n``/``k`` (the
    weight's shape) enable the ``perm`` kernel where :func:`perm_eligible`."""
    r, c = block
    fam = target_family(target)
    if fam == "cuda":
        return KernelParams("cuda", 1, 1)
    if perm_eligible(block, m, target, n, k):
        return KernelParams("perm", PERM_ROWS, 1)
    if r >= 2:
        cap = 8 if r <= 8 else 4
        mt = max(d for d in range(1, min(cap, m) + 1) if m % d == 0)
        u = max(1, min(8, 32 // (r * mt)))
        return KernelParams("rows", r, mt, u)
    if m >= 4:
        return KernelParams("xt", 1, 1)
    return KernelParams("lanes", lanes_group(block, target) * c, 1)


# ------------------------------------------------------------------ TIR


def make_primfunc(
    m: int,
    n: int,
    k: int,
    block: tuple[int, int],
    nnzb: int,
    activation: str = "none",
    target: Any = "x86",
    params: KernelParams | None = None,
):
    """PrimFunc ``f(x[M,K], data[nnzb,C,R] (kernel layout, see :func:`kernel_data`),
    indices[nnzb], indptr[N/R+1], bias[N], y[M,N])``; the ``perm`` variant takes
    :func:`pack_perm`'s arrays instead (``nnzb`` = their step count), see :func:`kernel_weights`."""
    from tvm.script import tirx as T

    r, c = block
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not in {ACTIVATIONS}")
    if n % r or k % c:
        raise ValueError(f"weight [{n}, {k}] not divisible by block {block}")
    p = params or kernel_params(block, m, target)
    nbr = n // r
    relu = activation in ("relu", "relu6")
    zero = T.float32(0)

    def act(v):
        v = T.max(v, zero) if relu else v
        return T.min(v, T.float32(6)) if activation == "relu6" else v

    nnzb_ = max(nnzb, 1)  # a buffer may not be empty; indptr keeps the loops at 0 trips
    # stored elements: perm's nnzb counts steps of PERM_ROWS lanes, the others blocks of R x C
    task_loop = task_loop_for(p.variant, nnzb * (PERM_ROWS if p.variant == "perm" else r * c) * m)

    if p.variant == "rows":
        mt = p.mtile
        u = p.unroll
        assert m % mt == 0

        @T.prim_func
        def rows(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnzb_, c, r), "float32"),
                 indices: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
                 bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            for i in task_loop(nbr):
                for mo in T.serial(m // mt):
                    # u independent accumulator sets: u FMA chains in flight per batch row
                    acc = T.decl_buffer((u, mt, r), "float32", scope=CPU_STACK)
                    for q in T.unroll(u):
                        for mi in T.unroll(mt):
                            for rr in T.vectorized(r):
                                acc[q, mi, rr] = zero
                    for jg in T.serial((indptr[i + 1] - indptr[i]) // u):
                        for q in T.unroll(u):
                            for cc in T.unroll(c):
                                for mi in T.unroll(mt):
                                    for rr in T.vectorized(r):
                                        acc[q, mi, rr] = acc[q, mi, rr] + data[indptr[i] + jg * u + q, cc, rr] * x[
                                            mo * mt + mi, indices[indptr[i] + jg * u + q] * c + cc]
                    for j in T.serial(indptr[i] + (indptr[i + 1] - indptr[i]) // u * u, indptr[i + 1]):
                        for cc in T.unroll(c):
                            for mi in T.unroll(mt):
                                for rr in T.vectorized(r):
                                    acc[0, mi, rr] = acc[0, mi, rr] + data[j, cc, rr] * x[mo * mt + mi, indices[j] * c + cc]
                    for q in T.unroll(u - 1):
                        for mi in T.unroll(mt):
                            for rr in T.vectorized(r):
                                acc[0, mi, rr] = acc[0, mi, rr] + acc[q + 1, mi, rr]
                    for mi in T.unroll(mt):
                        for rr in T.vectorized(r):
                            y[mo * mt + mi, i * r + rr] = act(acc[0, mi, rr] + bias[i * r + rr])

        return rows

    if p.variant == "lanes":
        lanes = p.lanes
        g = lanes // c
        assert g * c == lanes
        # gathers (c == 1) vectorize badly (scalar loads + inserts, or microcoded vgather):
        # independent scalar accumulators are faster there
        lane_loop = T.vectorized if p.vector else T.unroll

        @T.prim_func
        def lanes_fn(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnzb_, c, r), "float32"),
                     indices: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
                     bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            for i in task_loop(nbr):
                acc = T.decl_buffer((m, lanes), "float32", scope=CPU_STACK)
                for mi in T.unroll(m):
                    for ln in T.vectorized(lanes):
                        acc[mi, ln] = zero
                for jg in T.serial((indptr[i + 1] - indptr[i]) // g):
                    for mi in T.unroll(m):
                        for ln in lane_loop(lanes):
                            acc[mi, ln] = acc[mi, ln] + data[indptr[i] + jg * g + ln // c, ln % c, 0] * x[
                                mi, indices[indptr[i] + jg * g + ln // c] * c + ln % c]
                for mi in T.serial(m):
                    s = T.decl_buffer((1,), "float32", scope=CPU_STACK)
                    s[0] = bias[i]
                    for ln in T.serial(lanes):
                        s[0] = s[0] + acc[mi, ln]
                    # remainder (rows not padded to a multiple of g blocks)
                    for j in T.serial(indptr[i] + (indptr[i + 1] - indptr[i]) // g * g, indptr[i + 1]):
                        for cc in T.serial(c):
                            s[0] = s[0] + data[j, cc, 0] * x[mi, indices[j] * c + cc]
                    y[mi, i] = act(s[0])

        return lanes_fn

    if p.variant == "perm":
        v, ch = PERM_ROWS, PERM_CHUNK
        if not perm_eligible(block, m, target, n, k):
            raise ValueError(f"perm kernel needs 1x1 blocks, batch < {PERM_MAX_M}, AVX-512, N % {v} == 0 and "
                             f"K % {ch} == 0 (got {block}, m={m}, [{n}, {k}])")
        ng, nc = n // v, k // ch
        vf, vi = f"float32x{v}", f"int32x{v}"

        @T.prim_func
        def perm_fn(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnzb_, v), "float32"),
                    offs: T.Buffer((nnzb_, v), "uint8"), steps: T.Buffer((ng * nc + 1,), "int32"),
                    bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            for g in task_loop(ng):
                acc = T.decl_buffer((m, v), "float32", scope=CPU_STACK)
                for mi in T.unroll(m):
                    for ln in T.vectorized(v):
                        acc[mi, ln] = bias[g * v + ln]
                for cc in T.serial(nc):
                    for st in T.serial(steps[g * nc + cc + 1] - steps[g * nc + cc]):
                        for mi in T.unroll(m):
                            acc[mi, T.Ramp(0, 1, v)] = acc[mi, T.Ramp(0, 1, v)] + data[
                                steps[g * nc + cc] + st, T.Ramp(0, 1, v)] * T.call_llvm_pure_intrin(
                                vf, "llvm.x86.avx512.vpermi2var.ps.512", x[mi, T.Ramp(cc * ch, 1, v)],
                                T.Cast(vi, offs[steps[g * nc + cc] + st, T.Ramp(0, 1, v)]),
                                x[mi, T.Ramp(cc * ch + v, 1, v)])
                for mi in T.serial(m):
                    for ln in T.vectorized(v):
                        y[mi, g * v + ln] = act(acc[mi, ln])

        return perm_fn

    if p.variant == "xt":

        @T.prim_func
        def xt_fn(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnzb_, c, r), "float32"),
                  indices: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
                  bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            xt = T.decl_buffer((k, m), "float32")
            for kk in task_loop(k):
                for mi in T.serial(m):
                    xt[kk, mi] = x[mi, kk]
            for i in task_loop(nbr):
                acc = T.decl_buffer((m,), "float32", scope=CPU_STACK)
                for mi in T.vectorized(m):
                    acc[mi] = bias[i]
                for j in T.serial(indptr[i], indptr[i + 1]):
                    for cc in T.unroll(c):
                        for mi in T.vectorized(m):
                            acc[mi] = acc[mi] + data[j, cc, 0] * xt[indices[j] * c + cc, mi]
                for mi in T.serial(m):
                    y[mi, i] = act(acc[mi])

        return xt_fn

    if p.variant == "cuda":
        nt = CUDA_THREADS
        rm = r * m

        @T.prim_func
        def cuda_fn(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnzb_, c, r), "float32"),
                    indices: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
                    bias: T.Buffer((n,), "float32"), y: T.Buffer((m, n), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            bx = T.launch_thread("blockIdx.x", nbr)
            tx = T.launch_thread("threadIdx.x", nt)
            acc = T.decl_buffer((rm,), "float32", scope="local")
            red = T.decl_buffer((nt, rm), "float32", scope="shared")
            for q in T.serial(rm):
                acc[q] = zero
            for jj in T.serial((indptr[bx + 1] - indptr[bx] + nt - 1) // nt):
                if indptr[bx] + jj * nt + tx < indptr[bx + 1]:
                    for cc in T.serial(c):
                        for mi in T.serial(m):
                            for rr in T.serial(r):
                                acc[mi * r + rr] = acc[mi * r + rr] + data[indptr[bx] + jj * nt + tx, cc, rr] * x[
                                    mi, indices[indptr[bx] + jj * nt + tx] * c + cc]
            for q in T.serial(rm):
                red[tx, q] = acc[q]
            T.tvm_storage_sync("shared")
            for qo in T.serial((rm + nt - 1) // nt):
                if qo * nt + tx < rm:
                    s = T.decl_buffer((1,), "float32", scope="local")
                    s[0] = zero
                    for t in T.serial(nt):
                        s[0] = s[0] + red[t, qo * nt + tx]
                    y[(qo * nt + tx) // r, bx * r + (qo * nt + tx) % r] = act(s[0] + bias[bx * r + (qo * nt + tx) % r])

        return cuda_fn

    raise ValueError(f"unknown kernel variant {p.variant!r}")


# ------------------------------------------------------------------ 1x1 convolution (NCHW)

CONV_ACC_FLOATS = 128  # r * mtile accumulators per task: 8 AVX-512 / 16 AVX2 registers' worth
CONV_MAX_MTILE = 64
CUDA_CONV_THREADS = 128
CONV_PARALLEL_MIN_MACS = 1_100_000  # stored MACs below which the CPU conv kernel is serial (as targets.conv_kernels)
CONV_SPLIT_MAX_ACC = 32  # r * mtile up to this: two accumulator sets over alternate blocks (64 px tiles: no gain)
CONV_ROW_OUTER_MAX_M = 1024  # serial kernels on up to this many pixels: pixel tiles of a block row back to back


CONV_TILE_OVERHEAD = 32  # per-tile cost of the channel-major kernel (bias, store, the sparse row loop) in lanes


def conv_mtile(m: int, r: int, v: int = 16) -> int:
    """Pixels per register tile of the channel-major kernel: the SIMD width ``v`` times a power of
    two, up to ``min(64, 128 // r)``, minimising ``tiles * (mtile + CONV_TILE_OVERHEAD)`` (computed
    lanes plus per-tile overhead; ties: the wider), or all ``m`` pixels when ``m < v``. Never an
    odd width nor a non-power-of-two count of vectors: LLVM scalarises a loop-carried
    ``<49 x float>`` accumulator (the 7x7 layers ran 2x slower than two overlapping 32-pixel tiles),
    and ``<28 x float>`` / ``<56 x float>`` too (7 or 14 NEON / AVX2 vectors: on aarch64 the
    unstructured 256-channel layer on 14x14 px executed 3.2 instructions per multiply-add, 0.3x of
    the dense kernel; bench/cost_model_arm.md). Pixel tiles start at
    ``min(t * mtile, M - mtile)``: the last tile overlaps its neighbour instead of needing a
    remainder loop (the overlapping pixels are computed twice with identical results)."""
    cap = max(1, min(CONV_MAX_MTILE, CONV_ACC_FLOATS // r))
    cands = [v << j for j in range(8) if (v << j) <= min(m, cap)]
    if not cands:
        return max(1, min(m, cap))
    return min(cands, key=lambda t: (-(-m // t) * (t + CONV_TILE_OVERHEAD), -t))


def make_conv1x1_primfunc(
    bsz: int,
    m: int,
    n: int,
    k: int,
    block: tuple[int, int],
    nnzb: int,
    activation: str = "none",
    target: Any = "x86",
    hw: tuple[int, int] | None = None,
):
    """Channel-major SpMM for a 1x1 convolution (stride 1, no padding, group 1, NCHW):
    ``f(x[B,K,M], data[nnzb,C,R], indices, indptr, bias[N], y[B,N,M])`` computing
    ``y[b, o, p] = act(sum_i W[o, i] x[b, i, p] + bias[o])`` with ``M = H*W`` pixels.
    ``hw = (H, W)`` (CPU): ``x``/``y`` are the 4-D NCHW tensors, viewed as ``[B, C, M]``
    inside (no Relax reshapes around the call: each is one VM instruction).

    No transposes: the input channel rows ``x[b, i, :]`` are contiguous over pixels, so
    every stored weight element is one broadcast-FMA over a pixel vector. CPU ("cm"):
    one task per (batch, pixel tile, block row) (pixel tile outer, so the tasks running
    together share the ``K x mtile`` slice of ``x`` in cache; serial kernels on at most
    ``CONV_ROW_OUTER_MAX_M`` pixels: block row outer), ``R x mtile`` accumulators
    vectorized over pixels (:func:`conv_mtile`). CUDA: one thread per pixel (coalesced loads of ``x`` and
    stores of ``y`` across the warp), ``R`` accumulators per thread, one thread block
    row-range per block row."""
    from tvm.script import tirx as T

    r, c = block
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} not in {ACTIVATIONS}")
    if n % r or k % c:
        raise ValueError(f"weight [{n}, {k}] not divisible by block {block}")
    nbr = n // r
    relu = activation in ("relu", "relu6")
    zero = T.float32(0)
    nnzb_ = max(nnzb, 1)

    def act(v):
        v = T.max(v, zero) if relu else v
        return T.min(v, T.float32(6)) if activation == "relu6" else v

    if target_family(target) == "cuda":
        nt = CUDA_CONV_THREADS
        npt = (m + nt - 1) // nt

        @T.prim_func
        def conv_cuda(x: T.Buffer((bsz, k, m), "float32"), data: T.Buffer((nnzb_, c, r), "float32"),
                      indices: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
                      bias: T.Buffer((n,), "float32"), y: T.Buffer((bsz, n, m), "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            bx = T.launch_thread("blockIdx.x", bsz * nbr * npt)
            tx = T.launch_thread("threadIdx.x", nt)
            acc = T.decl_buffer((r,), "float32", scope="local")
            if bx % npt * nt + tx < m:
                for rr in T.unroll(r):
                    acc[rr] = bias[bx // npt % nbr * r + rr]
                for j in T.serial(indptr[bx // npt % nbr], indptr[bx // npt % nbr + 1]):
                    for cc in T.unroll(c):
                        for rr in T.unroll(r):
                            acc[rr] = acc[rr] + data[j, cc, rr] * x[bx // (npt * nbr), indices[j] * c + cc,
                                                                     bx % npt * nt + tx]
                for rr in T.unroll(r):
                    y[bx // (npt * nbr), bx // npt % nbr * r + rr, bx % npt * nt + tx] = act(acc[rr])

        return conv_cuda

    mt = conv_mtile(m, r, vector_floats(target))
    nmt = (m + mt - 1) // mt
    xs, ys = ((bsz, k, *hw), (bsz, n, *hw)) if hw else ((bsz, k, m), (bsz, n, m))
    # tiny layers run on one thread: waking the pool costs more than it saves there
    par = T.parallel if bsz * m * max(nnzb, 1) * r * c >= CONV_PARALLEL_MIN_MACS else T.serial
    # task order: block row inner (the tasks running together share the K x mtile slice of x, which
    # stays in L1), or, serial on few pixels, pixel tile inner: the same sparse row loop, trip
    # count included, repeats back to back (fewer branch mispredictions on short rows), while the
    # x rows it reads (M floats each) are re-read from L2 per block row. 90 %, unstructured:
    # 16 -> 64 and 64 -> 16 channels at 32x32 px 7.5 -> 5.2 and 5.6 -> 4.0 us; 16 -> 96 at 56x56: 25 -> 31 us
    row_outer = par is T.serial and m <= CONV_ROW_OUTER_MAX_M
    d_r, d_p = (nmt, 1) if row_outer else (1, nbr)

    if r * mt <= CONV_SPLIT_MAX_ACC:
        # two accumulator sets over alternate stored blocks: with few accumulator vectors one
        # chain of dependent FMAs per vector is latency-bound (unstructured, 4x4 px: 960 -> 320
        # channels 21.7 -> 15.5 us, 160 -> 960 9.5 -> 8.8 us)
        @T.prim_func
        def conv_cm2(x_: T.Buffer(xs, "float32"), data: T.Buffer((nnzb_, c, r), "float32"),
                     indices: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
                     bias: T.Buffer((n,), "float32"), y_: T.Buffer(ys, "float32")):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            x = T.decl_buffer((bsz, k, m), "float32", data=x_.data)
            y = T.decl_buffer((bsz, n, m), "float32", data=y_.data)
            for t in par(bsz * nmt * nbr):
                acc = T.decl_buffer((r, mt), "float32", scope=CPU_STACK)
                acc2 = T.decl_buffer((r, mt), "float32", scope=CPU_STACK)
                for rr in T.unroll(r):
                    for mi in T.vectorized(mt):
                        acc[rr, mi] = bias[t // d_r % nbr * r + rr]
                        acc2[rr, mi] = zero
                for jj in T.serial((indptr[t // d_r % nbr + 1] - indptr[t // d_r % nbr]) // 2):
                    for cc in T.unroll(c):
                        for rr in T.unroll(r):
                            for mi in T.vectorized(mt):
                                acc[rr, mi] = acc[rr, mi] + data[indptr[t // d_r % nbr] + jj * 2, cc, rr] * x[
                                    t // (nmt * nbr), indices[indptr[t // d_r % nbr] + jj * 2] * c + cc,
                                    T.min(t // d_p % nmt * mt, m - mt) + mi]
                                acc2[rr, mi] = acc2[rr, mi] + data[indptr[t // d_r % nbr] + jj * 2 + 1, cc, rr] * x[
                                    t // (nmt * nbr), indices[indptr[t // d_r % nbr] + jj * 2 + 1] * c + cc,
                                    T.min(t // d_p % nmt * mt, m - mt) + mi]
                if (indptr[t // d_r % nbr + 1] - indptr[t // d_r % nbr]) % 2 == 1:
                    for cc in T.unroll(c):
                        for rr in T.unroll(r):
                            for mi in T.vectorized(mt):
                                acc[rr, mi] = acc[rr, mi] + data[indptr[t // d_r % nbr + 1] - 1, cc, rr] * x[
                                    t // (nmt * nbr), indices[indptr[t // d_r % nbr + 1] - 1] * c + cc,
                                    T.min(t // d_p % nmt * mt, m - mt) + mi]
                for rr in T.unroll(r):
                    for mi in T.vectorized(mt):
                        y[t // (nmt * nbr), t // d_r % nbr * r + rr, T.min(t // d_p % nmt * mt, m - mt) + mi] = act(
                            acc[rr, mi] + acc2[rr, mi])

        return conv_cm2.with_attr("op_pattern", 8) if hw else conv_cm2  # 8: relax kOpaque (never fused)

    @T.prim_func
    def conv_cm(x_: T.Buffer(xs, "float32"), data: T.Buffer((nnzb_, c, r), "float32"),
                indices: T.Buffer((nnzb_,), "int32"), indptr: T.Buffer((nbr + 1,), "int32"),
                bias: T.Buffer((n,), "float32"), y_: T.Buffer(ys, "float32")):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        x = T.decl_buffer((bsz, k, m), "float32", data=x_.data)
        y = T.decl_buffer((bsz, n, m), "float32", data=y_.data)
        for t in par(bsz * nmt * nbr):
            acc = T.decl_buffer((r, mt), "float32", scope=CPU_STACK)
            for rr in T.unroll(r):
                for mi in T.vectorized(mt):
                    acc[rr, mi] = bias[t // d_r % nbr * r + rr]
            for j in T.serial(indptr[t // d_r % nbr], indptr[t // d_r % nbr + 1]):
                for cc in T.unroll(c):
                    for rr in T.unroll(r):
                        for mi in T.vectorized(mt):
                            acc[rr, mi] = acc[rr, mi] + data[j, cc, rr] * x[
                                t // (nmt * nbr), indices[j] * c + cc, T.min(t // d_p % nmt * mt, m - mt) + mi]
            for rr in T.unroll(r):
                for mi in T.vectorized(mt):
                    y[t // (nmt * nbr), t // d_r % nbr * r + rr, T.min(t // d_p % nmt * mt, m - mt) + mi] = act(acc[rr, mi])

    return conv_cm.with_attr("op_pattern", 8) if hw else conv_cm  # 8: relax kOpaque (never fused)


def build_conv1x1(bsz: int, m: int, b: BSR, activation: str, tvm_target: Any):
    """Compile a standalone conv1x1 kernel: ``f(x[B,K,M], data, indices, indptr, bias, y[B,N,M])``."""
    import tvm

    tgt = tvm_target if isinstance(tvm_target, tvm.target.Target) else tvm.target.Target(tvm_target)
    f = make_conv1x1_primfunc(bsz, m, b.shape[0], b.shape[1], b.block, b.nnzb, activation, tgt)
    f = f.with_attr("global_symbol", "bsr_conv1x1")
    mod = tvm.IRModule({"bsr_conv1x1": f})
    with tgt:
        lib = tvm.compile(mod, target=tgt)
    return lib["bsr_conv1x1"]


def reference_conv1x1(x: np.ndarray, b: BSR, bias: np.ndarray | None = None, activation: str = "none") -> np.ndarray:
    """numpy oracle for x [B, K, M] -> y [B, N, M] (float64 accumulate)."""
    y = np.einsum("nk,bkm->bnm", from_bsr(b).astype(np.float64), x.astype(np.float64))
    if bias is not None:
        y = y + np.asarray(bias, np.float64)[None, :, None]
    if activation == "relu":
        y = np.maximum(y, 0)
    return y.astype(np.float32)


def kernel_data(b: BSR) -> np.ndarray:
    """The kernels' data layout: [nnzb, C, R] (R contiguous = the SIMD axis), never empty."""
    d = np.ascontiguousarray(b.data.transpose(0, 2, 1))
    if d.shape[0] == 0:
        d = np.zeros((1, *d.shape[1:]), dtype=np.float32)
    return d


def kernel_indices(b: BSR) -> np.ndarray:
    return b.indices if b.nnzb else np.zeros(1, dtype=np.int32)


def pack_perm(b: BSR, rows: int = PERM_ROWS, chunk: int = PERM_CHUNK) -> list[np.ndarray]:
    """1x1 BSR -> the ``perm`` kernel's weight arrays ``[data float32 [S, rows], offs uint8
    [S, rows], steps int32 [G*C + 1]]``: for row group ``g`` and column chunk ``c`` the steps
    ``steps[g*C+c]:steps[g*C+c+1]``; step ``s`` lane ``r`` holds the next non-zero of row
    ``g*rows+r`` in that chunk (value, column offset in the chunk), or 0 / offset 0 once
    the row has none left. Stored zeros (e.g. :func:`to_bsr` group padding) are dropped."""
    n, k = b.shape
    if b.block != (1, 1) or n % rows or k % chunk:
        raise ValueError(f"pack_perm: 1x1 blocks with N % {rows} == 0 and K % {chunk} == 0 "
                         f"needed (got {b.block}, [{n}, {k}])")
    ng, nc = n // rows, k // chunk
    row = np.repeat(np.arange(n), np.diff(b.indptr))
    val = b.data.reshape(-1)
    keep = val != 0
    row, col, val = row[keep], b.indices[keep].astype(np.int64), val[keep]
    order = np.lexsort((col, row))  # row-major, columns ascending (BSR rows may be unsorted)
    row, col, val = row[order], col[order], val[order]
    cell = row * nc + col // chunk  # (row, chunk) runs are contiguous in this order
    start = np.flatnonzero(np.r_[True, cell[1:] != cell[:-1]]) if len(cell) else np.zeros(0, np.int64)
    rank = np.arange(len(cell)) - np.repeat(start, np.diff(np.r_[start, len(cell)]))
    counts = np.zeros((ng, rows, nc), np.int64)
    np.add.at(counts, (row // rows, row % rows, col // chunk), 1)
    nsteps = counts.max(axis=1).reshape(-1)  # [G*C]
    steps = np.zeros(ng * nc + 1, np.int32)
    np.cumsum(nsteps, out=steps[1:])
    total = max(int(steps[-1]), 1)
    data = np.zeros((total, rows), np.float32)
    offs = np.zeros((total, rows), np.uint8)
    slot = steps[(row // rows) * nc + col // chunk] + rank
    data[slot, row % rows] = val
    offs[slot, row % rows] = col % chunk
    return [data, offs, steps]


def perm_expected_slots(n: int, k: int, density: float, rows: int = PERM_ROWS, chunk: int = PERM_CHUNK) -> float:
    """Expected stored elements (steps x lanes) of :func:`pack_perm` for a random ``[n, k]``
    weight of the given non-zero ``density``: per (group, chunk) the maximum of ``rows``
    Binomial(``chunk``, density) counts, E[max] = sum_t 1 - F(t)^rows."""
    from math import comb

    d = min(max(density, 0.0), 1.0)
    cdf, e_max = 0.0, 0.0
    for t in range(chunk):
        cdf += comb(chunk, t) * d ** t * (1 - d) ** (chunk - t)
        e_max += 1.0 - min(cdf, 1.0) ** rows
    return (n // rows) * (k // chunk) * e_max * rows


def kernel_weights(b: BSR, params: KernelParams) -> list[np.ndarray]:
    """The kernel's three weight arguments (after ``x``): ``data, indices, indptr`` in the
    kernel layout, or :func:`pack_perm`'s arrays for the ``perm`` variant. ``len(...[0])``
    is the ``nnzb`` :func:`make_primfunc` wants."""
    if params.variant == "perm":
        return pack_perm(b)
    return [kernel_data(b), kernel_indices(b), b.indptr]


def kernel_args(x: np.ndarray, b: BSR, bias: np.ndarray | None, params: KernelParams | None = None) -> list[np.ndarray]:
    """``x, *kernel_weights, bias`` (``params``: the kernel's, default the ``lanes``/``xt``/
    ``rows`` choice without ``perm``; pass the ``params`` :func:`build` compiled with)."""
    n = b.shape[0]
    bias = np.zeros(n, np.float32) if bias is None else np.asarray(bias, np.float32)
    p = params or KernelParams("lanes", 1, 1)
    return [np.ascontiguousarray(x, np.float32), *kernel_weights(b, p), bias]


def build(m: int, b: BSR, activation: str, tvm_target: Any, params: KernelParams | None = None):
    """Compile a standalone kernel: returns the tvm runtime function ``f(*kernel_args, y)``
    (``params`` default: :func:`kernel_params` without ``perm``, the layout
    :func:`kernel_args` gives by default)."""
    import tvm

    tgt = tvm_target if isinstance(tvm_target, tvm.target.Target) else tvm.target.Target(tvm_target)
    p = params or kernel_params(b.block, m, tgt)
    f = make_primfunc(m, b.shape[0], b.shape[1], b.block, len(kernel_weights(b, p)[0]), activation, tgt, p)
    f = f.with_attr("global_symbol", "bsr_kernel")
    mod = tvm.IRModule({"bsr_kernel": f})
    with tgt:
        lib = tvm.compile(mod, target=tgt)
    return lib["bsr_kernel"]


# ------------------------------------------------------------------ Relax ONNX frontend hook

from compressor.sparse_ops import CONV_OPS, MATMUL_OPS as SPARSE_OPS  # noqa: E402  (domain "compressor")


def relax_converters(tvm_target: Any, fused: dict[str, str] | None = None) -> dict[str, type]:
    """Converters for the Relax ONNX frontend's convert map:

    * ``compressor::SparseMatMul[Relu]`` -> ``call_tir`` of the BSR kernel specialised for
      the layer (shapes, block, nnz, target; the CUDA kernel for cuda targets);
    * ``compressor::SparseConv1x1[Relu]`` (NCHW ``[B, K, H, W]``) -> reshape to
      ``[B, K, H*W]``, ``call_tir`` of the channel-major conv1x1 kernel, reshape back.
      ``fused``: ``{node name: activation}`` for SparseConv1x1 nodes whose following
      activation node the caller folds away (``targets.conv_kernels``: ``Clip(0, 6)`` -> ``relu6``).

    The kernels carry ``tirx.is_scheduled`` so the CUDA pipeline's dlight rules leave them
    alone (and meta_schedule does not extract them as tuning tasks)."""
    from tvm import relax
    from tvm.ir import expr as tvm_ir_expr
    from tvm.relax.frontend.onnx.onnx_frontend import OnnxOpConverter

    from compressor.errors import TargetError

    fam = target_family(tvm_target)

    def bsr_args(op: str, inputs, k: int):
        inits = inputs[1:5]
        if len(inits) != 4 or not all(isinstance(c, tvm_ir_expr.Constant) for c in inits):
            raise TargetError(f"compressor::{op}: data/indices/indptr/bias must be initializers")
        data, indices, indptr, bias = (c.value.numpy() for c in inits)
        r = int(data.shape[1])
        n = (len(indptr) - 1) * r
        b = BSR(data.astype(np.float32), indices.astype(np.int32), indptr.astype(np.int32), (n, k))
        return b, bias.astype(np.float32)

    def consts(arrays) -> list:
        return [relax.const(a) for a in arrays]

    def make(op: str) -> type:
        activation = "relu" if op.endswith("Relu") else "none"

        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            shape = [int(d) for d in x.ty.shape]
            k = shape[-1]
            m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            b, bias = bsr_args(op, inputs, k)
            (r, c), n = b.block, b.shape[0]
            p = kernel_params((r, c), m, tvm_target, n, k)
            weights = kernel_weights(b, p)
            # no global_symbol: add_func makes the name unique; several layers share one kernel name
            prim = make_primfunc(m, n, k, (r, c), len(weights[0]), activation, tvm_target, p).without_attr(
                "global_symbol")
            gv = bb.add_func(prim, f"bsr_{r}x{c}_{activation}" + ("_perm" if p.variant == "perm" else ""))
            x2 = x if len(shape) == 2 else relax.op.reshape(x, (m, k))
            y = relax.call_tir(gv, [x2, *consts([*weights, bias])], relax.TensorType((m, n), "float32"))
            if len(shape) != 2:
                y = relax.op.reshape(bb.normalize(y), (*shape[:-1], n))
            return y

        return type(f"Convert{op}", (OnnxOpConverter,), {"_impl_v1": classmethod(_impl_v1)})

    def make_conv(op: str) -> type:
        activation = "relu" if op.endswith("Relu") else "none"

        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            shape = [int(d) for d in x.ty.shape]
            if len(shape) != 4:
                raise TargetError(f"compressor::{op}: input must be NCHW, got shape {shape}")
            bsz, k, h, w = shape
            b, bias = bsr_args(op, inputs, k)
            cargs = consts([kernel_data(b), kernel_indices(b), b.indptr, bias])
            (r, c), n = b.block, b.shape[0]
            act = (fused or {}).get(str(attr.get("tvm_custom", {}).get("name", "")), activation)
            nchw = (h, w) if fam != "cuda" else None
            prim = make_conv1x1_primfunc(bsz, h * w, n, k, (r, c), b.nnzb, act, tvm_target,
                                         nchw).without_attr("global_symbol")
            gv = bb.add_func(prim, f"bsr_conv1x1_{r}x{c}_{act}")
            if nchw:
                return relax.call_tir(gv, [x, *cargs], relax.TensorType((bsz, n, h, w), "float32"))
            y = relax.call_tir(gv, [relax.op.reshape(x, (bsz, k, h * w)), *cargs],
                               relax.TensorType((bsz, n, h * w), "float32"))
            return relax.op.reshape(bb.normalize(y), (bsz, n, h, w))

        return type(f"Convert{op}", (OnnxOpConverter,), {"_impl_v1": classmethod(_impl_v1)})

    if fam not in ("x86", "arm", "cuda", "cpu"):
        raise TargetError(f"no BSR kernels for target family {fam!r}")
    return {**{op: make(op) for op in SPARSE_OPS}, **{op: make_conv(op) for op in CONV_OPS}}
