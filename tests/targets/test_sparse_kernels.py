"""BSR x dense TIR kernels: numerics against numpy for every block shape, batch and kernel
variant on x86 (executed), aarch64 (NEON code generated, checked in the assembly) and CUDA
(device source generated)."""
from __future__ import annotations

import numpy as np
import pytest

from targets import sparse_kernels as sk

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
BLOCKS = [(1, 1), (4, 1), (8, 1), (16, 1), (1, 4)]


def _weight(rng, n, k, block, density):
    keep = rng.random((n // block[0], k // block[1])) < density
    return (rng.standard_normal((n, k)) * np.kron(keep, np.ones(block))).astype(np.float32)


def _run(f, args, m, n):
    import tvm

    t = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))]
    f(*t)
    return t[-1].numpy()


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_roundtrip_and_padding(block):
    rng = np.random.default_rng(1)
    w = _weight(rng, 48, 32, block, 0.3)
    for group in (1, 4):
        b = sk.to_bsr(w, block, group)
        np.testing.assert_array_equal(sk.from_bsr(b), w)
        assert b.data.shape[1:] == block
        assert np.all(np.diff(b.indptr) % group == 0)
        # no duplicate block columns inside a block row (padding uses free columns)
        for i in range(len(b.indptr) - 1):
            cols = b.indices[b.indptr[i]:b.indptr[i + 1]]
            assert len(set(cols.tolist())) == len(cols)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("m", [1, 3, 4, 16])
def test_kernel_matches_numpy_x86(block, m):
    rng = np.random.default_rng(hash((block, m)) % 2**32)
    n, k = 64, 48
    w = _weight(rng, n, k, block, 0.25)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    for group in sorted({1, sk.lanes_group(block, X86)}):  # remainder loop and padded rows
        b = sk.to_bsr(w, block, group)
        for act in ("none", "relu"):
            f = sk.build(m, b, act, X86)
            y = _run(f, sk.kernel_args(x, b, bias), m, n)
            np.testing.assert_allclose(y, sk.reference(x, b, bias, act), rtol=1e-5, atol=1e-5)
    if act == "relu":
        assert (y == 0).any() and (y > 0).any()


@pytest.mark.parametrize("variant", ["rows", "lanes", "xt"])
def test_every_variant_on_every_shape(variant):
    """Each kernel variant is correct for shapes it is not the default for."""
    rng = np.random.default_rng(7)
    for block, m in [((8, 1), 2), ((1, 1), 5), ((1, 4), 1), ((4, 1), 6)]:
        if variant == "rows" and block[0] == 1:
            continue
        if variant != "rows" and block[0] != 1:
            continue
        w = _weight(rng, 32, 32, block, 0.3)
        x = rng.standard_normal((m, 32)).astype(np.float32)
        b = sk.to_bsr(w, block, 4 // block[1] or 1)
        p = {"rows": sk.KernelParams("rows", block[0], 1, 3), "lanes": sk.KernelParams("lanes", 4, 1, 1, False),
             "xt": sk.KernelParams("xt", 1, 1)}[variant]
        if variant == "lanes":
            p = sk.KernelParams("lanes", 4 if block[1] <= 4 else block[1], 1, 1, block[1] > 1)
        y = _run(sk.build(m, b, "none", X86, p), sk.kernel_args(x, b, None), m, 32)
        np.testing.assert_allclose(y, x @ w.T, rtol=1e-5, atol=1e-5)


def test_empty_and_all_zero_rows():
    rng = np.random.default_rng(3)
    w = _weight(rng, 32, 16, (8, 1), 0.5)
    w[:8] = 0  # a whole block row empty
    x = rng.standard_normal((1, 16)).astype(np.float32)
    for wt in (w, np.zeros_like(w)):
        b = sk.to_bsr(wt, (8, 1))
        y = _run(sk.build(1, b, "none", X86), sk.kernel_args(x, b, None), 1, 32)
        np.testing.assert_allclose(y, x @ wt.T, rtol=1e-5, atol=1e-5)


def test_detect_block():
    rng = np.random.default_rng(4)
    assert sk.detect_block(_weight(rng, 64, 64, (16, 1), 0.2)) == (16, 1)
    assert sk.detect_block(_weight(rng, 64, 64, (8, 1), 0.2)) == (8, 1)
    assert sk.detect_block(_weight(rng, 64, 64, (1, 4), 0.2)) == (1, 4)
    assert sk.detect_block(_weight(rng, 64, 64, (1, 1), 0.2)) == (1, 1)


def test_parse_block():
    assert sk.parse_block("unstructured") == (1, 1)
    assert sk.parse_block("8x1") == (8, 1)
    with pytest.raises(ValueError):
        sk.parse_block("2:4")


def _asm(f, target):
    import tvm

    tgt = tvm.target.Target(target)
    with tgt:
        ex = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=tgt)
    mod = getattr(ex, "mod", ex)
    return mod.inspect_source("s")


@pytest.mark.parametrize("block", [(8, 1), (1, 1)], ids=["8x1", "1x1"])
def test_aarch64_neon_codegen(block):
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    f = sk.make_primfunc(1, 64, 64, block, 40, "relu", arm)
    asm = _asm(f, arm)
    assert "fmla" in asm  # NEON fused multiply-add
    if block == (8, 1):
        assert ".4s" in asm  # 128-bit float vectors


