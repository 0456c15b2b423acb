"""prune.channels (issue 17): internal channels first, residual stream last; reconstruct refits every consumer."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from compressor import runtime
from compressor.data import Samples
from passes import PASSES
from passes.prune_channels import PruneChannelsConfig
from tests.passes.prune_channels_util import cleaned, zero_then_remove

OPSET = 21


def _model(nodes, x_shape, y_shape, inits):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def inverted_residual(blocks: int = 2, c: int = 16, t: int = 6) -> onnx.ModelProto:
    """stem -> blocks x (1x1 expand c->tc, ReLU, 3x3 depthwise, ReLU, 1x1 project tc->c, Add skip) -> GAP -> fc."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s) * (2.0 / np.prod(s[1:])) ** 0.5
    n = helper.make_node
    inits = {"stem": f(c, 3, 3, 3), "fc": f(10, c)}
    nodes = [n("Conv", ["x", "stem"], ["h0"], name="stem", pads=[1, 1, 1, 1])]
    for b in range(blocks):
        inits |= {f"e{b}": f(c * t, c, 1, 1), f"d{b}": f(c * t, 1, 3, 3), f"p{b}": f(c, c * t, 1, 1)}
        nodes += [n("Conv", [f"h{b}", f"e{b}"], [f"ex{b}"], name=f"expand{b}"),
                  n("Relu", [f"ex{b}"], [f"er{b}"], name=f"relu_e{b}"),
                  n("Conv", [f"er{b}", f"d{b}"], [f"dw{b}"], name=f"dw{b}", group=c * t, pads=[1, 1, 1, 1]),
                  n("Relu", [f"dw{b}"], [f"dr{b}"], name=f"relu_d{b}"),
                  n("Conv", [f"dr{b}", f"p{b}"], [f"pr{b}"], name=f"project{b}"),
                  n("Add", [f"h{b}", f"pr{b}"], [f"h{b + 1}"], name=f"skip{b}")]
    nodes += [n("GlobalAveragePool", [f"h{blocks}"], ["gap"], name="gap"),
              n("Flatten", ["gap"], ["fl"], name="flat"),
              n("Gemm", ["fl", "fc"], ["y"], name="fc", transB=1)]
    return _model(nodes, [1, 3, 8, 8], [1, 10], inits)


def ffn_block(d: int = 32, hidden: int = 128, seq: int = 8) -> onnx.ModelProto:
    """in-proj -> x + W2 GELU(W1 x + b1) + b2 -> head: the FFN intermediate units are internal, d is the stream."""
    rng = np.random.default_rng(1)
    f = lambda *s: rng.standard_normal(s) / np.sqrt(s[0])
    n = helper.make_node
    inits = {"win": f(16, d), "w1": f(d, hidden), "b1": f(hidden) * 0.1, "w2": f(hidden, d), "b2": f(d) * 0.1,
             "head": f(d, 10)}
    nodes = [n("MatMul", ["x", "win"], ["h"], name="in_proj"),
             n("MatMul", ["h", "w1"], ["u"], name="ffn_up"),
             n("Add", ["u", "b1"], ["ub"], name="ffn_up_bias"),
             n("Gelu", ["ub"], ["g"], name="gelu"),
             n("MatMul", ["g", "w2"], ["v"], name="ffn_down"),
             n("Add", ["v", "b2"], ["vb"], name="ffn_down_bias"),
             n("Add", ["h", "vb"], ["r"], name="residual"),
             n("MatMul", ["r", "head"], ["y"], name="head")]
    return _model(nodes, [1, seq, 16], [1, seq, 10], inits)


def _shape(model, init_name):
    return next(tuple(t.dims) for t in model.graph.initializer if t.name.startswith(init_name))


def _weight_of(model, node_name, i=1):
    node = next(x for x in model.graph.node if x.name == node_name)
    return next(tuple(t.dims) for t in model.graph.initializer if t.name == node.input[i])


