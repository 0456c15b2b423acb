"""quantize.int4: MatMulNBits packing round trip (unpacked codes match the kernel, error <= s/2),
Gemm rewrite exactness, zeros preserved, com.microsoft domain imported."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from compressor.errors import UsageError
from compressor.pass_base import make_config
from passes import PASSES
from passes import quant_common as qc
from passes.quantize_int4 import gemm_to_matmul
from tests.conftest import conv_bn_model, make_model, ort_run
from tests.passes.test_quantize_int8 import run_passes


def matmul_model(k: int, n: int, seed: int = 0, zeros: float = 0.0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    if zeros:
        w[rng.random(w.shape) < zeros] = 0.0
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])], {"w": w})


def gemm_model(seed: int = 0, beta: float = 0.5) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = {"fc_w": rng.standard_normal((24, 64)).astype(np.float32), "fc_b": rng.standard_normal(24).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "fc_w", "fc_b"], ["y"], name="fc", transB=1, beta=beta)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 64])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])], inits)


def nbits(model):
    inits = {t.name: t for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits")
    return node, qc.unpack_matmulnbits(node, inits)


@pytest.mark.parametrize("k,block,symmetric", [(64, 32, False), (64, 16, True), (40, 32, False), (96, 64, False)])
def test_packing_round_trip(k, block, symmetric):
    m = matmul_model(k, 48)
    w = onnx.numpy_helper.to_array(m.graph.initializer[0])
    out, recs = run_passes(m, [("quantize.int4", {"block_size": block, "symmetric": symmetric})])
    node, (codes, zp, sc) = nbits(out)
    assert codes.shape == w.shape and codes.max() <= 15
    deq = (codes.astype(np.float32) - zp) * sc
    # 4-bit round to nearest: every weight within half a step |s| / 2 of its block. Symmetric
    # blocks map the largest-magnitude value to -8 (negative scale for positive maxima), so
    # opposite-sign values near that magnitude clip at code 15 (+7 steps): bound |s| there.
    bound = np.abs(sc) / 2
    if symmetric:
        bound = np.where(codes == 15, np.abs(sc), bound)
    else:
        assert np.all(sc > 0)
    assert np.all(np.abs(deq - w) <= bound * (1 + 1e-4) + 1e-7)
    # the kernel computes x @ deq: our unpacking reads the packing the way onnxruntime does
    x = np.random.default_rng(1).standard_normal((2, k)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], x @ deq, rtol=1e-4, atol=1e-4)
    assert qc.domain_opsets(out).get("com.microsoft") == 1
    st = recs[-1].stats
    assert st["quantized_ops"] == {"com.microsoft.MatMulNBits": 1}
    kb = -(-k // block)  # K is padded to whole blocks
    packed = 48 * kb * block // 2 + 48 * kb * 4 + (0 if symmetric else 48 * -(-kb // 2))
    assert (st["weight_bytes_fp32"], st["weight_bytes_int4"]) == (k * 48 * 4, packed)


def test_gemm_rewrite_is_exact_and_quantized():
    m = gemm_model()
    g = gs.import_onnx(m)
    gemm_to_matmul(g, g.nodes[0])
    rewritten = gs.export_onnx(g.cleanup().toposort())
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(ort_run(rewritten, {"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)
    out, _ = run_passes(m, [("quantize.int4", {})])
    node, (codes, zp, sc) = nbits(out)
    deq = (codes.astype(np.float32) - zp) * sc  # [K, N] = fc_w^T
    b = onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "fc_b"))
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], x @ deq + 0.5 * b, rtol=1e-4, atol=1e-4)


def test_zeros_preserved():
    m = matmul_model(128, 32, zeros=0.8)
    w = onnx.numpy_helper.to_array(m.graph.initializer[0])
    out, recs = run_passes(m, [("quantize.int4", {"block_size": 32})])
    _, (codes, zp, sc) = nbits(out)
    assert np.all(codes[w == 0] == zp[w == 0])
    sp = recs[-1].stats["sparsity"]
    assert sp["zeros_preserved"] and sp["sparsity_after"] >= sp["sparsity_before"] > 0.75


def test_conv_model_left_float_with_warning_and_config_errors():
    out, recs = run_passes(conv_bn_model(), [("cleanup.fold_batchnorm", {}), ("quantize.int4", {})])
    assert recs[-1].stats["quantized_ops"] == {"com.microsoft.MatMulNBits": 1}  # only the classifier Gemm (K=8 padded)
    assert any("Conv layer(s) kept float" in w for w in recs[-1].warnings)
    for bad in (24, 8):
        with pytest.raises(UsageError):
            make_config(PASSES.get("quantize.int4"), {"block_size": bad})
