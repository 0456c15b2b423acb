"""Int8 x uint8 block-sparse kernels (issue 21): bit-exact int32 accumulators against numpy's integer
product for every variant, compiled for AVX-512 VNNI, AVX2 and aarch64 on any host, executed where the
host can (aarch64 under qemu)."""
from __future__ import annotations

import numpy as np
import pytest

from targets import sparse_int8 as si
from targets.host import detect_host

tvm = pytest.importorskip("tvm")

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
VNNI = {**X86, "mcpu": "icelake-server"}  # AVX-512 + VNNI
AVX2 = {**X86, "mcpu": "x86-64-v3"}
ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}


def _weights(n, k, r, density, rng, extreme=False):
    w = rng.standard_normal((n, k)).astype(np.float32)
    mask = rng.random((n // r, k // 4)) < density
    w *= np.repeat(np.repeat(mask, r, 0), 4, 1)
    wq, sw = si.quantize_weight(w)
    if extreme:  # |w| = 127: with x = 255, same-sign pairs saturate vpmaddubsw's int16 sums (64770 > 32767)
        wq = np.where(wq != 0, np.where(wq > 0, np.int8(127), np.int8(-127)), np.int8(0)).astype(np.int8)
    return si.to_bsr_int8(wq, sw, r), wq


def test_bsr_int8_format_round_trip():
    rng = np.random.default_rng(0)
    b, wq = _weights(64, 32, 16, 0.3, rng)
    assert (b.dense() == wq).all() and b.data.shape == (b.nnzb, 16, 4)
    assert b.density() == pytest.approx((wq.reshape(4, 16, 8, 4).transpose(0, 2, 1, 3) != 0)
                                        .reshape(4, 8, -1).any(axis=2).mean())
    # zeros stay exactly zero through quantization; scales are per row
    w = np.array([[0.0, 1.0, -2.0, 0.0], [0.5, 0.0, 0.0, 0.25]], np.float32)
    q, s = si.quantize_weight(w)
    assert (q == np.array([[0, 64, -127, 0], [127, 0, 0, 64]])).all() and s == pytest.approx([2 / 127, 0.5 / 127])
    with pytest.raises(ValueError):
        si.to_bsr_int8(np.zeros((10, 8), np.int8), np.ones(10, np.float32), 16)


def test_m_tile_divides_and_bounds_the_accumulators():
    for r in (4, 8, 16):
        for m in (1, 3, 7, 12, 128, 131):
            t = si.m_tile(m, r)
            assert m % t == 0 and t * r <= 64 and t >= 1
    assert si.m_tile(128, 16) == 4 and si.m_tile(7, 16) == 1 and si.m_tile(128, 4) == 8


def test_variant_by_isa():
    assert si.variant_for(VNNI) == "vnni"
    assert si.variant_for(AVX2) == "avx2" and si.variant_for(ARM) == "sdot"
    assert si.variant_for({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}) == "generic"
    assert si.variant_for({**X86, "mcpu": "skylake-avx512"}) == "avx2"  # AVX-512 without VNNI: the AVX2 form
    with pytest.raises(ValueError):
        si.make_primfunc(1, (64, 64), 16, 4, AVX2)  # the avx2 kernel takes 8-row blocks


def _host_runs(target) -> bool:
    h = detect_host()
    if h.arch != "x86_64" or target is ARM:
        return False
    need = {"avx512_vnni", "avx512bw"} if target is VNNI else ({"avx2"} if target is AVX2 else {"sse4_2"})
    return need <= set(h.features)


@pytest.mark.parametrize("target", [VNNI, AVX2, {**X86, "mcpu": "x86-64-v2"}], ids=["avx512-vnni", "avx2", "sse4-generic"])
@pytest.mark.parametrize("m", [1, 3, 7, 128])
def test_x86_kernels_exact(target, m):
    rng = np.random.default_rng(m)
    n, k = 64, 256
    variant = si.variant_for(target)
    r = si.BLOCK_ROWS.get(variant, 4)
    b, _ = _weights(n, k, r, 0.25, rng, extreme=True)
    xq = np.full((m, k), 255, np.uint8)  # every product at the saturating extreme
    xq[:, ::3] = rng.integers(0, 256, (m, len(range(0, k, 3))))
    f_acc = si.build(m, b, target, acc_only=True)
    f_y = si.build(m, b, target, relu=True)
    if not _host_runs(target):
        pytest.skip(f"compiled; this host cannot run {target.get('mcpu')} code")
    args = [tvm.runtime.tensor(a) for a in si.kernel_args(xq, b, 0.02, 7, np.linspace(-1, 1, n).astype(np.float32),
                                                           variant=variant)]
    acc = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    f_acc(*args, acc)
    np.testing.assert_array_equal(acc.numpy(), si.reference_acc(xq, b))
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    f_y(*args, y)
    ref = si.reference(xq, b, 0.02, 7, np.linspace(-1, 1, n), relu=True)
    assert (ref > 0).mean() > 0.2  # the relu and requant checks below see real values
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # requantized uint8 output (the next layer's input): equal to the oracle up to a rounding tie
    rq = (max(float(np.abs(ref).max()), 1.0) / 200, 3)
    f_q = si.build(m, b, target, relu=True, requant=rq)
    yq = tvm.runtime.tensor(np.zeros((m, n), np.uint8))
    f_q(*args, yq)
    want = si.reference(xq, b, 0.02, 7, np.linspace(-1, 1, n), relu=True, requant=rq)
    assert np.abs(yq.numpy().astype(int) - want.astype(int)).max() <= 1 and (yq.numpy() == want).mean() > 0.98


def test_empty_rows_and_empty_weight():
    rng = np.random.default_rng(3)
    wq = np.zeros((32, 16), np.int8)
    wq[16:, :4] = 5
    b = si.to_bsr_int8(wq, np.ones(32, np.float32), 16)
    assert list(b.indptr) == [0, 0, 1]
    xq = rng.integers(0, 256, (2, 16)).astype(np.uint8)
    if _host_runs(VNNI):
        f = si.build(2, b, VNNI, acc_only=True)
        acc = tvm.runtime.tensor(np.zeros((2, 32), np.int32))
        f(*[tvm.runtime.tensor(a) for a in si.kernel_args(xq, b, 1.0, 0)], acc)
        np.testing.assert_array_equal(acc.numpy(), si.reference_acc(xq, b))
    empty = si.to_bsr_int8(np.zeros((16, 8), np.int8), np.ones(16, np.float32), 16)
    assert empty.nnzb == 0 and si.kernel_args(xq[:, :8], empty, 1.0, 0)[1].size == 64


def test_vnni_kernel_uses_vpdpbusd():
    b, _ = _weights(32, 64, 16, 0.5, np.random.default_rng(1))
    tgt = tvm.target.Target(VNNI)
    with tgt:
        ex = tvm.compile(tvm.IRModule({"k": si.make_primfunc(1, b.shape, 16, b.nnzb, tgt).with_attr(
            "global_symbol", "k")}), target=tgt)
    assert "vpdpbusd" in getattr(ex, "mod", ex).inspect_source("s")
    b8, _ = _weights(32, 64, 8, 0.5, np.random.default_rng(1))
    tgt = tvm.target.Target(AVX2)
    with tgt:
        ex = tvm.compile(tvm.IRModule({"k": si.make_primfunc(1, b8.shape, 8, b8.nnzb, tgt).with_attr(
            "global_symbol", "k")}), target=tgt)
    asm = getattr(ex, "mod", ex).inspect_source("s")
    assert "vpmaddwd" in asm and "vphaddd" in asm and "vpmaddubsw" not in asm


@pytest.mark.emulated
@pytest.mark.slow
def test_aarch64_kernels_exact_under_qemu(tmp_path):
    """sdot (dot-product extension, 4x4 blocks, x - 128 as int8) and the generic kernel (plain NEON):
    bit-exact int32 accumulators in the aarch64 guest; the sdot kernel executes far fewer instructions."""
    from compressor.errors import DependencyError
    from targets import device_qemu

    try:
        device_qemu.prepare()
    except DependencyError as exc:
        pytest.skip(f"no aarch64 guest under qemu: {exc.one_line()}")
    rng = np.random.default_rng(5)
    plain = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    kernels = []
    for m in (1, 4):
        b, wq = _weights(64, 256, 4, 0.3, rng, extreme=True)
        xq = rng.integers(0, 256, (m, 256)).astype(np.uint8)
        xq[:, ::5] = 255
        for variant in ("sdot", "generic"):
            args = si.kernel_args(xq, b, 0.1, 3, variant=variant) + [np.zeros((m, 64), np.int32)]
            x_used = args[0].astype(np.int64)  # what the kernel multiplies: x - 128 for sdot
            kernels.append({"name": f"i8_{variant}_{m}", "variant": variant,
                            "func": si.make_primfunc(m, b.shape, 4, b.nnzb, ARM, acc_only=True, variant=variant),
                            "args": args, "ref": (x_used @ wq.astype(np.int64).T).astype(np.int32)})
    got = device_qemu.run_kernels(kernels, ARM, tmp_path, count=True)
    insns = {}
    for kern, (counts, err) in zip(kernels, got):
        assert err == 0.0, kern["name"]  # bit-exact int32 accumulators on aarch64
        insns[kern["name"]] = counts["total"]
    assert insns["i8_sdot_4"] * 2 < insns["i8_generic_4"]
    assert si.variant_for(plain) == "generic"


@pytest.mark.parametrize("signed", [False, True])
def test_dynamic_quantize_kernel_matches_onnxruntime(signed):
    """make_dynamic_quantize against onnxruntime's DynamicQuantizeLinear (sizes with a vector tail)."""
    import onnx
    from onnx import TensorProto, helper

    from compressor import runtime

    if not _host_runs(AVX2):
        pytest.skip("needs an AVX2 host")
    g = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "d",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                          [helper.make_tensor_value_info(n, t, s) for n, t, s in
                           (("q", TensorProto.UINT8, [None]), ("s", TensorProto.FLOAT, []), ("z", TensorProto.UINT8, []))])
    sess = runtime.session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    rng = np.random.default_rng(6)
    for size in (7, 64, 1000, 4099):
        x = (rng.standard_normal(size) * 3 + 0.5).astype(np.float32)
        q, s, z = sess.run(None, {"x": x})
        f = si.make_dynamic_quantize(size, AVX2, signed).with_attr("global_symbol", "dql")
        tgt = tvm.target.Target(AVX2)
        with tgt:
            lib = tvm.compile(tvm.IRModule({"dql": f}), target=tgt)
        bufs = [tvm.runtime.tensor(x), tvm.runtime.tensor(np.zeros(size, np.int8 if signed else np.uint8)),
                tvm.runtime.tensor(np.zeros(1, np.float32)), tvm.runtime.tensor(np.zeros(1, np.float32))]
        lib["dql"](*bufs)
        assert bufs[2].numpy()[0] == pytest.approx(float(s), rel=1e-6) and bufs[3].numpy()[0] == float(z)
        got = bufs[1].numpy().astype(np.int16) + (128 if signed else 0)
        assert np.abs(got - q.astype(np.int16)).max() <= 1 and (got == q).mean() > 0.999


@pytest.mark.parametrize("m", [1, 5, 16])
def test_avx2_ubs_kernel_exact_at_the_saturation_edge(m):
    """The vpmaddubsw form with 7-bit weights: x = 255 and w = +-64 make every int16 pair sum 32640, just
    below the saturation bound; the accumulators stay bit-exact. A weight of 65 falls back to the avx2 form."""
    rng = np.random.default_rng(9)
    wq = np.where(rng.random((32, 64)) < 0.4, np.where(rng.random((32, 64)) < 0.5, 64, -64), 0).astype(np.int8)
    b = si.to_bsr_int8(wq, np.ones(32, np.float32), 8)
    assert si.refine_variant("avx2", b.data) == "avx2_ubs" and si.refine_variant("vnni", b.data) == "vnni"
    assert si.refine_variant("avx2", np.full((1, 8, 4), 65, np.int8)) == "avx2"
    xq = np.full((m, 64), 255, np.uint8)
    xq[:, ::7] = rng.integers(0, 256, (m, len(range(0, 64, 7))))
    f = si.build(m, b, AVX2, acc_only=True, variant="avx2_ubs")
    if not _host_runs(AVX2):
        pytest.skip("needs an AVX2 host")
    acc = tvm.runtime.tensor(np.zeros((m, 32), np.int32))
    f(*[tvm.runtime.tensor(a) for a in si.kernel_args(xq, b, 1.0, 0, variant="avx2_ubs")], acc)
    np.testing.assert_array_equal(acc.numpy(), si.reference_acc(xq, b))
