"""Dense NCHW conv TIR kernels (targets/conv_kernels.py): numerics against a float64 numpy
oracle for every kernel kind on x86 (executed), aarch64 (built only), the ONNX-graph fusion
plan, fallbacks to the frontend's Conv, and a whole depthwise + 1x1 + 3x3 net imported
through targets.tvm_backend matching onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets import conv_kernels as ck

X86 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
ARM = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}

CASES = {
    "1x1": ck.ConvShape(1, 16, 8, 8, 24, 1, 1),
    "1x1-odd": ck.ConvShape(1, 7, 5, 3, 13, 1, 1),  # M = 15 < tile, O = 13 (overlapping tiles)
    "1x1-batch2": ck.ConvShape(2, 9, 9, 11, 20, 1, 1),
    # more than DIRECT_1X1_MAX_PIXELS pixels: the conv1x1 kernel (smaller plain 1x1s run the direct one)
    "1x1-conv1x1-kernel": ck.ConvShape(1, 12, 16, 15, 20, 1, 1),
    "1x1-conv1x1-kernel-odd": ck.ConvShape(2, 7, 17, 13, 13, 1, 1),
    "dw3x3-s1": ck.ConvShape(1, 12, 9, 10, 12, 3, 3, 1, 1, (1, 1, 1, 1), 12),
    "dw3x3-s2-odd": ck.ConvShape(1, 8, 11, 13, 8, 3, 3, 2, 2, (1, 1, 1, 1), 8),
    "dw5x3-mixed": ck.ConvShape(2, 5, 9, 7, 5, 5, 3, 2, 1, (2, 1, 1, 0), 5),
    "dw-s3": ck.ConvShape(1, 4, 10, 11, 4, 3, 3, 3, 3, (1, 2, 0, 1), 4),
    "dw-wide": ck.ConvShape(1, 3, 4, 300, 3, 3, 3, 1, 1, (1, 1, 1, 1), 3),  # column tiles
    # 20 px rows (vector-aligned pitch 32, 4 rows per step, the last step overlapping) and 9 channels
    # per task (the last group overlapping its neighbour), batch 2
    "dw-channel-groups": ck.ConvShape(2, 40, 22, 20, 40, 3, 3, 1, 1, (1, 1, 1, 1), 40),
    "dw-s2-narrow": ck.ConvShape(1, 30, 7, 7, 30, 3, 3, 2, 2, (1, 1, 1, 1), 30),  # 4x4 out, pitch 8
    "stem3x3-s2": ck.ConvShape(1, 3, 16, 16, 16, 3, 3, 2, 2, (1, 1, 1, 1), 1),
    "direct-odd": ck.ConvShape(1, 3, 11, 9, 10, 3, 3, 1, 2, (1, 0, 1, 2), 1),
    "direct-1x1-s2": ck.ConvShape(1, 8, 9, 9, 12, 1, 1, 2, 2, (0, 0, 0, 0), 1),
    "direct-wide": ck.ConvShape(2, 2, 5, 70, 9, 3, 3, 1, 1, (1, 1, 1, 1), 1),
    "direct-s3": ck.ConvShape(1, 3, 10, 11, 5, 3, 3, 3, 3, (0, 1, 2, 2), 1),
    # ResNet-style: 7x7 plane (wide rows 9, 63 positions < one two-vector tile), 14 channels (two
    # overlapping 12-channel tiles); 1x1 stride 2 (one used phase of four); 7x7/2 stem on an odd plane
    "direct-7x7-plane": ck.ConvShape(1, 20, 7, 7, 14, 3, 3, 1, 1, (1, 1, 1, 1), 1),
    "direct-1x1-s2-wide": ck.ConvShape(2, 24, 14, 14, 30, 1, 1, 2, 2, (0, 0, 0, 0), 1),
    "direct-stem7-s2": ck.ConvShape(1, 3, 23, 21, 16, 7, 7, 2, 2, (3, 3, 3, 3), 1),
    "direct-tiny": ck.ConvShape(1, 4, 2, 2, 3, 3, 3, 1, 1, (1, 1, 1, 1), 1),  # 8 wide positions < one vector
}


def _data(s: ck.ConvShape, seed: int):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((s.b, s.i, s.h, s.w)) * 3).astype(np.float32)
    w = rng.standard_normal((s.o, s.i // s.group, s.kh, s.kw)).astype(np.float32)
    b = rng.standard_normal(s.o).astype(np.float32)
    return x, w, b


def _run(s: ck.ConvShape, act: ck.Act, x, w, b) -> np.ndarray:
    import tvm

    lib = ck.build(s, act, X86)
    wk, bk = ck.kernel_weights(s, w, b, X86)
    y = tvm.runtime.tensor(np.full(s.out_shape, np.nan, np.float32))
    lib["conv_kernel"](*[tvm.runtime.tensor(a) for a in (x, wk, bk)], y)
    return y.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_numpy_x86(name):
    s = CASES[name]
    x, w, b = _data(s, len(name))
    for act in (ck.NONE, ck.RELU6):
        y = _run(s, act, x, w, b)
        ref = ck.reference(x, w, b, s, act)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert (y == 0).any() and (y == 6).any() and ((y > 0) & (y < 6)).any()  # both clip bounds hit


@pytest.mark.parametrize("name", ["1x1", "1x1-odd", "1x1-batch2", "direct-odd", "direct-7x7-plane",
                                  "direct-1x1-s2-wide", "stem3x3-s2"])
def test_residual_kernel_matches_numpy_x86(name):
    """``y = act(conv(x) + bias + z)``: the residual Add fused into the conv1x1 / direct kernels."""
    import tvm

    s = CASES[name]
    x, w, b = _data(s, len(name) + 1)
    z = (np.random.default_rng(7).standard_normal(s.out_shape) * 3).astype(np.float32)
    lib = ck.build(s, ck.RELU6, X86, residual=True)
    wk, bk = ck.kernel_weights(s, w, b, X86)
    y = tvm.runtime.tensor(np.full(s.out_shape, np.nan, np.float32))
    lib["conv_kernel"](*[tvm.runtime.tensor(a) for a in (x, wk, bk, z)], y)
    pre = ck.reference(x, w, b, s).astype(np.float64) + z
    ref = ck.RELU6.apply_np(pre)
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert ((pre > 0) & (pre < 6)).any() and (pre < 0).any()
    with pytest.raises(ValueError, match="residual"):
        ck.make_primfunc(CASES["dw3x3-s1"], ck.NONE, X86, residual=True)


def test_kind_and_oracle():
    assert CASES["1x1"].kind() == "conv1x1"
    assert CASES["dw3x3-s1"].kind() == "depthwise"
    assert CASES["stem3x3-s2"].kind() == "direct"
    assert ck.ConvShape(1, 8, 4, 4, 8, 3, 3, group=2).kind() == "unsupported"
    # the oracle against an explicit loop (one output element)
    s = CASES["direct-odd"]
    x, w, b = _data(s, 3)
    y = ck.reference(x, w, b, s)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 2)))
    o, r, c = 4, 5, 3
    want = b[o] + sum(float(w[o, i, dh, dw]) * float(xp[0, i, r + dh, c * 2 + dw])
                      for i in range(3) for dh in range(3) for dw in range(3))
    assert y[0, o, r, c] == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", ["1x1-odd", "dw3x3-s2-odd", "stem3x3-s2"])
def test_kernel_builds_for_aarch64(name):
    import tvm

    s = CASES[name]
    f = ck.make_primfunc(s, ck.RELU6, ARM).with_attr("global_symbol", "k")
    tgt = tvm.target.Target(ARM)
    with tgt:
        lib = tvm.compile(tvm.IRModule({"k": f}), target=tgt)
    asm = lib.mod.inspect_source("asm")
    assert "fmla" in asm or "fmul" in asm  # NEON vector arithmetic


def test_stack_tiles_stay_below_workspace_threshold():
    for tgt in (X86, {**X86, "mcpu": "x86-64-v4"}, ARM):
        for m, o in ((1024, 64), (7, 5), (3136, 1280)):
            r, mt = ck.conv1x1_tiles(m, o, tgt)
            assert r * mt < ck.STACK_FLOATS and r <= o and mt <= m
        for o, q in ((16, 16), (32, 56 * 58), (3, 300), (512, 7 * 9), (8, 5)):
            r, qt = ck.direct_tiles(o, q, tgt)  # two stack sets of r x qt/2 (one of r x qt when narrow)
            assert r * (qt // 2 if qt >= 2 * 8 else qt) < ck.STACK_FLOATS and qt <= q and r <= o


# ------------------------------------------------------------------ ONNX graph level


def _const(name, v):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v, np.float32), name))


def _net(path, *, dilated: bool = False, grouped: bool = False):
    """3x3/2 stem (+Relu) -> 1x1 expand (+Clip 0..6) -> depthwise 3x3 (+Clip) -> 1x1 project
    (no act, also a graph output) -> Add residual -> GlobalAveragePool (72 pixels: vector
    part + scalar tail), and optionally a dilated / grouped conv
    (fallbacks)."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)

    inits = [init("w0", 8, 3, 3, 3), init("b0", 8), init("w1", 24, 8, 1, 1), init("b1", 24),
             init("w2", 24, 1, 3, 3), init("b2", 24), init("w3", 8, 24, 1, 1)]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c0"], ["a0"], name="stem_relu"),
        helper.make_node("Conv", ["a0", "w1", "b1"], ["c1"], name="expand"),
        _const("lo", 0.0), _const("hi", 6.0),
        helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="expand_clip"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], name="dw", group=24, pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["a2"], name="dw_clip"),
        helper.make_node("Conv", ["a2", "w3"], ["c3"], name="project"),
        helper.make_node("Add", ["c3", "a0"], ["y"], name="residual"),
        helper.make_node("GlobalAveragePool", ["y"], ["p"], name="gap"),
    ]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 9, 8]),
            helper.make_tensor_value_info("c3", TensorProto.FLOAT, [1, 8, 9, 8]),
            helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, 8, 1, 1])]
    if dilated:
        inits.append(init("w4", 8, 8, 3, 3))
        nodes.append(helper.make_node("Conv", ["y", "w4"], ["z"], name="dilated", dilations=[2, 2], pads=[2, 2, 2, 2]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 9, 8]))
    if grouped:
        inits.append(init("w5", 8, 4, 3, 3))
        nodes.append(helper.make_node("Conv", ["y", "w5"], ["g"], name="grouped", group=2, pads=[1, 1, 1, 1]))
        outs.append(helper.make_tensor_value_info("g", TensorProto.FLOAT, [1, 8, 9, 8]))
    g = helper.make_graph(nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 17, 15])],
                          outs, inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_plan_fusion():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        model = onnx.load(str(_net(Path(d) / "n.onnx")))
    plan = ck.plan_fusion(model)
    assert plan == {"stem": ("stem_relu", ck.RELU), "expand": ("expand_clip", ck.RELU6),
                    "dw": ("dw_clip", ck.RELU6)}  # project: consumer is an Add, output is a graph output