def test_x86_rows_kernel_uses_vector_fma():
    f = sk.make_primfunc(1, 64, 64, (8, 1), 40, "none", {**X86, "mcpu": "x86-64-v3"})
    asm = _asm(f, {**X86, "mcpu": "x86-64-v3"})
    assert "vfmadd" in asm and "%ymm" in asm
    assert "AllocWorkspace" not in asm  # accumulators live on the stack / in registers


def test_cuda_kernel_codegen():
    import tvm

    f = sk.make_primfunc(4, 64, 64, (8, 1), 40, "relu", "cuda").with_attr("global_symbol", "k")
    tgt = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
    try:
        with tgt:
            ex = tvm.compile(tvm.IRModule({"k": f}), target=tgt)
    except Exception as exc:  # pragma: no cover - depends on the TVM build
        pytest.skip(f"CUDA codegen unavailable: {exc}")
    mod = getattr(ex, "mod", ex)
    src = "".join(m.inspect_source() for m in mod.imports)
    assert "__shared__" in src and "__syncthreads" in src and "blockIdx.x" in src


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
def test_conv1x1_kernel_matches_numpy_x86(block):
    """Channel-major conv1x1 kernel: pixel counts below, equal to and not a multiple of the
    tile (the last tile overlaps), batch 2, bias + relu."""
    import tvm

    rng = np.random.default_rng(11)
    n, k = 32, 16
    w = _weight(rng, n, k, block, 0.3)
    b = sk.to_bsr(w, block)
    bias = rng.standard_normal(n).astype(np.float32)
    for bsz, m in [(1, 7), (2, 70), (1, 128)]:
        x = rng.standard_normal((bsz, k, m)).astype(np.float32)
        for act in ("none", "relu"):
            f = sk.build_conv1x1(bsz, m, b, act, X86)
            t = [tvm.runtime.tensor(a) for a in (x, sk.kernel_data(b), sk.kernel_indices(b), b.indptr, bias,
                                                   np.full((bsz, n, m), np.nan, np.float32))]
            f(*t)
            np.testing.assert_allclose(t[-1].numpy(), sk.reference_conv1x1(x, b, bias, act), rtol=1e-5, atol=1e-5)


def test_conv1x1_tile_overlap_covers_every_pixel():
    assert sk.conv_mtile(70, 1) == 64 and 70 % 64 != 0  # tiles [0, 64) and [6, 70) (AVX-512 lanes)
    mt = sk.conv_mtile(70, 1, sk.vector_floats(X86))  # the target exercised above
    assert mt < 70 and 70 % mt != 0
    assert sk.conv_mtile(49, 1) == 32 and sk.conv_mtile(3136, 8) == 16  # 49: two overlapping vector tiles
    assert sk.conv_mtile(7, 1) == 7 and sk.conv_mtile(784, 1) == 64 and sk.conv_mtile(16, 1) == 16


def test_conv1x1_tile_is_a_power_of_two_count_of_vectors():
    """LLVM scalarises loop-carried accumulators of 7 or 14 vectors (<28 x float> on NEON, <56 x float>
    on AVX2): every tile of at least one vector is the vector width times a power of two."""
    for v in (4, 8, 16):
        for m in range(v, 4000, 7):
            for r in (1, 2, 4, 8, 16):
                t = sk.conv_mtile(m, r, v)
                assert t < v or (t % v == 0 and (t // v) & (t // v - 1) == 0), (m, r, v, t)
    assert sk.conv_mtile(196, 1, 4) == 64 and sk.conv_mtile(784, 1, 8) == 64


def test_x86_conv1x1_kernel_uses_vector_fma():
    f = sk.make_conv1x1_primfunc(1, 196, 64, 64, (4, 1), 40, "relu", {**X86, "mcpu": "x86-64-v3"})
    asm = _asm(f, {**X86, "mcpu": "x86-64-v3"})
    assert "vfmadd" in asm and "%ymm" in asm
    assert "AllocWorkspace" not in asm


@pytest.mark.parametrize("block,m", [((8, 1), 1), ((1, 1), 1), ((1, 1), 6), ((1, 4), 2)],
                         ids=["rows", "lanes", "xt", "lanes1x4"])
def test_small_kernels_run_serially_and_both_task_loops_agree(block, m, monkeypatch):
    """Below ``PARALLEL_MIN_STORED`` the task loop is serial (no pool fork for a ~1 us layer);
    forcing the parallel loop gives the same result."""
    rng = np.random.default_rng(11)
    n, k = 64, 64
    w = _weight(rng, n, k, block, 0.2)
    x = rng.standard_normal((m, k)).astype(np.float32)
    b = sk.to_bsr(w, block, sk.lanes_group(block, X86))
    p = sk.kernel_params(block, m, X86)
    assert b.nnzb * block[0] * block[1] * m < sk.PARALLEL_MIN_STORED[p.variant]
    serial = sk.make_primfunc(m, n, k, block, b.nnzb, "none", X86, p)
    assert "T.parallel" not in serial.script()
    ys = _run(sk.build(m, b, "none", X86, p), sk.kernel_args(x, b, None, p), m, n)
    monkeypatch.setitem(sk.PARALLEL_MIN_STORED, p.variant, 0)
    assert "T.parallel" in sk.make_primfunc(m, n, k, block, b.nnzb, "none", X86, p).script()
    yp = _run(sk.build(m, b, "none", X86, p), sk.kernel_args(x, b, None, p), m, n)
    np.testing.assert_allclose(ys, x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ys, yp)
