"""Cleanup passes: exact oracles (outputs unchanged), structure checked."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from compressor import ir
from compressor.pass_base import PassContext
from compressor.pass_manager import PassManager, check_model
from passes import CLEANUP_PIPELINE, PASSES
from tests.conftest import conv_bn_model, make_model, ort_run


def run_passes(model, names):
    ps = [(PASSES.get(n)(), "builtin:test") for n in names]
    return PassManager(ps).run(model, PassContext())


def test_cleanup_pipeline_keeps_outputs_and_removes_bn_identity_dropout():
    m = conv_bn_model()
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = ort_run(m, {"x": x})[0]
    out, recs = run_passes(m, CLEANUP_PIPELINE)
    ops = [n.op_type for n in out.graph.node]
    assert "BatchNormalization" not in ops and "Identity" not in ops and "Dropout" not in ops
    assert ops == ["Conv", "Relu", "GlobalAveragePool", "Flatten", "Gemm"]
    got = ort_run(out, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert [o.name for o in out.graph.output] == ["y"]
    stats = {r.name: r.stats for r in recs}
    assert stats["cleanup.fold_batchnorm"]["folded"] == 1
    assert stats["cleanup.remove_identity"]["removed"] == 2


def test_fold_bn_into_gemm_with_alpha_beta():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((6, 5)).astype(np.float32), "c": rng.standard_normal(5).astype(np.float32),
             "g": (rng.random(5) + .5).astype(np.float32), "be": rng.standard_normal(5).astype(np.float32),
             "mu": rng.standard_normal(5).astype(np.float32), "var": (rng.random(5) + .5).astype(np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["h"], alpha=0.7, beta=1.3),
             helper.make_node("BatchNormalization", ["h", "g", "be", "mu", "var"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])], inits)
    x = rng.standard_normal((2, 6)).astype(np.float32)
    out, _ = run_passes(m, ["cleanup.fold_batchnorm"])
    assert [n.op_type for n in out.graph.node] == ["Gemm"]
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(m, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_bn_after_shared_conv_output_is_kept_and_reported():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 2, 1, 1)).astype(np.float32), "g": np.ones(4, np.float32),
             "be": np.zeros(4, np.float32), "mu": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"]),
             helper.make_node("Add", ["bn", "c"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3, 3])], inits)
    out, recs = run_passes(m, ["cleanup.fold_batchnorm"])
    assert "BatchNormalization" in [n.op_type for n in out.graph.node]
    assert recs[0].stats == {"folded": 0, "kept": 1}
    assert "other readers" in recs[0].warnings[0]


def test_identity_feeding_graph_output_is_removed_and_output_name_kept():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], {})
    out, _ = run_passes(m, ["cleanup.remove_identity"])
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert out.graph.output[0].name == "y"
    x = np.array([-1, 2], np.float32)
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], [0, 2])


def test_constant_nodes_lifted_and_folded_at_load(tmp_path):
    # Shape -> Gather -> Reshape chain plus a Constant node: all foldable with static shapes
    nodes = [
        helper.make_node("Constant", [], ["two"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0])),
        helper.make_node("Mul", ["x", "two"], ["m"]),
        helper.make_node("Shape", ["m"], ["s"]),
        helper.make_node("Reshape", ["m", "s"], ["y"]),
    ]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], {})
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    loaded = ir.load(p)
    ops = [n.op_type for n in loaded.graph.node]
    assert "Constant" not in ops and "Shape" not in ops
    assert any(i.name == "two" for i in loaded.graph.initializer)
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(ort_run(loaded, {"x": x})[0], 2 * x)


def test_dead_code_removed():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["unused"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], {})
    out, recs = run_passes(m, ["cleanup.dead_code"])
    assert [n.op_type for n in out.graph.node] == ["Relu"]
    assert recs[0].stats["nodes_removed"] == 1
    check_model(out, "test")


def _if_model(cond_const: bool | None):
    """h = relu(x @ w1); y = If(cond, then: relu(h @ w_then) [w_then a branch initializer],
    else: h @ w_else [w_else an outer initializer read only by the branch]); with a constant
    condition the then branch also has two outputs, one of them read inside the branch."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    V = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_then"], ["t0"]), helper.make_node("Relu", ["t0"], ["t1"]),
                                helper.make_node("Add", ["t1", "t1"], ["t2"])], "then", [],
                               [V("t1", TensorProto.FLOAT, [1, 8]), V("t2", TensorProto.FLOAT, [1, 8])],
                               [onnx.numpy_helper.from_array(f(16, 8), "w_then")])
    else_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_else"], ["e1"]), helper.make_node("Neg", ["e1"], ["e2"])],
                               "else", [], [V("e1", TensorProto.FLOAT, [1, 8]), V("e2", TensorProto.FLOAT, [1, 8])])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("If", ["c"], ["y", "z"], name="branch", then_branch=then_g, else_branch=else_g)]
    inits = {"w1": f(16, 16), "w_else": f(16, 8)}
    inputs = [V("x", TensorProto.FLOAT, [1, 16])]
    if cond_const is None:
        inputs.append(V("c", TensorProto.BOOL, []))
    else:
        inits["c"] = np.array(cond_const)
    return make_model(nodes, inputs, [V("y", TensorProto.FLOAT, [1, 8]), V("z", TensorProto.FLOAT, [1, 8])], inits)