def _compile_and_run(tmp_path, model_path, x):
    from targets import tvm_backend

    mod = tvm_backend.import_onnx(model_path, target=X86)
    so = tmp_path / "m.so"
    tvm_backend.compile_library(mod, X86, so)
    return mod, tvm_backend.run_library(so, {"x": x})


def test_convnet_matches_onnxruntime(tmp_path):
    from compressor.runtime import session

    path = _net(tmp_path / "net.onnx", dilated=True, grouped=True)
    x = np.random.default_rng(1).standard_normal((1, 3, 17, 15)).astype(np.float32) * 2
    ref = session(onnx.load(str(path))).run(None, {"x": x})
    mod, got = _compile_and_run(tmp_path, path, x)
    assert len(got) == len(ref) == 5
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.abs(r).max())
    names = [gv.name_hint for gv in mod.get_global_vars()]
    # our kernels, with the Relu/Clip folded in; dilated + grouped convs fall back to TVM's conv2d
    # (the net's 1x1 convs have 72 pixels: at most DIRECT_1X1_MAX_PIXELS, so they run the direct kernel)
    for kind in ("conv_direct_relu", "conv_direct_relu6", "conv_depthwise_relu6", "conv_direct_none", "add_none",
                 "global_avgpool"):
        assert any(n.startswith(kind) for n in names), (kind, names)
    text = mod.script()
    assert text.count("R.nn.conv2d(") == 2
    assert "R.nn.relu" not in text and not any(n.startswith(("maximum", "minimum")) for n in names)  # fused


