"""quantize.fp16: IO types kept, weights fp16, block-list honoured, zeros preserved, close to fp32."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.errors import UsageError
from compressor.pass_base import make_config
from passes import PASSES
from passes import quant_common as qc
from tests.conftest import conv_bn_model, make_model, mlp_model, ort_run
from tests.passes.test_quantize_int8 import feeds_for, layer_weights, run_passes


def softmax_mlp() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((16, 32)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Softmax", ["h"], ["y"], name="sm", axis=-1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)


def io_types(model):
    return [vi.type.tensor_type.elem_type for vi in list(model.graph.input) + list(model.graph.output)]


def test_io_types_kept_weights_fp16_and_close():
    m = conv_bn_model()
    feeds = feeds_for(m, 8)
    out, recs = run_passes(m, [("cleanup.fold_batchnorm", {}), ("quantize.fp16", {})], feeds)
    onnx.checker.check_model(out, full_check=True)
    assert io_types(out) == io_types(m) == [TensorProto.FLOAT, TensorProto.FLOAT]
    inits = {t.name: t for t in out.graph.initializer}
    for w in layer_weights(out).values():
        assert inits[w].data_type == TensorProto.FLOAT16
    for f in feeds:
        got, ref = ort_run(out, f)[0], ort_run(m, f)[0]
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    st = recs[-1].stats
    assert st["io_types_kept"] and st["initializer_bytes_after"] < 0.6 * st["initializer_bytes_before"]
    assert any("fp16 on a CPU target" in w for w in recs[-1].warnings)


def test_op_block_list_keeps_sensitive_ops_fp32():
    out, recs = run_passes(softmax_mlp(), [("quantize.fp16", {})])
    sm = next(n for n in out.graph.node if n.op_type == "Softmax")
    # the Softmax is fed through a Cast back to float32 (blocked by default)
    producer = next(n for n in out.graph.node if sm.input[0] in n.output)
    assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT
    assert "Softmax" in recs[-1].stats["op_types_blocked"]
    out, _ = run_passes(mlp_model(), [("quantize.fp16", {"op_block_list": ["MatMul"]})])
    assert {t.name: t.data_type for t in out.graph.initializer}["w1"] == TensorProto.FLOAT


def test_zeros_preserved():
    m = mlp_model()
    seq = [("sparsify.magnitude", {"sparsity": 0.7, "keep_classifier": False}), ("quantize.fp16", {})]
    sparse, _ = run_passes(m, seq[:1])
    out, recs = run_passes(m, seq)
    before = {t.name: numpy_helper.to_array(t) for t in sparse.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for name in ("w1", "w2"):
        assert after[name].dtype == np.float16
        assert np.all(after[name][before[name] == 0] == 0)
    sp = recs[-1].stats["sparsity"]
    assert sp["zeros_preserved"] and sp["sparsity_after"] == pytest.approx(sp["sparsity_before"], abs=1e-6)


def test_keep_fp32_auto_and_config():
    m = mlp_model()
    out, recs = run_passes(m, [("quantize.fp16", {"keep_fp32": "auto", "min_cosine": 1.0})], feeds_for(m, 8))
    st = recs[-1].stats["keep_fp32"]
    # cosine 1.0 exactly is only reachable with every layer fp32, or when fp16 changes nothing
    assert st["target_met"] == (st["fidelity_min_cosine"] >= 1.0)
    assert qc.fidelity([ort_run(out, f) for f in feeds_for(m, 8)], [ort_run(m, f) for f in feeds_for(m, 8)]) > 0.999
    with pytest.raises(UsageError):
        make_config(PASSES.get("quantize.fp16"), {"keep_fp32": "yes"})


def test_fp16_on_x86_runs_in_onnxruntime_but_tvm_on_cuda():
    import targets

    out, _ = run_passes(mlp_model(), [("quantize.fp16", {})])
    assert qc.choose_runtime(out, targets.resolve("x86")[1])["name"] == "onnxruntime"
    assert qc.choose_runtime(out, targets.resolve("cuda")[1])["name"] == "tvm"
