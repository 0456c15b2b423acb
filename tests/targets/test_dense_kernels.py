"""Packed dense TIR kernels (targets/dense_kernels.py): numerics against numpy for shapes
whose N and K are not multiples of the vector width, aarch64 code generation, and the Relax
ONNX importer converters (which layers take the kernel, which fall back) checked end to end
against onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets import dense_kernels as dk

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}  # generic x86-64: AVX2-width tiles (8 lanes)
X86_512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"}
ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}  # as targets/arm.py
CUDA = {"kind": "cuda", "arch": "sm_80"}


def _host_can_avx512() -> bool:
    from targets.host import detect_host

    return {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(detect_host().features)


def _run(f, args, m, n):
    import tvm

    t = [tvm.runtime.tensor(a) for a in args] + [tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))]
    f(*t)
    return t[-1].numpy()


# ------------------------------------------------------------------ tiling and packing


def test_kernel_params_per_target():
    assert dk.kernel_params(1, 1000, 512, X86) == dk.DenseParams(8, 2, 1, 4, True)  # >= PARALLEL_MIN_MACS
    assert not dk.kernel_params(1, 1000, 128, X86).parallel
    assert dk.kernel_params(16, 1000, 64, X86_512) == dk.DenseParams(16, 4, 4, 4, True)
    assert dk.kernel_params(5, 10, 7, ARM) == dk.DenseParams(4, 3, 5, 1, False)  # 10 columns -> 3 NEON vectors
    assert dk.kernel_params(1, 8, 6, X86).kunroll == 2
    with pytest.raises(ValueError, match="CPU"):
        dk.kernel_params(1, 8, 8, CUDA)


@pytest.mark.parametrize("m,want", [(1, 1), (5, 5), (6, 6), (7, 4), (8, 4), (12, 6), (16, 4), (17, 6), (64, 4)])
def test_mtile_wastes_fewest_rows(m, want):
    assert dk.mtile_for(m, 6) == want


def test_pack_weight_layout():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((21, 5)).astype(np.float32)
    p = dk.DenseParams(4, 2, 1, 1, False)  # tiles of 8 columns -> 3 tiles, 3 padded columns
    wp = dk.pack_weight(w, p)
    assert wp.shape == (3, 5, 8)
    for t in range(3):
        for j in range(8):
            col = t * 8 + j
            np.testing.assert_array_equal(wp[t, :, j], w[col] if col < 21 else np.zeros(5, np.float32))
    b = dk.pack_bias(np.arange(21, dtype=np.float32), 21, p)
    assert b.shape == (24,) and b[20] == 20 and not b[21:].any()


def test_gemm_bias_forms():
    n = 4
    c = np.arange(n, dtype=np.float32)
    np.testing.assert_array_equal(dk.gemm_bias(c, 2.0, n), 2 * c)
    np.testing.assert_array_equal(dk.gemm_bias(c.reshape(1, n), 1.0, n), c)
    np.testing.assert_array_equal(dk.gemm_bias(np.float32(3), 0.5, n), np.full(n, 1.5, np.float32))
    assert dk.gemm_bias(None, 1.0, n) is None
    assert isinstance(dk.gemm_bias(np.ones((3, n), np.float32), 1.0, n), str)  # row-dependent C


# ------------------------------------------------------------------ kernel numerics (x86, executed)


SHAPES = [(1, 10, 7), (3, 37, 50), (5, 64, 64), (7, 100, 33), (13, 130, 48), (64, 24, 17)]


@pytest.mark.parametrize("m,n,k", SHAPES, ids=lambda v: str(v))
def test_kernel_matches_numpy_x86(m, n, k):
    rng = np.random.default_rng(m * 1000 + n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    for act in ("none", "relu"):
        f, p = dk.build(m, n, k, act, X86)
        assert p.lanes == 8
        y = _run(f, dk.kernel_args(x, w, bias, p), m, n)  # NaN-filled output: every element written
        np.testing.assert_allclose(y, dk.reference(x, w, bias, act), rtol=1e-5, atol=1e-4)
    assert (y == 0).any() and (y > 0).any()


@pytest.mark.parametrize("p", [dk.DenseParams(16, 4, 6, 4, True), dk.DenseParams(16, 1, 3, 2, False),
                               dk.DenseParams(4, 3, 5, 1, True), dk.DenseParams(8, 2, 1, 1, True)],
                         ids=lambda p: f"V{p.lanes}xNV{p.nvec}_MT{p.mtile}_KU{p.kunroll}_{'p' if p.parallel else 's'}")
def test_every_tiling_is_correct(p):
    """Tile shapes other than the defaults: AVX-512-wide tiles (run on any x86 LLVM legalizes
    the vector width), remainder tiles in both directions, serial and parallel outer loop."""
    rng = np.random.default_rng(3)
    for m, n, k in [(1, 70, 20), (11, 45, 36), (20, 16, 8)]:
        if k % p.kunroll:
            continue
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((n, k)).astype(np.float32)
        f, _ = dk.build(m, n, k, "none", X86_512 if _host_can_avx512() else X86, p)
        y = _run(f, dk.kernel_args(x, w, None, p), m, n)
        np.testing.assert_allclose(y, dk.reference(x, w), rtol=1e-5, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        dk.make_primfunc(1, 8, 8, "gelu", X86)
    with pytest.raises(ValueError, match="unroll"):
        dk.make_primfunc(1, 8, 6, "none", X86, dk.DenseParams(8, 1, 1, 4, False))
    with pytest.raises(ValueError, match="stack"):
        dk.make_primfunc(1, 512, 8, "none", X86, dk.DenseParams(16, 16, 1, 1, False))


# ------------------------------------------------------------------ aarch64 (build only)


def test_aarch64_neon_codegen():
    import tvm

    tgt = tvm.target.Target(ARM)
    p = dk.kernel_params(6, 40, 32, tgt)
    assert p.lanes == 4 and p.width == 16
    f = dk.make_primfunc(6, 40, 32, "relu", tgt, p).with_attr("global_symbol", "dense_kernel")
    with tgt:
        lib = tvm.compile(tvm.IRModule({"dense_kernel": f}), target=tgt)
    asm = lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")
    assert "fmla" in asm and ".4s" in asm  # NEON vector FMAs
    assert "fmax" in asm  # fused ReLU


# ------------------------------------------------------------------ importer converters


def _model(nodes, inputs, outputs, inits, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _ort(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _compile_and_run(model, feeds, tmp_path, target=X86):
    from targets import tvm_backend

    mod = tvm_backend.import_onnx(model, target=target)
    kernels = sorted(gv.name_hint for gv in mod.functions if gv.name_hint.startswith("dense_packed"))
    tvm_backend.compile_library(mod, target, tmp_path / "m.so")
    return mod, kernels, tvm_backend.run_library(tmp_path / "m.so", feeds)


def test_imported_layers_use_the_kernel_and_match_onnxruntime(tmp_path):
    """MatMul on a 3-D activation (flattened rows, transformer style) -> Relu -> Gemm with
    transB/alpha/beta/C; an activation x activation MatMul (attention scores) and a Gemm
    with a row-dependent C fall back to the frontend; two MatMuls on one weight share it."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((20, 24)).astype(np.float32)  # MatMul B [K, N]
    w2 = rng.standard_normal((9, 24)).astype(np.float32)  # Gemm B [N, K], transB=1
    c2 = rng.standard_normal(9).astype(np.float32)
    c3 = rng.standard_normal((6, 9)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("Reshape", ["hr", "shp"], ["h2"]),
        helper.make_node("Gemm", ["h2", "W2", "C2"], ["y"], name="fc2", transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Gemm", ["h2", "W2", "C3"], ["y3"], name="fc3", transB=1),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["att"], name="scores"),
        helper.make_node("MatMul", ["x", "W1"], ["h_again"], name="fc1_shared"),
    ]
    model = _model(nodes, [_vi("x", [2, 3, 20])],
                   [_vi("y", [6, 9]), _vi("y3", [6, 9]), _vi("att", [2, 3, 3]), _vi("h_again", [2, 3, 24])],
                   {"W1": w1, "W2": w2, "C2": c2, "C3": c3, "shp": np.array([6, 24], np.int64)})
    feeds = {"x": rng.standard_normal((2, 3, 20)).astype(np.float32)}
    mod, kernels, out = _compile_and_run(model, feeds, tmp_path)
    assert dk.module_stats(mod) == {"dense_kernels": 3, "dense_shared_weights": 1, "dense_fallbacks": 2}
    assert len(kernels) >= 2  # fc1 [6x20 -> 24] and fc2 [6x24 -> 9] are different kernels
    for got, want in zip(out, _ort(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", ["gemm_transB0_scalarC", "gemm_noC", "matmul_vector", "gemm_transA"])
def test_gemm_and_matmul_variants(case, tmp_path):
    rng = np.random.default_rng(1)
    k, n = 12, 10
    if case == "matmul_vector":  # [K] @ [K, N] -> [N]
        w = rng.standard_normal((k, n)).astype(np.float32)
        model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", [k])], [_vi("y", [n])], {"W": w})
        feeds = {"x": rng.standard_normal(k).astype(np.float32)}
        want = {"dense_kernels": 1, "dense_shared_weights": 0, "dense_fallbacks": 0}
    elif case == "gemm_transA":
        w = rng.standard_normal((k, n)).astype(np.float32)
        model = _model([helper.make_node("Gemm", ["x", "W"], ["y"], transA=1)], [_vi("x", [k, 3])], [_vi("y", [3, n])],
                       {"W": w})
        feeds = {"x": rng.standard_normal((k, 3)).astype(np.float32)}
        want = {"dense_kernels": 0, "dense_shared_weights": 0, "dense_fallbacks": 1}
    else:
        w = rng.standard_normal((k, n)).astype(np.float32)  # transB=0: B is [K, N]
        inits = {"W": w}
        ins = ["x", "W"]
        if case == "gemm_transB0_scalarC":
            inits["C"] = np.array([1.25], np.float32)
            ins.append("C")
        model = _model([helper.make_node("Gemm", ins, ["y"], alpha=-1.5, beta=0.5)], [_vi("x", [4, k])],
                       [_vi("y", [4, n])], inits)
        feeds = {"x": rng.standard_normal((4, k)).astype(np.float32)}
        want = {"dense_kernels": 1, "dense_shared_weights": 0, "dense_fallbacks": 0}
    mod, kernels, out = _compile_and_run(model, feeds, tmp_path)
    assert dk.module_stats(mod) == want
    assert bool(kernels) == bool(want["dense_kernels"])
    np.testing.assert_allclose(out[0], _ort(model, feeds)[0], rtol=1e-5, atol=1e-4)


def test_non_float32_weight_falls_back(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 5))
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [_vi("x", [2, 6], TensorProto.DOUBLE)],
                   [_vi("y", [2, 5], TensorProto.DOUBLE)], {"W": w})
    from targets import tvm_backend

    mod = tvm_backend.import_onnx(model, target=X86)
    assert dk.module_stats(mod) == {"dense_kernels": 0, "dense_shared_weights": 0, "dense_fallbacks": 1}


def test_no_converters_for_cuda():
    converters, state = dk.relax_converters(CUDA)
    assert converters == {} and state.kernels == 0


def test_runtime_threads_keep_an_explicit_setting(monkeypatch):
    monkeypatch.setenv("TVM_NUM_THREADS", "3")
    dk.default_runtime_threads()
    import os

    assert os.environ["TVM_NUM_THREADS"] == "3"
    monkeypatch.delenv("TVM_NUM_THREADS")
    dk.default_runtime_threads()
    assert int(os.environ["TVM_NUM_THREADS"]) == dk.physical_cores() >= 1