def test_converters_cuda_keep_frontend_and_fallback_reasons(tmp_path):
    from tvm import relax  # noqa: F401 - the converters need tvm

    model = onnx.load(str(_net(tmp_path / "n.onnx", dilated=True, grouped=True)))
    convs, state = ck.relax_converters({"kind": "cuda", "arch": "sm_80"}, model)
    assert convs == {}
    s, why = ck.conv_shape_from([1, 8, 9, 9], [8, 8, 3, 3], {"dilations": (2, 2)})
    assert s is None and "dilations" in why
    s, why = ck.conv_shape_from([1, 8, 9, 9], [8, 4, 3, 3], {"group": 2})
    assert s is None and "group" in why
    s, why = ck.conv_shape_from([1, 8, 9, 9], [8, 8, 3, 3], {"auto_pad": b"SAME_UPPER"})
    assert s is None and "auto_pad" in why
    s, why = ck.conv_shape_from([1, 8, 9, 9], [16, 1, 3, 3], {"group": 8, "pads": (1, 1, 1, 1)})
    assert s is None and "group" in why  # depthwise with channel multiplier 2
    s, why = ck.conv_shape_from([1, 8, 9, 9], [8, 1, 3, 3], {"group": 8, "pads": (1, 1, 1, 1)})
    assert s is not None and s.kind() == "depthwise" and why == ""