def test_cleanup_keeps_what_if_branches_read():
    m = _if_model(None)
    source = m.SerializeToString()
    out, _ = run_passes(m, CLEANUP_PIPELINE)
    assert m.SerializeToString() == source  # the input model is not touched
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Relu", "If"]
    # w_else (read only by the else branch) may move into that branch's initializers; it must not vanish
    everywhere = {i.name for i in out.graph.initializer} | {i.name for a in out.graph.node[2].attribute for i in a.g.initializer}
    assert {"w1", "w_else", "w_then"} <= everywhere
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        for got, ref in zip(ort_run(out, feeds), ort_run(m, feeds)):
            np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_fold_constants_flattens_a_constant_if():
    """The taken branch replaces the If; a branch output also read inside the branch stays wired."""
    x = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    for c in (True, False):
        m = _if_model(c)
        source = m.SerializeToString()
        out, _ = run_passes(m, ["cleanup.fold_constants", "cleanup.dead_code"])
        assert m.SerializeToString() == source  # flattening renames the branch's tensors in the copy only
        assert "If" not in [n.op_type for n in out.graph.node]
        for got, ref in zip(ort_run(out, {"x": x}), ort_run(m, {"x": x})):
            np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_fold_constants_keeps_graph_outputs_that_fold_to_constants():
    V = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.ones((1, 4), np.float32), "kv")),
                                helper.make_node("Relu", ["k"], ["t"])], "then", [], [V("t", TensorProto.FLOAT, [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [V("e", TensorProto.FLOAT, [1, 4])])
    for cond in ([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("ReduceProd", ["s"], ["n"], keepdims=0),
                  helper.make_node("Greater", ["n", "zero"], ["c"])], []):
        nodes = cond + [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)]
        inputs = [V("x", TensorProto.FLOAT, [1, 4])] + ([] if cond else [V("c", TensorProto.BOOL, [])])
        m = make_model(nodes, inputs, [V("y", TensorProto.FLOAT, [1, 4])], {"zero": np.array(0, np.int64)})
        out, _ = run_passes(m, CLEANUP_PIPELINE)  # the final check_model raises if y lost its producer
        feeds = {"x": np.full((1, 4), 3, np.float32), **({} if cond else {"c": np.array(True)})}
        np.testing.assert_array_equal(ort_run(out, feeds)[0], np.ones((1, 4), np.float32))


def test_ir3_initializers_listed_as_inputs_dropped_at_load(tmp_path):
    m = conv_bn_model()
    m.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in m.graph.initializer)
    m.ir_version = 3
    m.opset_import[0].version = 9
    p = tmp_path / "ir3.onnx"
    p.write_bytes(m.SerializeToString())
    loaded = ir.load(p)
    assert [i.name for i in loaded.graph.input] == ["x"] and loaded.ir_version >= 7
    out, recs = run_passes(loaded, CLEANUP_PIPELINE)  # adds "<w>_bnfold" initializers: valid without input entries
    assert {r.name: r.stats for r in recs}["cleanup.fold_batchnorm"]["folded"] == 1
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"x": x})[0], ort_run(conv_bn_model(), {"x": x})[0], rtol=1e-4, atol=1e-5)
