"""lower.sparse on QDQ int8 models: block-sparse int8 MatMuls become compressor::SparseQMatMul, verified by
onnxruntime through the op's reference body, and the x86 bundle runs them in the TVM artifact."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from compressor import runtime
from compressor.pass_base import PassContext

pytest.importorskip("tvm")
WIDTH = 256


@pytest.fixture(scope="module")
def qdq_mlp(tmp_path_factory):
    """A 3 x 256 MLP (MatMul + Relu) with 90% of its 16x4 weight blocks zero, quantized by onnxruntime
    (static QDQ, per-channel int8 weights, uint8 activations)."""
    from bench.sparse_int8 import mlp_weights, onnx_mlp, ort_int8

    d = tmp_path_factory.mktemp("qdq")
    rng = np.random.default_rng(0)
    fp = onnx_mlp(mlp_weights(WIDTH, 3, 0.9, rng), d / "mlp.onnx")
    calib = rng.standard_normal((32, WIDTH)).astype(np.float32)
    np.savez(d / "calib.npz", x=calib)
    return fp, ort_int8(fp, calib, d / "mlp.int8.onnx"), d


def _lower(model_path, tag="x86"):
    import targets
    from targets.lower_sparse import LowerSparse, LowerSparseConfig

    model = onnx.load(str(model_path))
    _, spec = targets.resolve(tag)
    g = gs.import_onnx(model)
    res = LowerSparse(LowerSparseConfig()).run(g, PassContext(target=spec, opset=g.opset, template=model))
    return gs.export_onnx(g), res


def test_qdq_block_sparse_matmuls_lower_to_int8_ops(qdq_mlp):
    _, q8, _ = qdq_mlp
    lowered, res = _lower(q8)
    ops = [n.op_type for n in lowered.graph.node if n.domain == "compressor"]
    int8 = [L for L in res.stats["layers"] if L.get("precision") == "int8"]
    assert len(int8) == 3 and all(L["lowered"] and L["block"] in ("16x4", "8x4") for L in int8)
    assert ops == ["SparseQMatMul"] * 3  # the Relus follow the output QDQ pair: not fused
    # onnxruntime runs the reference bodies: the lowered model computes what the QDQ model does
    x = {"x": np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32)}
    want = runtime.session(onnx.load(str(q8))).run(None, x)[0]
    got = runtime.session(lowered).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # ... from the stored arrays: a wrong zero-point correction changes the outputs
    node = next(n for n in lowered.graph.node if n.op_type == "SparseQMatMul")
    corr = next(t for t in lowered.graph.initializer if t.name == node.input[5])
    arr = onnx.numpy_helper.to_array(corr).copy()
    arr[0] += 1000
    corr.CopyFrom(onnx.numpy_helper.from_array(arr, corr.name))
    bad = runtime.session(lowered).run(None, x)[0]
    assert np.abs(bad - want).max() > 1e-3


def test_unstructured_int8_stays_with_onnxruntime(qdq_mlp, tmp_path):
    """Unstructured zeros leave almost every 16x4 block non-empty: no int8 kernel, a warning saying which
    pattern would do, and the pipeline keeps the quantized model on onnxruntime."""
    from bench.sparse_int8 import onnx_mlp, ort_int8
    from targets.lower_sparse import int8_sparse_candidates

    rng = np.random.default_rng(2)
    ws = [(rng.standard_normal((WIDTH, WIDTH)) * (rng.random((WIDTH, WIDTH)) > 0.9)).astype(np.float32)
          for _ in range(2)]
    q8 = ort_int8(onnx_mlp(ws, tmp_path / "u.onnx"), rng.standard_normal((16, WIDTH)).astype(np.float32),
                  tmp_path / "u8.onnx")
    _, res = _lower(q8)
    assert res.stats["lowered"] == 0 and any("--pattern" in w for w in res.warnings)
    import targets

    assert int8_sparse_candidates(onnx.load(str(q8)), targets.resolve("x86")[1].tvm_target) == []
    assert len(int8_sparse_candidates(onnx.load(str(_qdq_path(qdq_mlp))), targets.resolve("x86")[1].tvm_target)) == 3
    # arm (generic kernel) and arm-a76 (sdot, 4x4 blocks): 16x4 zeros are 4x4 zeros too
    for tag in ("arm", "arm-a76"):
        assert len(int8_sparse_candidates(onnx.load(str(_qdq_path(qdq_mlp))), targets.resolve(tag)[1].tvm_target)) == 3


def _qdq_path(qdq_mlp):
    return qdq_mlp[1]


@pytest.mark.slow
@pytest.mark.parametrize("tag", ["x86", "x86-avx2"])
def test_cli_sparse_int8_bundle_runs_int8_kernels(qdq_mlp, cli, tag):
    """--sparsity with a 16x4 pattern and --quantize int8: the x86 bundle is compiled (not shipped to
    onnxruntime), its artifact runs the int8 kernels and matches the quantized model (compile gate)."""
    fp, _, d = qdq_mlp
    out = d / f"b.{tag}"
    r = cli(fp, "--target", tag, "--sparsity", "0.9", "--pattern", "16x4", "--quantize", "int8", "--calib",
            d / "calib.npz", "--no-gate", "--force", "-o", out)
    assert r.code == 0, r
    rep = json.loads((out / "report.json").read_text())
    assert rep["runtime"]["name"] in ("tvm", "onnxruntime") and "int8 layer(s)" in json.dumps(rep)
    layers = [L for p in rep["target_passes"] if p["name"] == "lower.sparse" for L in p["stats"]["layers"]]
    int8 = [L for L in layers if L.get("precision") == "int8" and L["lowered"]]
    assert len(int8) >= 2  # the hidden layers (the last one may be kept fp32 by quantize.int8)
    checks = {(c["candidate"], c["reference"]): c for c in rep["verification"]}
    art = [c for k, c in checks.items() if k[0].startswith("artifact") and k[1] == "compressed.onnx"]
    assert art and all(c["passed"] for c in art), art  # the artifact ran here and matches the QDQ model


@pytest.mark.parametrize("relu", [False, True])
def test_int8_op_reference_and_tvm_kernel_agree_with_the_oracle(tmp_path, relu):
    """One compressor::SparseQMatMul[Relu] node: onnxruntime's run of its reference body and the x86 TVM
    build both equal targets.sparse_int8's oracle (batch 3, 3-D input)."""
    from onnx import TensorProto, helper

    import targets
    from compressor.sparse_ops import DOMAIN, QMATMUL, QMATMUL_RELU
    from targets import sparse_int8 as si
    from targets import tvm_backend
    from targets.lower_sparse import reference_function
    from targets.sparse_int8 import variant_for

    _, spec = targets.resolve("x86")
    r = si.BLOCK_ROWS.get(variant_for(spec.tvm_target), 4)
    rng = np.random.default_rng(4)
    n, k = 64, 128
    w = rng.standard_normal((n, k)).astype(np.float32) * np.repeat(np.repeat(rng.random((n // r, k // 4)) < 0.3, r, 0), 4, 1)
    wq, sw = si.quantize_weight(w)
    b = si.to_bsr_int8(wq, sw, r)
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    sx, zx = 0.02, 131
    bias = rng.standard_normal(n).astype(np.float32)
    scale, corr, bias_ = si.epilogue_args(b, sx, zx, bias)
    op = QMATMUL_RELU if relu else QMATMUL
    inits = [onnx.numpy_helper.from_array(a, nm) for a, nm in (
        (b.data, "data"), (b.indices, "indices"), (b.indptr, "indptr"), (scale, "scale"), (corr, "corr"), (bias_, "bias"),
        (np.array(sx, np.float32), "xs"), (np.array(zx, np.uint8), "xz"))]
    node = helper.make_node(op, ["X", "data", "indices", "indptr", "scale", "corr", "bias", "xs", "xz"], ["Y"],
                            domain=DOMAIN)
    g = helper.make_graph([node], "q", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3, n])], inits)
    model = helper.make_model(g, functions=[reference_function(op, 17)],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    path = tmp_path / "q.onnx"
    onnx.save(model, str(path))
    xq = np.clip(np.rint(x[0] / np.float32(sx)) + zx, 0, 255).astype(np.uint8)
    want = si.reference(xq, b, sx, zx, bias, relu=relu)[None]
    got = runtime.session(model).run(None, {"X": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    if not spec.runs_here:
        pytest.skip("the host cannot run its own x86 target code")
    mod = tvm_backend.import_onnx(path, {"X": [1, 3, k]}, target=spec.tvm_target)
    lib = tmp_path / "q.so"
    tvm_backend.compile_library(mod, spec.tvm_target, lib)
    out = tvm_backend.run_library(lib, {"X": x})[0]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.emulated
@pytest.mark.slow
def test_arm_int8_sparse_bundle_runs_under_qemu(qdq_mlp, cli):
    """arm-a76 (sdot): quantize.int8 writes int8 activations for aarch64; the bundle's int8 sparse kernels
    pass the self-check in the aarch64 guest, and execute fewer instructions than the dense int8 twin
    (the same int8 kernel with every block stored)."""
    from compressor.errors import DependencyError
    from targets import device_qemu

    try:
        device_qemu.prepare()
    except DependencyError as exc:
        pytest.skip(f"no aarch64 guest under qemu: {exc.one_line()}")
    fp, _, d = qdq_mlp
    out = d / "b.arm"
    r = cli(fp, "--target", "arm-a76", "--sparsity", "0.9", "--pattern", "16x4", "--quantize", "int8", "--calib",
            d / "calib.npz", "--no-gate", "--force", "-o", out)
    assert r.code == 0, r
    rep = json.loads((out / "report.json").read_text())
    int8 = [L for p in rep["target_passes"] if p["name"] == "lower.sparse" for L in p["stats"]["layers"]
            if L.get("precision") == "int8" and L["lowered"]]
    assert int8 and all(L["kernel"] == "int8 sdot" for L in int8)
    bj = d / "bench.json"
    r = cli("bench", out, "--device", "qemu-aarch64", "--json", bj)
    assert r.code == 0, r
    b = json.loads(bj.read_text())
    # 1.39x at this width (the quantize / dequantize code between the layers is the same in both); 7.5x on the
    # 4 x 2048 MLP (bench/sparse_int8.md)
    assert b["passed"] and b["dense_twin"]["passed"] and b["insns"]["dense_over_sparse"] > 1.2


def test_dynamic_int8_matmuls_lower_and_run(qdq_mlp, tmp_path):
    """onnxruntime's dynamic int8 MatMul (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul, what
    quantize.int8 picks for transformer MatMuls) with block-sparse weights -> compressor::SparseDQMatMul: the
    reference body reproduces the dynamic model, and the x86 build (X quantized once per tensor by the
    dynamic_quantize kernel) matches it."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import targets
    from targets import tvm_backend

    fp, _, d = qdq_mlp
    dyn = tmp_path / "dyn.onnx"
    quantize_dynamic(str(fp), str(dyn), weight_type=QuantType.QInt8, per_channel=True)
    lowered, res = _lower(dyn)
    ops = [n.op_type for n in lowered.graph.node if n.domain == "compressor"]
    assert ops == ["SparseDQMatMul"] * 3 and not any(n.op_type == "MatMulInteger" for n in lowered.graph.node)
    assert all(L["precision"] == "int8 dynamic" for L in res.stats["layers"] if L["lowered"])
    xs = np.random.default_rng(3).standard_normal((4, 1, WIDTH)).astype(np.float32)
    ref_s, low_s = runtime.session(onnx.load(str(dyn))), runtime.session(lowered)
    for x in xs:
        want = ref_s.run(None, {"x": x})[0]
        np.testing.assert_allclose(low_s.run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    _, spec = targets.resolve("x86")
    if not spec.runs_here:
        pytest.skip("the host cannot run its own x86 target code")
    path = tmp_path / "lowered.onnx"
    onnx.save(lowered, str(path))
    lib = tmp_path / "l.so"
    tvm_backend.compile_library(tvm_backend.import_onnx(path, {"x": [1, WIDTH]}, target=spec.tvm_target),
                                spec.tvm_target, lib)
    for x in xs:
        want = ref_s.run(None, {"x": x})[0]
        got = tvm_backend.run_library(lib, {"x": x})[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_dense_int8_layers_join_when_the_model_goes_to_tvm(tmp_path):
    """One block-sparse int8 layer sends the model to TVM; its dense int8 layers then run the same kernel
    with every block stored (not TVM's generic dequantize code), and the lowered graph still matches."""
    from bench.sparse_int8 import mlp_weights, onnx_mlp, ort_int8

    rng = np.random.default_rng(8)
    sparse = mlp_weights(WIDTH, 1, 0.9, rng)[0]
    dense = mlp_weights(WIDTH, 1, 0.0, rng)[0]
    q8 = ort_int8(onnx_mlp([sparse, dense, sparse], tmp_path / "m.onnx"),
                  rng.standard_normal((16, WIDTH)).astype(np.float32), tmp_path / "m8.onnx")
    lowered, res = _lower(q8)
    layers = [L for L in res.stats["layers"] if L.get("precision") == "int8"]
    assert len(layers) == 3 and all(L["lowered"] for L in layers)
    assert [L["stored_density"] == 1.0 for L in layers] == [False, True, False]
    assert "dense: every block" in layers[1]["kernel"]
    x = {"x": rng.standard_normal((1, WIDTH)).astype(np.float32)}
    want = runtime.session(onnx.load(str(q8))).run(None, x)[0]
    np.testing.assert_allclose(runtime.session(lowered).run(None, x)[0], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
