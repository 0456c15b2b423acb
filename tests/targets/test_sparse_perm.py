"""Permute-SELL kernel (targets.sparse_kernels ``perm``): packing oracle, numerics against
numpy on AVX-512 hosts (compiled everywhere; the vpermi2ps checked in the assembly), the
variant choice, and a lowered model compiled through the Relax frontend."""
from __future__ import annotations

import numpy as np
import pytest

from targets import sparse_kernels as sk
from targets.host import detect_host

X86_512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"}
X86_AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}
HOST_AVX512 = "avx512f" in detect_host().features
needs_avx512 = pytest.mark.skipif(not HOST_AVX512, reason="host has no AVX-512 to run the perm kernel")


def _weight(rng, n, k, density):
    return (rng.standard_normal((n, k)) * (rng.random((n, k)) < density)).astype(np.float32)


def _unpack(data, offs, steps, n, k, rows=sk.PERM_ROWS, chunk=sk.PERM_CHUNK):
    """Dense [n, k] from pack_perm's arrays (the layout's definition, independently of the kernel)."""
    w = np.zeros((n, k), np.float32)
    nc = k // chunk
    for gc in range(len(steps) - 1):
        g, c = divmod(gc, nc)
        for s in range(steps[gc], steps[gc + 1]):
            for r in range(rows):
                if data[s, r] != 0:
                    assert w[g * rows + r, c * chunk + offs[s, r]] == 0  # each element stored once
                    w[g * rows + r, c * chunk + offs[s, r]] = data[s, r]
    return w


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
def test_pack_perm_roundtrip_and_step_counts(density):
    rng = np.random.default_rng(int(density * 100))
    n, k = 48, 96
    w = _weight(rng, n, k, density)
    for group in (1, 16):  # lanes padding (explicit zero blocks) is dropped
        data, offs, steps = sk.pack_perm(sk.to_bsr(w, (1, 1), group))
        np.testing.assert_array_equal(_unpack(data, offs, steps, n, k), w)
        counts = (w.reshape(n // 16, 16, k // 32, 32) != 0).sum(axis=3).max(axis=1).reshape(-1)
        np.testing.assert_array_equal(np.diff(steps), counts)  # steps = the fullest row of each (group, chunk)
        assert offs.dtype == np.uint8 and offs.max(initial=0) < 32


def test_pack_perm_unsorted_rows_and_bad_shapes():
    rng = np.random.default_rng(5)
    w = _weight(rng, 32, 64, 0.2)
    b = sk.to_bsr(w, (1, 1))
    perm = np.concatenate([rng.permutation(np.arange(b.indptr[i], b.indptr[i + 1])) for i in range(32)])
    shuffled = sk.BSR(b.data[perm], b.indices[perm], b.indptr, b.shape)  # columns out of order in a row
    np.testing.assert_array_equal(_unpack(*sk.pack_perm(shuffled), 32, 64), w)
    with pytest.raises(ValueError, match="K % 32"):
        sk.pack_perm(sk.to_bsr(_weight(rng, 32, 48, 0.2), (1, 1)))
    with pytest.raises(ValueError, match="1x1"):
        sk.pack_perm(sk.to_bsr(w, (8, 1)))


def test_expected_slots_matches_random_weights():
    rng = np.random.default_rng(6)
    for density in (0.05, 0.1, 0.3):
        w = _weight(rng, 512, 512, density)
        got = sk.pack_perm(sk.to_bsr(w, (1, 1)))[0].size
        assert sk.perm_expected_slots(512, 512, density) == pytest.approx(got, rel=0.05)
    assert sk.perm_expected_slots(64, 64, 0.0) == 0.0
    assert sk.perm_expected_slots(64, 64, 1.0) == pytest.approx(64 * 64)


def test_variant_choice():
    assert sk.kernel_params((1, 1), 1, X86_512, 64, 64).variant == "perm"
    assert sk.kernel_params((1, 1), 8, X86_512, 64, 64).variant == "perm"
    assert sk.kernel_params((1, 1), 9, X86_512, 64, 64).variant == "xt"  # accumulators would spill
    assert sk.kernel_params((1, 1), 1, X86_512).variant == "lanes"  # shape unknown
    assert sk.kernel_params((1, 1), 1, X86_512, 40, 64).variant == "lanes"  # N % 16
    assert sk.kernel_params((1, 1), 1, X86_512, 64, 48).variant == "lanes"  # K % 32
    assert sk.kernel_params((1, 1), 1, X86_AVX2, 64, 64).variant == "lanes"  # no vpermi2ps
    assert sk.kernel_params((1, 4), 1, X86_512, 64, 64).variant == "lanes"
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    assert sk.kernel_params((1, 1), 1, arm, 64, 64).variant == "lanes"
    with pytest.raises(ValueError, match="perm kernel needs"):
        sk.make_primfunc(1, 64, 64, (1, 1), 8, "none", X86_AVX2, sk.KernelParams("perm", 16, 1))


def test_perm_codegen_uses_vpermi2ps():
    import tvm

    f = sk.make_primfunc(2, 64, 64, (1, 1), 40, "relu", X86_512, sk.KernelParams("perm", 16, 1))
    tgt = tvm.target.Target(X86_512)
    with tgt:
        ex = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=tgt)
    asm = getattr(ex, "mod", ex).inspect_source("s")
    assert "vpermi2ps" in asm or "vpermt2ps" in asm  # one shuffle per 16 non-zeros, no scalar gather
    assert "vpmovzxbd" in asm  # one-byte column offsets widened in a register
    assert "AllocWorkspace" not in asm


@needs_avx512
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_perm_kernel_matches_numpy(m):
    rng = np.random.default_rng(m)
    n, k = 64, 96
    w = _weight(rng, n, k, 0.15) * 3
    w[5] = 0  # an empty row
    w[16:32, 32:64] = 0  # an empty (group, chunk): zero steps
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    b = sk.to_bsr(w, (1, 1), 16)
    p = sk.kernel_params((1, 1), m, X86_512, n, k)
    assert p.variant == "perm"
    for act in ("none", "relu", "relu6"):
        f = sk.build(m, b, act, X86_512, p)
        args = sk.kernel_args(x, b, bias, p)
        import tvm

        t = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))]
        f(*t)
        np.testing.assert_allclose(t[-1].numpy(), sk.reference(x, b, bias, act), rtol=1e-5, atol=1e-5)
    y = t[-1].numpy()  # relu6: both clamps reached
    assert (y == 0).any() and (y == 6).any() and ((y > 0) & (y < 6)).any()


