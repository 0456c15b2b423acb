"""Default CPU schedules of the fused functions no hand-written kernel covers
(targets/cpu_schedules.py): an encoder block's LayerNorm, attention products, Softmax, GELU
(Erf as fast_erf) and transposes all get a schedule and still match onnxruntime; fast_erf's
error against the exact erf; a rule that fails on a function leaves it alone."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _encoder_block(seq=16, heads=8, hd=64, mlp=2048) -> onnx.ModelProto:
    """x [1, seq, heads*hd] -> LayerNorm -> q = k = v = heads split -> softmax(q k^T / 8) v ->
    merge heads; a GELU (Erf form) on a [seq, mlp] activation; nothing with a weight matrix."""
    d = heads * hd
    rng = np.random.default_rng(0)
    inits = {
        "g": rng.standard_normal(d).astype(np.float32), "b": rng.standard_normal(d).astype(np.float32),
        "split": np.array([1, seq, heads, hd], np.int64), "merge": np.array([1, seq, d], np.int64),
        "scale": np.array(0.125, np.float32), "sqrt2": np.array(math.sqrt(2), np.float32),
        "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("Reshape", ["ln", "split"], ["h4"]),
        helper.make_node("Transpose", ["h4"], ["q"], perm=[0, 2, 1, 3]),  # [1, heads, seq, hd]
        helper.make_node("Transpose", ["h4"], ["kt"], perm=[0, 2, 3, 1]),  # [1, heads, hd, seq]
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["ss"]),
        helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "q"], ["o"]),  # [1, heads, seq, hd]
        helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "merge"], ["att"]),
        helper.make_node("Div", ["u", "sqrt2"], ["u1"]),
        helper.make_node("Erf", ["u1"], ["u2"]),
        helper.make_node("Add", ["u2", "one"], ["u3"]),
        helper.make_node("Mul", ["u", "u3"], ["u4"]),
        helper.make_node("Mul", ["u4", "half"], ["gelu"]),
    ]
    g = helper.make_graph(nodes, "block", [_vi("x", [1, seq, d]), _vi("u", [seq, mlp])],
                          [_vi("att", [1, seq, d]), _vi("gelu", [seq, mlp])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _ort(model, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _scheduled_fused(model, target):
    """The fused module after the schedule pass: {function name: TVMScript}."""
    import tvm

    from targets import cpu_schedules, tvm_backend

    mod = tvm_backend.import_onnx(model, target=target)
    tgt = tvm_backend.make_target(target)
    with tgt:
        mod = tvm.transform.Sequential(cpu_schedules.fuse_passes(tgt))(mod)
        mod = cpu_schedules.schedule_pass()(mod)
    out = {}
    for gv, f in mod.functions_items():
        if isinstance(f, tvm.tirx.PrimFunc):
            assert f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False)), \
                f"{gv.name_hint} left unscheduled:\n{f.script()}"
            out[gv.name_hint] = f.script()
    return out


def test_encoder_ops_all_get_a_schedule():
    from targets import tvm_backend

    rec, _ = tvm_backend.kernel_report(tvm_backend.import_onnx(_encoder_block(), target=X86))
    assert rec["fast_math"] == {"erf": 1, "softmax": 1}  # recorded in the artifact's kernel record
    scripts = _scheduled_fused(_encoder_block(), X86)
    gelu = [s for n, s in scripts.items() if "erf" in n]
    assert len(gelu) == 1 and "fast_erf" in next(n for n in scripts if "erf" in n)
    assert "T.parallel" in gelu[0] and "T.vectorized" in gelu[0]  # 32768 elements: both
    attn = [s for n, s in scripts.items() if "matmul" in n]
    assert len(attn) == 2 and all("T.vectorized" in s for s in attn)
    for name in ("layer_norm", "softmax"):  # 8192 / 2048 elements: below PARALLEL_MIN_ELEMENTS, one thread
        s = next(s for n, s in scripts.items() if name in n)
        assert "T.parallel" not in s and "T.vectorized" in s, name


def test_large_reductions_run_parallel():
    scripts = _scheduled_fused(_encoder_block(seq=128, mlp=256), X86)  # LayerNorm 65536, Softmax 131072 elements
    for name in ("layer_norm", "softmax"):
        s = next(s for n, s in scripts.items() if name in n)
        assert "T.parallel" in s and "T.vectorized" in s, name


@pytest.mark.parametrize("target", [X86, ARM], ids=["x86", "aarch64"])
def test_encoder_block_matches_onnxruntime(target, tmp_path):
    from targets import tvm_backend

    model = _encoder_block()
    rng = np.random.default_rng(1)
    feeds = {"x": rng.standard_normal((1, 16, 512)).astype(np.float32),
             "u": (3 * rng.standard_normal((16, 2048))).astype(np.float32)}
    mod = tvm_backend.import_onnx(model, target=target)
    if target is ARM:  # cross-compiled: code generation only (numerics run under qemu in test_device_qemu)
        import tvm

        tgt = tvm_backend.make_target(target)
        with tgt:
            tvm.compile(mod, target=tgt, relax_pipeline=tvm_backend.default_relax_pipeline(tgt))
        return
    tvm_backend.compile_library(mod, target, tmp_path / "m.so")
    got = tvm_backend.run_library(tmp_path / "m.so", feeds)
    for g, w in zip(got, _ort(model, feeds)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=2e-6)


_EXACT = {
    "Exp": np.exp, "Tanh": np.tanh, "Sigmoid": lambda v: 1 / (1 + np.exp(-v)),
    "Erf": np.vectorize(math.erf), "Softmax": lambda v: np.exp(v - v.max(-1, keepdims=True)) /
    np.exp(v - v.max(-1, keepdims=True)).sum(-1, keepdims=True),
}


@pytest.mark.parametrize("op,lo,hi,tol", [
    ("Exp", -20.0, 20.0, 1.5e-6), ("Exp", -80.0, 80.0, 5e-6),  # relative (one ln 2 in the range reduction)
    ("Tanh", -12.0, 12.0, 1e-6), ("Sigmoid", -30.0, 30.0, 1e-6), ("Erf", -6.0, 6.0, 5e-7),
    ("Softmax", -20.0, 20.0, 1e-6),
])
def test_fast_math_error_and_no_libm_call(op, lo, hi, tol, tmp_path):
    """targets/fast_math.py: each op compiles without a scalar libm call and stays within
    ``tol`` of the float64 function (measured: exp 1.1e-6 relative on [-20, 20], 4.1e-6 on
    [-80, 80]; the others below 1e-6 absolute)."""
    import tvm

    from targets import cpu_schedules, tvm_backend

    n = 4096
    g = helper.make_graph([helper.make_node(op, ["x"], ["y"])], op, [_vi("x", [4, n // 4])], [_vi("y", [4, n // 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    mod = tvm_backend.import_onnx(m, target=X86)
    tgt = tvm_backend.make_target(X86)
    with tgt:
        lib = tvm.compile(mod, target=tgt, relax_pipeline=cpu_schedules.pipeline(tgt))
    asm = lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")
    assert not any(f in asm for f in ("expf", "tanhf", "erff")), "a scalar libm call is left"
    x = np.concatenate([np.linspace(lo, hi, n - 8), [0.0, -0.0, 1e-8, -1e-8, 1e-3, -1e-3, lo, hi]]).astype(np.float32)
    x = x.reshape(4, n // 4)
    lib.export_library(str(tmp_path / "m.so"))
    y = tvm_backend.run_library(tmp_path / "m.so", {"x": x})[0].astype(np.float64)
    exact = _EXACT[op](x.astype(np.float64))
    err = np.abs(y - exact) / (np.abs(exact) if op == "Exp" else 1.0)
    assert err.max() < tol, f"{op}: max error {err.max():.2e}"
    if op in ("Tanh", "Sigmoid", "Erf"):  # saturates exactly, keeps the sign
        big = tvm_backend.run_library(tmp_path / "m.so", {"x": np.full((4, n // 4), 50.0, np.float32)})[0]
        assert np.all(big == 1.0)


def test_a_failing_rule_leaves_the_function_alone(caplog):
    """A schedule primitive that raises (unexpected block structure) must not fail the build."""
    import tvm

    from targets import cpu_schedules, tvm_backend

    mod = tvm_backend.import_onnx(_encoder_block(), target=X86)
    tgt = tvm_backend.make_target(X86)
    with tgt:
        mod = tvm.transform.Sequential(cpu_schedules.fuse_passes(tgt))(mod)
    rules = cpu_schedules.make_rules()

    def boom(func, target, tunable):
        raise tvm.error.TVMError("synthetic schedule failure")

    for r in rules:
        r.rule.apply = boom
    softmax = next(f for gv, f in mod.functions_items() if "softmax" in gv.name_hint)
    before = len(cpu_schedules.FAILURES)
    with tgt:
        assert all(r.apply(softmax, tgt, False) is None for r in rules)
    assert len(cpu_schedules.FAILURES) == before + len(rules)


def _single_op_model(nodes, inputs, outputs, inits=None):
    g = helper.make_graph(nodes, "m", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def test_pooling_and_big_attention_products_are_scheduled_and_exact(tmp_path):
    """MaxPool (padded, strided) and AveragePool windows (WindowReduction), and an attention
    product big enough to run in parallel (BatchMatmul, 3.1M multiply-adds)."""
    from targets import tvm_backend

    model = _single_op_model(
        [helper.make_node("MaxPool", ["x"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
         helper.make_node("AveragePool", ["x"], ["ap"], kernel_shape=[2, 2], strides=[2, 2]),
         helper.make_node("MatMul", ["q", "k"], ["s"])],
        [_vi("x", [1, 16, 32, 32]), _vi("q", [1, 12, 64, 64]), _vi("k", [1, 12, 64, 64])],
        [_vi("mp", [1, 16, 16, 16]), _vi("ap", [1, 16, 16, 16]), _vi("s", [1, 12, 64, 64])])
    scripts = _scheduled_fused(model, X86)  # asserts every function is scheduled
    assert sum("T.parallel" in s for s in scripts.values()) >= 2
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((1, 16, 32, 32)).astype(np.float32),
             "q": rng.standard_normal((1, 12, 64, 64)).astype(np.float32),
             "k": rng.standard_normal((1, 12, 64, 64)).astype(np.float32)}
    tvm_backend.compile_library(tvm_backend.import_onnx(model, target=X86), X86, tmp_path / "m.so")
    got = tvm_backend.run_library(tmp_path / "m.so", feeds)
    want = _ort(model, feeds)
    np.testing.assert_array_equal(got[0], want[0])  # max: exact
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_functions_left_unscheduled_are_reported(cli, tmp_path):
    """An op no rule covers (a lone row reduction: ReduceMax without an elementwise tail)
    keeps TVM's loop nest, and the report says so: a warning naming it, and
    artifact.kernels.schedules.unscheduled."""
    import json

    model = _single_op_model([helper.make_node("Relu", ["x"], ["r"]),
                              helper.make_node("ReduceMax", ["r"], ["y"], axes=[1], keepdims=0)],
                             [_vi("x", [4, 64])], [_vi("y", [4])])
    path = tmp_path / "reducemax.onnx"
    onnx.save(model, path)
    r = cli(path, "--target", "x86", "-o", tmp_path / "b", "--no-gate")
    assert r.code == 0, r
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    sched = rep["artifact"]["kernels"]["schedules"]
    assert sched["unscheduled"] and all("max" in n for n in sched["unscheduled"]), sched
    assert sched["functions"] >= len(sched["unscheduled"])
    assert any("keep TVM's unscheduled loop nest" in w and sched["unscheduled"][0] in w for w in rep["warnings"])