def test_inverted_residual_prunes_expansion_only():
    r = zero_then_remove(inverted_residual(), ratio=0.2)
    st = r["plan"].group_stats
    kinds = {s["group"]: s.get("kind") for s in st if s["status"] in ("pruned", "unchanged")}
    assert sorted(kinds.values()) == ["internal", "internal", "residual"], st
    pr = r["pruned"]
    for b in range(2):
        e, p = _weight_of(pr, f"expand{b}"), _weight_of(pr, f"project{b}")
        assert e[1] == 16 and p[0] == 16  # the residual width is untouched
        assert e[0] < 96 and p[1] == e[0] and _weight_of(pr, f"dw{b}")[0] == e[0]  # expansion channels went
    assert _weight_of(pr, "stem")[0] == 16
    res = next(s for s in st if s.get("kind") == "residual")
    assert res["channels_after"] == res["channels_before"] == 16
    # the parameter target of ratio 0.2 over all groups is met from the expansion channels alone
    before, after = r["params"]
    assert 0.15 <= 1 - after / before <= 0.35, (before, after)
    # the previous behaviour (order="uniform") pruned the residual stream too
    u = zero_then_remove(inverted_residual(), ratio=0.2, order="uniform")
    assert _weight_of(u["pruned"], "stem")[0] < 16


def test_residual_groups_pruned_only_past_the_internal_cap():
    r = zero_then_remove(inverted_residual(), ratio=0.7, internal_cap=0.6)
    res = next(s for s in r["plan"].group_stats if s.get("kind") == "residual")
    assert res["channels_after"] < res["channels_before"]
    assert all(s["fraction"] >= 0.65 for s in r["plan"].group_stats if s.get("kind") == "internal"), r["plan"].group_stats


def test_ffn_prunes_intermediate_units_only():
    r = zero_then_remove(ffn_block(), ratio=0.2)
    pr = r["pruned"]
    w1, w2 = _weight_of(pr, "ffn_up"), _weight_of(pr, "ffn_down")
    assert w1[0] == 32 and w2[1] == 32 and _weight_of(pr, "in_proj")[1] == 32  # stream width kept
    assert w1[1] < 128 and w2[0] == w1[1]
    kinds = sorted(s.get("kind") for s in r["plan"].group_stats if s["status"] in ("pruned", "unchanged"))
    assert kinds == ["internal", "residual"], r["plan"].group_stats


def _run_pass(model, calib_feeds, **cfg):
    g, ctx = cleaned(model)
    ctx.calib = Samples(calib_feeds, None, "test")
    res = PASSES.get("prune.channels")(PruneChannelsConfig(**cfg)).run(g, ctx)
    return res, ctx.export(g)