def test_add_kernel_and_parallel_variants(monkeypatch):
    import tvm

    rng = np.random.default_rng(5)
    for shape in ((1, 8, 9, 7), (2, 3, 300)):  # one chunk / several chunks with an overlapping last one
        a, b = (rng.standard_normal(shape).astype(np.float32) * 4 for _ in range(2))
        for par_min in (0, 1 << 40):  # T.parallel and T.serial task loops
            monkeypatch.setattr(ck, "PARALLEL_MIN_MACS", par_min)
            f = ck.make_add(shape, ck.RELU6, X86).with_attr("global_symbol", "k")
            lib = tvm.compile(tvm.IRModule({"k": f}), target=tvm.target.Target(X86))
            y = tvm.runtime.tensor(np.full(shape, np.nan, np.float32))
            lib["k"](tvm.runtime.tensor(a), tvm.runtime.tensor(b), y)
            np.testing.assert_allclose(y.numpy(), np.clip(a + b, 0, 6), rtol=1e-6, atol=1e-6)
    # conv kernels with the parallel task loop too (the small CASES above run serial)
    monkeypatch.setattr(ck, "PARALLEL_MIN_MACS", 0)
    for name in ("1x1-odd", "dw3x3-s2-odd", "direct-odd"):
        s = CASES[name]
        x, w, b = _data(s, 7)
        np.testing.assert_allclose(_run(s, ck.RELU, x, w, b), ck.reference(x, w, b, s, ck.RELU), rtol=1e-4, atol=1e-3)


