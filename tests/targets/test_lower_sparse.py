"""lower.sparse: BSR rewrite verified by onnxruntime (model-local reference function) and by
the TVM x86 build (TIR kernels), cost-model decisions, config validation, pipeline wiring."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import UsageError
from tests.targets.lower_sparse_util import Spec, check_tvm_build, lower, run_ort
from targets.lower_sparse import DOMAIN, LowerSparseConfig, predicted_ratio

def _model(m=2, k=256, n=128, n2=64):
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((n, k)) * np.kron(rng.random((n // 8, k)) < 0.1, np.ones((8, 1)))).astype(np.float32)
    b1 = rng.standard_normal(n).astype(np.float32)
    w2 = (rng.standard_normal((n, n2)) * (rng.random((n, n2)) < 0.1)).astype(np.float32)  # MatMul [K, N]
    b2 = rng.standard_normal(n2).astype(np.float32)
    w3 = rng.standard_normal((n2, 10)).astype(np.float32)  # dense: never lowered
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], transB=1, alpha=0.5),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "W2"], ["mm"]),
         helper.make_node("Add", ["mm", "B2"], ["a"]),
         helper.make_node("MatMul", ["a", "W3"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, 10])],
        [numpy_helper.from_array(a, nm) for a, nm in ((w1, "W1"), (b1, "B1"), (w2, "W2"), (b2, "B2"), (w3, "W3"))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_lowering_is_exact_under_onnxruntime_and_tvm(tmp_path):
    model = _model()
    res, out = lower(model, min_speedup=0.01)
    assert res.modified and res.stats["lowered"] == 2
    ops = [(n.op_type, n.domain) for n in out.graph.node]
    assert ops == [("SparseMatMulRelu", DOMAIN), ("SparseMatMul", DOMAIN), ("MatMul", "")]
    blocks = {r["node"]: r["block"] for r in res.stats["layers"]}
    assert blocks["h"] == "8x1" and blocks["mm"] == "1x1"
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 256)).astype(np.float32)
    ref = run_ort(model, x)
    np.testing.assert_allclose(run_ort(out, x), ref, rtol=1e-5, atol=1e-5)
    check_tvm_build(out, x, ref, tmp_path, "bsr_8x1_relu")


def test_reference_function_reads_the_bsr_arrays():
    """Corrupting indptr must change what onnxruntime computes (no hidden dense copy)."""
    model = _model()
    _, out = lower(model, min_speedup=0.01)
    x = np.random.default_rng(2).standard_normal((2, 256)).astype(np.float32)
    good = run_ort(out, x)
    for init in out.graph.initializer:
        if init.name.endswith("_indptr") and init.name.startswith("h"):
            ip = numpy_helper.to_array(init).copy()
            ip[1:-1] = ip[2:]  # shift block rows
            init.CopyFrom(numpy_helper.from_array(ip, init.name))
    assert not np.allclose(run_ort(out, x), good, atol=1e-3)


def test_cost_model_keeps_small_layers_dense_with_a_warning():
    model = _model(m=1, k=64, n=32, n2=16)
    res, out = lower(model)  # default min_speedup
    assert not res.modified
    assert all(n.domain == "" for n in out.graph.node)
    kept = [r for r in res.stats["layers"] if not r["lowered"]]
    assert len(kept) == 2 and len(res.warnings) == 2
    assert all("predicted" in w and "kept dense" in w for w in res.warnings)


def test_predicted_ratio_monotone():
    big = predicted_ratio(4096, 4096, 1, 0.1, (8, 1))
    assert big > predicted_ratio(4096, 4096, 1, 0.1, (1, 1)) > 1.0
    assert big > predicted_ratio(4096, 4096, 1, 0.3, (8, 1))
    assert predicted_ratio(64, 64, 1, 0.1, (8, 1)) < LowerSparseConfig().min_speedup


def test_config_validation():
    with pytest.raises(UsageError):
        LowerSparseConfig(block="2:4")
    with pytest.raises(UsageError):
        LowerSparseConfig(min_sparsity=1.0)
    with pytest.raises(UsageError):
        LowerSparseConfig(min_speedup=0)


def test_lower_sparse_is_target_lowering():
    """lower.sparse runs on the copy handed to the backend (the bundle's model.onnx stays standard ONNX)."""
    import targets
    from compressor.pipeline import default_pass_list
    from compressor.recipe import Options

    for tag in ("x86", "arm", "cuda"):
        assert targets.resolve(tag)[0].required_passes[-1] == "lower.sparse"
    assert "lower.sparse" not in [i["name"] for i in default_pass_list(Options(model="m.onnx", sparsity=0.9), Spec())]


@pytest.mark.slow
def test_cli_lowers_big_sparse_layers_for_x86_and_arm(cli, tmp_path):
    """End to end: 90% 8x1-block sparsity on 1024-wide layers -> BSR kernels in the artifact,
    the lowered copy verified against the compressed model, model.onnx left standard ONNX."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from tests.conftest import make_model

    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((1024, 1024)).astype(np.float32) * 0.03, "b1": rng.standard_normal(1024).astype(np.float32),
             "w2": rng.standard_normal((1024, 1024)).astype(np.float32) * 0.03, "w3": rng.standard_normal((1024, 10)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"), helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu1"), helper.make_node("MatMul", ["r", "w2"], ["h2"], name="fc2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"), helper.make_node("MatMul", ["r2", "w3"], ["y"], name="head")]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(m, tmp_path / "big.onnx")
    for target in ("x86", "arm"):
        out = tmp_path / target
        r = cli(tmp_path / "big.onnx", "--target", target, "--sparsity", "0.9", "--pattern", "8x1", "-o", out,
                "--no-gate", "--verify-samples", "4")
        assert r.code == 0, r
        rep = json.loads((out / "report.json").read_text())
        low = [t for t in rep["target_passes"] if t["name"] == "lower.sparse"][0]
        assert low["modified"], low
        comps = {(c["candidate"], c["reference"]): c for c in rep["verification"]}
        assert comps[("lowered.onnx", "compressed.onnx")]["passed"]
        assert all(n.domain in ("", "ai.onnx") for n in onnx.load(out / "model.onnx").graph.node)
        if target == "x86":
            assert comps[("artifact(x86)", "compressed.onnx")]["passed"]


def test_nodes_reading_one_weight_share_one_bsr_copy():
    """An unrolled RNN reads its recurrent weight at every step: the BSR arrays are stored once."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 256)) * np.kron(rng.random((256, 32)) < 0.1, np.ones((1, 8)))).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h1"]), helper.make_node("Tanh", ["h1"], ["t1"]),
         helper.make_node("MatMul", ["t1", "W"], ["h2"]), helper.make_node("Tanh", ["h2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    res, out = lower(model, min_speedup=0.01)
    assert res.stats["lowered"] == 2 and res.stats["bsr_shared"] == 1
    sparse_nodes = [n for n in out.graph.node if n.domain == DOMAIN]
    assert len(sparse_nodes) == 2 and sparse_nodes[0].input[1:4] == sparse_nodes[1].input[1:4]
    x = rng.standard_normal((1, 256)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, x), run_ort(model, x), rtol=1e-5, atol=1e-5)