def _dependent_conv_model(k: int, ndim: int, auto_pad: str | None = None) -> onnx.ModelProto:
    """conv1 (no bias) makes 8 channels, 4..7 = 0.1 x 0..3; conv2 (kernel k) reads all 8: pruning 4..7 loses
    nothing a refit cannot restore exactly (W'[:, c] = W[:, c] + 0.1 W[:, c + 4])."""
    rng = np.random.default_rng(3)
    sp = [1] * ndim
    w1 = rng.standard_normal((4, 4, *sp))
    w1 = np.concatenate([w1, 0.1 * w1])
    w2 = rng.standard_normal((6, 8, *([k] * ndim)))
    w2[:, 4:] *= 0.1
    n = helper.make_node
    nodes = [n("Conv", ["x", "w1"], ["c1"], name="conv1"),
             n("Conv", ["c1", "w2", "b2"], ["y"], name="conv2", **({"auto_pad": auto_pad} if auto_pad else {"pads": [k // 2] * (2 * ndim)}))]
    shape = [1, 4] + [6] * ndim
    return _model(nodes, shape, [1, 6] + [6] * ndim, {"w1": w1, "w2": w2, "b2": rng.standard_normal(6)})


def _dependent_linear_model(op: str) -> onnx.ModelProto:
    rng = np.random.default_rng(4)
    w1 = rng.standard_normal((5, 4))
    w1 = np.concatenate([w1, 0.1 * w1], axis=1)  # [5, 8]: units 4..7 = 0.1 x units 0..3
    w2 = rng.standard_normal((8, 3))
    w2[4:] *= 0.1
    n = helper.make_node
    if op == "MatMul":
        nodes = [n("MatMul", ["x", "w1"], ["h"], name="lin1"), n("MatMul", ["h", "w2"], ["y"], name="lin2")]
        return _model(nodes, [1, 7, 5], [1, 7, 3], {"w1": w1, "w2": w2})
    if op == "MatMulAdd":  # a torch Linear export: the bias is a following Add, which the refit must keep
        nodes = [n("MatMul", ["x", "w1"], ["h"], name="lin1"), n("MatMul", ["h", "w2"], ["hy"], name="lin2"),
                 n("Add", ["hy", "b2"], ["y"], name="lin2_bias")]
        return _model(nodes, [1, 7, 5], [1, 7, 3], {"w1": w1, "w2": w2, "b2": 3.0 + rng.standard_normal(3)})
    nodes = [n("Gemm", ["x", "w1"], ["h"], name="lin1"), n("Gemm", ["h", "w2t", "b2"], ["y"], name="lin2", transB=1)]
    return _model(nodes, [1, 5], [1, 3], {"w1": w1, "w2t": w2.T, "b2": rng.standard_normal(3)})


def _feeds(model, n, seed=0):
    rng = np.random.default_rng(seed)
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _exact_refit(model, n_calib):
    calib = _feeds(model, n_calib)
    res, pruned = _run_pass(model, calib, ratio=0.5, reconstruct=True)
    assert res.stats["reconstructed"] == 1 and res.stats["channels_after"] < res.stats["channels_before"], res.stats
    assert not [w for w in res.warnings if "reconstruct" in w], res.warnings
    s0, s1 = runtime.session(model), runtime.session(pruned)
    for feed in _feeds(model, 4, seed=9):  # held-out inputs: the refit is exact, not a fit to the calibration set
        a, b = s0.run(None, feed)[0], s1.run(None, feed)[0]
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * float(np.abs(a).max()))
    # without the refit the output differs (the removed channels carried signal)
    _, plain = _run_pass(model, calib, ratio=0.5)
    feed = _feeds(model, 1, seed=9)[0]
    assert np.abs(runtime.session(plain).run(None, feed)[0] - s0.run(None, feed)[0]).max() > 1e-2


def test_reconstruct_exact_conv3x3():
    _exact_refit(_dependent_conv_model(3, 2), 8)


def test_reconstruct_exact_conv_auto_pad():  # TF-style exports: SAME padding, odd and even kernels
    _exact_refit(_dependent_conv_model(3, 2, "SAME_UPPER"), 8)
    _exact_refit(_dependent_conv_model(2, 2, "SAME_LOWER"), 8)


def test_reconstruct_exact_conv1d():
    _exact_refit(_dependent_conv_model(3, 1), 8)


def test_reconstruct_exact_matmul_and_gemm():
    _exact_refit(_dependent_linear_model("MatMul"), 16)
    _exact_refit(_dependent_linear_model("MatMulAdd"), 16)
    _exact_refit(_dependent_linear_model("Gemm"), 64)


def test_reconstruct_covers_every_consumer():
    """Every weight layer reading pruned channels is refit (3x3 depthwise-free convs, 1x1, Gemm), and the
    refit lowers the error against the original on the calibration data."""
    model = inverted_residual(blocks=2)
    calib = _feeds(model, 16)
    res, pruned = _run_pass(model, calib, ratio=0.3, reconstruct=True)
    refit_names = {"project0", "project1"}  # the consumers of the expansion channels (depthwise convs follow exactly)
    assert res.stats["reconstructed"] == len(refit_names), res.stats
    assert not [w for w in res.warnings if "not refit" in w], res.warnings
    _, plain = _run_pass(model, calib, ratio=0.3)
    s0, s1, s2 = runtime.session(model), runtime.session(pruned), runtime.session(plain)
    err = lambda s: np.mean([np.square(s.run(None, f)[0] - s0.run(None, f)[0]).mean() for f in calib])
    assert err(s1) < 0.5 * err(s2)


def test_sensitivity_allocation_takes_the_channels_that_cost_nothing():
    """allocation=sensitivity: each group's removal is probed on calibration data and the parameter target
    is taken where the measured output error is least. conv2's channels 8..15 feed conv3 through zero
    weights (free to remove); every conv1 channel matters. Sensitivity removes exactly the free ones and
    the output is unchanged; uniform takes from both groups and the output moves."""
    rng = np.random.default_rng(7)
    n = helper.make_node
    w1 = rng.standard_normal((16, 4, 3, 3)) * 0.3
    w2 = rng.standard_normal((16, 16, 3, 3)) * 0.1
    w3 = rng.standard_normal((6, 16, 1, 1)) * 0.3
    w3[:, 8:] = 0.0
    nodes = [n("Conv", ["x", "w1"], ["a"], name="conv1", pads=[1, 1, 1, 1]), n("Relu", ["a"], ["ar"], name="r1"),
             n("Conv", ["ar", "w2"], ["b"], name="conv2", pads=[1, 1, 1, 1]), n("Relu", ["b"], ["br"], name="r2"),
             n("Conv", ["br", "w3"], ["y"], name="conv3")]
    model = _model(nodes, [1, 4, 6, 6], [1, 6, 6, 6], {"w1": w1, "w2": w2, "w3": w3})
    calib = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(16)]
    ref = runtime.run_all(runtime.session(model), calib)
    # 0.2 of the 5280 group parameters = 1056 < the 1200 of the 8 free channels
    res, pruned = _run_pass(model, calib, ratio=0.2, criterion="taylor", allocation="sensitivity")
    st = {s["group"]: s for s in res.stats["group_stats"]}
    assert "sensitivity" in res.stats and len(res.stats["sensitivity"]["curves"]) == 2
    by_producer = {s["members"][0]: s for s in st.values()}
    w = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    shapes = {nd.name: w[nd.input[1]].shape for nd in pruned.graph.node if nd.op_type == "Conv"}
    assert shapes["conv1"][0] == 16 and 8 <= shapes["conv2"][0] <= 10 and shapes["conv3"][1] == shapes["conv2"][0], shapes
    out = runtime.run_all(runtime.session(pruned), calib)
    assert max(float(np.abs(o[0] - r[0]).max()) for o, r in zip(out, ref)) < 1e-5
    _, uni = _run_pass(model, calib, ratio=0.2, criterion="taylor")
    wu = {t.name: numpy_helper.to_array(t) for t in uni.graph.initializer}
    assert {nd.name: wu[nd.input[1]].shape for nd in uni.graph.node if nd.op_type == "Conv"}["conv1"][0] < 16
    assert by_producer  # the stats name the groups' members


def _duplicate_unit_model() -> onnx.ModelProto:
    """x -> lin1 -> h (3 units) -> lin2 -> y. h0 is small but carries the only copy of its signal; h1 and
    h2 are large and identical (x w1[:, 1] twice). Removing h2 (or h1) loses nothing a refit cannot restore;
    removing h0 loses its signal for good. mean |activation| removes h0; obs removes a duplicate."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal(6), rng.standard_normal(6)
    w1 = np.stack([0.05 * a, b, b], axis=1)  # [6, 3]
    w2 = rng.standard_normal((3, 4))
    w2[0] *= 20.0  # h0 matters at the output
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h"], name="lin1"), n("MatMul", ["h", "w2"], ["hy"], name="lin2"),
             n("Add", ["hy", "b2"], ["y"], name="lin2_bias")]
    return _model(nodes, [1, 5, 6], [1, 5, 4], {"w1": w1, "w2": w2, "b2": rng.standard_normal(4)})


def test_obs_criterion_removes_what_the_refit_can_restore():
    model = _duplicate_unit_model()
    calib = _feeds(model, 16)
    s0 = runtime.session(model)
    err = {}
    for crit in ("obs", "mean_act"):
        res, pruned = _run_pass(model, calib, ratio=0.34, criterion=crit, reconstruct=True, min_channels=1)
        assert res.stats["channels_after"] == res.stats["channels_before"] - 1, res.stats
        st = [g for g in res.stats["group_stats"] if g["status"] == "pruned"]
        assert [g["criterion"] for g in st] == [crit], st
        s1 = runtime.session(pruned)
        err[crit] = max(float(np.abs(s1.run(None, f)[0] - s0.run(None, f)[0]).max()) for f in _feeds(model, 4, seed=9))
    assert err["obs"] < 1e-3, err  # a duplicate went: the refit restores the output exactly
    assert err["mean_act"] > 1e-1, err  # the small unique unit went


def test_obs_compensation_is_the_least_squares_refit():
    """prune_obs.compensated (the OBS update) equals refitting the kept columns on the same damped Gram
    matrix, and greedy_order's first pick is the unit of least dE by brute force."""
    from passes.prune_obs import ConsumerFit, compensated, greedy_order

    rng = np.random.default_rng(11)
    A = rng.standard_normal((200, 7)) @ rng.standard_normal((7, 7))
    A1 = np.concatenate([A, np.ones((200, 1))], axis=1)
    H = A1.T @ A1 / 200 + 0.01 * np.eye(8)
    W = np.concatenate([rng.standard_normal((7, 3)), np.zeros((1, 3))])
    fit = ConsumerFit("n", "MatMul", 1, W, np.linalg.inv(H))
    S = np.array([1, 4])
    R = np.setdiff1d(np.arange(8), S)
    Wd, db = compensated(fit, S)
    want = np.linalg.solve(H[np.ix_(R, R)], H[R] @ W)  # min over W_R of (W_R - W)^T H (W_R - W), S rows zero
    got = np.concatenate([Wd, db[None]])[R]
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    assert not Wd[S].any()
    # dE of removing unit u alone: the increase of tr((W' - W)^T H (W' - W)) at the optimum
    def de(u):
        Rk = np.setdiff1d(np.arange(8), [u])
        Wr = np.zeros_like(W)
        Wr[Rk] = np.linalg.solve(H[np.ix_(Rk, Rk)], H[Rk] @ W)
        return float(np.trace((Wr - W).T @ H @ (Wr - W)))
    brute = int(np.argmin([de(u) for u in range(7)]))
    score = greedy_order([[(fit, np.array([u]))] for u in range(7)], np.ones(7, bool), max_remove=3, steps=3)
    assert int(np.argmin(score)) == brute and sorted(score)[:3] == [0, 1, 2], score


def test_padding_keep_finds_attention_masks():
    from compressor.data import padding_keep

    m = np.array([[1, 1, 1, 0, 0]], np.int64)
    assert padding_keep({"attention_mask": m, "ids": m}, (1, 5, 8)).tolist() == [True, True, True, False, False]
    assert padding_keep({"attention_mask": m}, (1, 5)) is None  # not [B, S, D]
    assert padding_keep({"attention_mask": m}, (1, 4, 8)) is None  # other positions
    assert padding_keep({"attention_mask": np.ones_like(m)}, (1, 5, 8)) is None  # masks nothing
    assert padding_keep({"attention_mask": m * 2}, (1, 5, 8)) is None  # not 0/1
    assert padding_keep({"segment": m}, (1, 5, 8)) is None  # not named a mask
    assert padding_keep({"attention_mask": m.astype(np.float32)}, (1, 5, 8)) is None  # not an integer input


def _masked_ffn(mask_name: str) -> onnx.ModelProto:
    """x [1, 8, 6] -> MatMul -> Relu -> MatMul -> * mask: the padded positions never reach the output."""
    rng = np.random.default_rng(8)
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h"], name="up"), n("Relu", ["h"], ["hr"], name="act"),
             n("MatMul", ["hr", "w2"], ["o"], name="down"), n("Cast", [mask_name], ["mf"], to=TensorProto.FLOAT),
             n("Unsqueeze", ["mf", "ax"], ["m3"]), n("Mul", ["o", "m3"], ["y"], name="apply_mask")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6]),
                                       helper.make_tensor_value_info(mask_name, TensorProto.INT64, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 4])],
                          [numpy_helper.from_array(rng.standard_normal((6, 16)).astype(np.float32), "w1"),
                           numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2"),
                           numpy_helper.from_array(np.array([2], np.int64), "ax")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 8
    return m


def test_refit_ignores_padded_positions():
    """Padded positions (attention mask 0) hold activations from another distribution (here 30x larger):
    fitted on every row, the refit trades the real tokens' error for theirs; on the real tokens only it
    does not. The same model with the mask input named otherwise is the control."""
    rng = np.random.default_rng(2)
    err = {}
    for name in ("attention_mask", "segment"):
        model = _masked_ffn(name)
        feeds = []
        for _ in range(24):
            x = rng.standard_normal((1, 8, 6)).astype(np.float32)
            x[:, 5:] *= 30.0
            feeds.append({"x": x, name: np.array([[1] * 5 + [0] * 3], np.int64)})
        rng = np.random.default_rng(2)  # the same data for both models
        res, pruned = _run_pass(model, feeds, ratio=0.4, criterion="l1", reconstruct=True)
        assert res.stats["reconstructed"] == 1, res.stats
        s0, s1 = runtime.session(model), runtime.session(pruned)
        err[name] = float(np.mean([np.square(s1.run(None, f)[0] - s0.run(None, f)[0]).mean() for f in feeds]))
    assert err["attention_mask"] < 0.5 * err["segment"], err


def test_obs_names_the_groups_it_leaves_to_mean_act():
    """criterion obs scores internal groups whose consumers can be refit; a residual-stream group falls back
    to mean |activation|, and its group stats say so (no group is reported as obs-scored that was not)."""
    model = inverted_residual(blocks=2)
    calib = _feeds(model, 8)
    g, ctx = cleaned(model)
    ctx.calib = Samples(calib, None, "test")
    from passes.prune_channels import plan

    pl = plan(g, ctx, PruneChannelsConfig(ratio=0.5, criterion="obs"))
    crit = {s.get("kind"): s["criterion"] for s in pl.group_stats if s.get("criterion")}
    assert crit.get("internal") == "obs", pl.group_stats
    assert crit.get("residual", "").startswith("mean_act (obs:"), pl.group_stats