def test_sparse_conv1x1_with_clip_fused(tmp_path):
    """compressor::SparseConv1x1 (lower.sparse) + Clip(0, 6) -> one BSR kernel with relu6,
    + the residual Add kernel; against numpy."""
    from targets import sparse_kernels as sk
    from targets import tvm_backend

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 8)) * (rng.random((16, 8)) < 0.3)).astype(np.float32)
    bsr = sk.to_bsr(w, (1, 1))
    bias = rng.standard_normal(16).astype(np.float32)
    inits = [numpy_helper.from_array(bsr.data, "data"), numpy_helper.from_array(bsr.indices, "indices"),
             numpy_helper.from_array(bsr.indptr, "indptr"), numpy_helper.from_array(bias, "bias"),
             numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    nodes = [helper.make_node("SparseConv1x1", ["x", "data", "indices", "indptr", "bias"], ["c"], name="sc",
                              domain="compressor"),
             helper.make_node("Clip", ["c", "lo", "hi"], ["a"], name="clip"),
             helper.make_node("Add", ["a", "r"], ["y"], name="res")]
    g = helper.make_graph(nodes, "sc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 5, 7]),
                                        helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 16, 5, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 5, 7])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("compressor", 1)])
    assert ck.plan_fusion(model, ("SparseConv1x1",), "compressor") == {"sc": ("clip", ck.RELU6)}
    assert ck.residual_adds(model) == set()  # the Add reads the Clip, not the conv
    mod = tvm_backend.import_onnx(model, target=X86)
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert any(n.startswith("bsr_conv1x1_1x1_relu6") for n in names), names
    so = tmp_path / "m.so"
    tvm_backend.compile_library(mod, X86, so)
    x = rng.standard_normal((1, 8, 5, 7)).astype(np.float32) * 3
    r = rng.standard_normal((1, 16, 5, 7)).astype(np.float32)
    (y,) = tvm_backend.run_library(so, {"x": x, "r": r})
    ref = np.clip(np.einsum("ok,bkhw->bohw", w.astype(np.float64), x) + bias[None, :, None, None], 0, 6) + r
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_broadcast_add_after_conv_falls_back(tmp_path):
    """An Add reading a conv output but broadcasting (here a per-channel constant) keeps the
    frontend's Add; the conv before it still uses our kernel."""
    from compressor.runtime import session

    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((1, 6, 1, 1)).astype(np.float32), "c")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y0"], name="conv"),
             helper.make_node("Add", ["y0", "c"], ["y"], name="add")]
    g = helper.make_graph(nodes, "badd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 5, 5])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "badd.onnx"
    onnx.save(model, str(path))
    assert ck.residual_adds(model) == {"add"}  # a candidate, rejected at conversion (shapes differ)
    x = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    mod, (y,) = _compile_and_run(tmp_path, path, x)
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert any(n.startswith("conv_direct") for n in names) and not any(n.startswith("add_") for n in names)
    np.testing.assert_allclose(y, session(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_kernel_counts_and_fallbacks_reach_the_report(tmp_path, cli):
    """No silent fallback: a conv left to TVM's generic code is a report warning with its
    reason, and the artifact records how many layers got each hand-scheduled kernel."""
    import json

    path = _net(tmp_path / "net.onnx", dilated=True, grouped=True)
    r = cli(path, "--target", "x86", "-o", tmp_path / "b", "--verify-samples", "2", "--no-latency")
    assert r.code == 0, r.out + r.err
    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    kernels = rep["artifact"]["kernels"]
    assert kernels["conv"] == {"direct": 3, "depthwise": 1, "add": 1, "global_avgpool": 1}, kernels
    warns = [w for w in rep["warnings"] if w.startswith("compile: kernel: Conv")]
    assert len(warns) == 2 and any("dilated: dilations=[2, 2]" in w for w in warns), rep["warnings"]
    assert any("grouped: grouped conv group=2" in w for w in warns)


# ------------------------------------------------------------------ sparse direct (KxK) kernel

SPARSE_DIRECT = {  # (shape, R)
    "3x3-s1-unstructured": (ck.ConvShape(1, 8, 9, 10, 12, 3, 3, 1, 1, (1, 1, 1, 1)), 1),
    "3x3-s2-8x1-batch2": (ck.ConvShape(2, 6, 11, 9, 16, 3, 3, 2, 2, (1, 1, 1, 1)), 8),
    "1x1-s2-4x1": (ck.ConvShape(1, 10, 14, 14, 12, 1, 1, 2, 2), 4),
    "5x3-mixed": (ck.ConvShape(1, 5, 9, 7, 6, 5, 3, 2, 1, (2, 1, 1, 0)), 2),
    "7x7-plane-wide-o": (ck.ConvShape(1, 16, 7, 7, 32, 3, 3, 1, 1, (1, 1, 1, 1)), 8),
    "tiny": (ck.ConvShape(1, 4, 2, 2, 3, 3, 3, 1, 1, (1, 1, 1, 1)), 1),
    "plain-1x1-batch2": (ck.ConvShape(2, 12, 6, 7, 16, 1, 1), 4),  # reads x itself (no plane copy)
}
AVX2 = {**X86, "mcpu": "x86-64-v3"}


def _host_has(flag: str) -> bool:
    try:
        return flag in open("/proc/cpuinfo").read().split()
    except OSError:
        return False


@pytest.mark.parametrize("tgt", ["x86", "avx2"])
@pytest.mark.parametrize("name", list(SPARSE_DIRECT))
def test_sparse_direct_kernel_matches_numpy(name, tgt):
    """The sparse direct kernel (R x 1 blocks over flat tap offsets) against the float64 oracle of
    the same masked weight, with the fused activation; AVX2 code executed (runs on AVX-512 hosts)."""
    import tvm

    if tgt == "avx2" and not _host_has("avx2"):
        pytest.skip("host has no AVX2")
    target = X86 if tgt == "x86" else AVX2
    s, r = SPARSE_DIRECT[name]
    x, w, b = _data(s, len(name))
    rng = np.random.default_rng(5)
    w2 = w.reshape(s.o, -1)
    keep = rng.random((s.o // r, w2.shape[1])) < 0.3
    w2 = (w2 * np.repeat(keep, r, axis=0)).astype(np.float32)
    data, offs, indptr = ck.sparse_direct_arrays(s, w2, r)
    assert data.shape == (int(keep.sum()), r) and indptr[-1] == len(data)
    t = tvm.target.Target(target)
    z = (rng.standard_normal(s.out_shape) * 2).astype(np.float32)
    for residual in (False, True):
        f = ck.make_sparse_direct(s, r, len(data), ck.RELU6, target, residual).with_attr("global_symbol", "k")
        with t:
            lib = tvm.compile(tvm.IRModule({"k": f}), target=t)
        y = tvm.runtime.tensor(np.full(s.out_shape, np.nan, np.float32))
        lib["k"](*[tvm.runtime.tensor(a) for a in (x, data, offs, indptr, b, *([z] if residual else []))], y)
        pre = ck.reference(x, w2.reshape(w.shape), b, s).astype(np.float64) + (z if residual else 0)
        ref = ck.RELU6.apply_np(pre)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * max(np.abs(ref).max(), 1))
    # offsets: column (i, kh, kw) -> plane position, checked against a direct construction
    hq, wq = ck.direct_geometry(s)
    i, dh, dw = s.i - 1, s.kh - 1, s.kw - 1
    col = (i * s.kh + dh) * s.kw + dw
    want = i * s.sh * s.sw * hq * wq + ((dh % s.sh) * s.sw + dw % s.sw) * hq * wq + dh // s.sh * wq + dw // s.sw
    assert ck.sparse_direct_offsets(s, np.array([col]))[0] == want


def test_sparse_direct_builds_for_aarch64():
    import tvm

    s, r = SPARSE_DIRECT["3x3-s2-8x1-batch2"]
    f = ck.make_sparse_direct(s, r, 40, ck.RELU, ARM).with_attr("global_symbol", "k")
    tgt = tvm.target.Target(ARM)
    with tgt:
        lib = tvm.compile(tvm.IRModule({"k": f}), target=tgt)
    assert "fmla" in lib.mod.inspect_source("asm")