@needs_avx512
def test_perm_parallel_task_loop_matches_serial(monkeypatch):
    import tvm

    rng = np.random.default_rng(12)
    n, k, m = 128, 64, 2
    w = _weight(rng, n, k, 0.2)
    x = rng.standard_normal((m, k)).astype(np.float32)
    b = sk.to_bsr(w, (1, 1))
    p = sk.kernel_params((1, 1), m, X86_512, n, k)
    outs = []
    for thr in (1 << 40, 0):
        monkeypatch.setitem(sk.PARALLEL_MIN_STORED, "perm", thr)
        t = [tvm.runtime.tensor(a) for a in sk.kernel_args(x, b, None, p)] + [tvm.runtime.tensor(np.zeros((m, n), np.float32))]
        sk.build(m, b, "none", X86_512, p)(*t)
        outs.append(t[-1].numpy())
    np.testing.assert_allclose(outs[0], x @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs[0], outs[1])


@needs_avx512
def test_lowered_model_runs_the_perm_kernel(tmp_path):
    """An unstructured MatMul lowered for an AVX-512 x86 target: the Relax converter packs the
    BSR initializers for the perm kernel; the compiled library matches onnxruntime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tests.targets.lower_sparse_util import lower, run_ort
    from targets import tvm_backend

    class Spec512:
        tvm_target = X86_512
        family = "x86"

    rng = np.random.default_rng(9)
    w = _weight(rng, 256, 128, 0.1)  # MatMul weight [K, N]
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 128])],
                          [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    res, out = lower(model, spec=Spec512, min_speedup=0.01)
    rec = res.stats["layers"][0]
    assert rec["lowered"] and rec["kernel"] == "perm" and "perm" in rec["cost_model"]
    assert rec["stored_density"] == pytest.approx((w != 0).mean(), abs=1e-4)  # no lanes padding stored
    path = tmp_path / "m.onnx"
    onnx.save(out, str(path))
    mod = tvm_backend.import_onnx(path, target=X86_512)
    assert any("bsr_1x1_none_perm" in str(gv) for gv in mod.functions)
    tvm_backend.compile_library(mod, X86_512, tmp_path / "m.so")
    x = rng.standard_normal((1, 256)).astype(np.float32)
    np.testing.assert_allclose(tvm_backend.run_library(tmp_path / "m.so", {"x": x})[0], run_ort(model, x),
                               rtol=1e-4, atol=1e-4)
