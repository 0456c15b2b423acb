"""sparsify.obs (SparseGPT/OBS) and sparsify.wanda: exact oracles on small layers."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.data import Samples
from compressor.errors import UsageError
from compressor.pass_base import PassContext, make_config
from compressor.pass_manager import PassManager
from passes import PASSES
from passes.sparsify_obs import sparsegpt
from passes.sparsity_patterns import parse_pattern, pattern_violations
from tests.conftest import conv_bn_model, make_model, mlp_model


def run_pass(name, model, calib, **cfg):
    cls = PASSES.get(name)
    return PassManager([(cls(make_config(cls, cfg)), "builtin:test")]).run(model, PassContext(calib=calib, template=model))


def inits(m):
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def correlated(n, d, rng, rank=8, mix=None):
    """Features with strong correlations: rank-``rank`` mixture plus small noise (same ``mix`` = same distribution)."""
    mix = rng.standard_normal((rank, d)) if mix is None else mix
    return (rng.standard_normal((n, rank)) @ mix + 0.05 * rng.standard_normal((n, d))).astype(np.float32)


def linear_model(w):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="lin")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])], {"w": w})


@pytest.mark.parametrize("pattern,s", [("unstructured", 0.5), ("unstructured", 0.8), ("2:4", 0.5), ("4x1", 0.6), ("1x4", 0.6)])
def test_obs_beats_magnitude_on_correlated_features(pattern, s):
    rng = np.random.default_rng(42)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    mix = rng.standard_normal((8, 64))
    xc, xt = correlated(256, 64, rng, mix=mix), correlated(512, 64, rng, mix=mix)
    calib = Samples([{"x": r[None]} for r in xc], None, "test")
    m = linear_model(w)
    cfg = dict(sparsity=s, pattern=pattern, keep_classifier=False, calib_samples=0)
    errs = {}
    for name in ("sparsify.magnitude", "sparsify.wanda", "sparsify.obs"):
        out, recs = run_pass(name, m, calib, **cfg)
        wq = inits(out)["w"]
        errs[name] = float(np.sum((xt @ w - xt @ wq) ** 2) / np.sum((xt @ w) ** 2))
        assert pattern_violations((wq != 0).T, parse_pattern(pattern)) == 0
        assert recs[0].stats["achieved_sparsity"] == pytest.approx(s, abs=4 / w.size)
    # asserted margin: OBS reconstruction error at most half of magnitude's on held-out correlated data
    assert errs["sparsify.obs"] < 0.5 * errs["sparsify.magnitude"], errs


def test_sparsegpt_exact_count_and_keeps_zero_error_when_nothing_pruned():
    rng = np.random.default_rng(1)
    x = correlated(200, 24, rng)
    h = x.T.astype(np.float64) @ x / len(x)
    w = rng.standard_normal((10, 24))
    wq, keep = sparsegpt(w, h, parse_pattern("unstructured"), 0.0, block_size=8)
    np.testing.assert_allclose(wq, w, atol=1e-12)
    wq, keep = sparsegpt(w, h, parse_pattern("unstructured"), 0.37, block_size=8)
    assert (~keep).sum() == round(0.37 * w.size) and np.all(wq[~keep] == 0)


def _np_sparsegpt_sequential(m, xs, s):
    """Oracle: prune mm1 from the calib inputs, then mm2 from the *pruned* mm1's activations."""
    w = inits(m)
    p = parse_pattern("unstructured")
    h1 = sum(x.T.astype(np.float64) @ x for x in xs) / len(xs)
    w1, _ = sparsegpt(w["w1"].T, h1, p, s)
    acts = [np.maximum(x @ w1.T.astype(np.float32) + w["b1"], 0) for x in xs]
    h2 = sum(a.T.astype(np.float64) @ a for a in acts) / len(acts)
    w2, _ = sparsegpt(w["w2"].T, h2, p, s)
    return w1.T, w2.T


def test_obs_is_sequential_each_layer_sees_pruned_inputs():
    m = mlp_model()
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(40)]
    out, recs = run_pass("sparsify.obs", m, Samples([{"x": x} for x in xs], None, "t"), sparsity=0.5,
                         keep_classifier=False, min_elements=0, calib_samples=0)
    w1, w2 = _np_sparsegpt_sequential(m, xs, 0.5)
    got = inits(out)
    np.testing.assert_allclose(got["w1"], w1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["w2"], w2, rtol=1e-4, atol=1e-5)
    assert recs[0].stats["captures"] == 2
    np.testing.assert_array_equal(got["b1"], inits(m)["b1"])  # biases untouched


def test_wanda_scores_per_output_oracle():
    m = mlp_model()
    rng = np.random.default_rng(4)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) * np.linspace(0.1, 3, 16, dtype=np.float32) for _ in range(30)]
    out, _ = run_pass("sparsify.wanda", m, Samples([{"x": x} for x in xs], None, "t"), sparsity=0.5, calib_samples=0)
    w1 = inits(m)["w1"]  # [K=16, N=32]
    norm = np.sqrt(sum((x[0].astype(np.float64) ** 2) for x in xs))
    score = np.abs(w1.T) * norm  # [N, K]
    kept = inits(out)["w1"].T != 0
    assert (~kept).sum(axis=1).tolist() == [8] * 32
    for r in range(32):
        assert score[r][kept[r]].min() >= score[r][~kept[r]].max()


def test_obs_conv_patterns_valid_and_counts_exact():
    # conv_bn_model's conv has 3 input channels (stem): include it explicitly; it has BN but obs only needs the conv input
    m = conv_bn_model()
    rng = np.random.default_rng(5)
    calib = Samples([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)], None, "t")
    for pattern, s in (("unstructured", 0.7), ("2:4", 0.5), ("8x1", 0.5)):
        out, recs = run_pass("sparsify.obs", m, calib, sparsity=s, pattern=pattern, keep_stem=False, keep_classifier=False)
        w = inits(out)["w"].reshape(8, -1)
        assert pattern_violations(w != 0, parse_pattern(pattern)) == 0
        layer = recs[0].stats["layers"]["conv"]
        assert layer["rel_recon_error"] < 1.0
        if pattern != "8x1":
            assert (w == 0).sum() == (round(s * w.size) if pattern == "unstructured" else 8 * (6 * 2 + 2))  # 27 cols: 6 full groups + a 3-col tail, 2 pruned each


@pytest.mark.parametrize("name", ["sparsify.obs", "sparsify.wanda"])
def test_data_aware_passes_need_calib(name):
    with pytest.raises(UsageError, match="--calib"):
        run_pass(name, mlp_model(), None, sparsity=0.5)


def test_nm_pattern_fixes_sparsity():
    cls = PASSES.get("sparsify.obs")
    with pytest.raises(UsageError, match="2:4"):
        make_config(cls, {"sparsity": 0.7, "pattern": "2:4"})
    make_config(cls, {"sparsity": 0.75, "pattern": "1:4"})


def test_auto_keeps_the_candidate_with_the_smaller_held_out_error():
    """sparsify.auto: every candidate runs on the calibration samples minus every 4th; the one whose
    output is closer to the dense model's on those held-out samples is kept, bit for bit what that
    candidate alone produces on the same fitting samples."""
    from compressor.metrics import rel_error
    from compressor import runtime

    m = mlp_model()
    rng = np.random.default_rng(11)
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    name = m.graph.input[0].name
    feeds = [{name: (rng.standard_normal(shape) * (1 + 3 * (np.arange(shape[-1]) % 5 == 0))).astype(np.float32)}
             for _ in range(16)]
    calib = Samples(feeds, None, "t")
    out, recs = run_pass("sparsify.auto", m, calib, sparsity=0.6, keep_classifier=False, min_elements=0)
    mc = recs[0].stats["method_choice"]
    assert mc["held_out"] == 4 and mc["fit_samples"] == 12 and set(mc["errors"]) == {"obs", "wanda"}
    held = feeds[3::4]
    fit = [f for i, f in enumerate(feeds) if i % 4 != 3]
    ref = runtime.run_all(runtime.session(m), held)
    errs = {}
    for cand in ("obs", "wanda"):
        alone, _ = run_pass(f"sparsify.{cand}", m, Samples(fit, None, "t"), sparsity=0.6, keep_classifier=False,
                            min_elements=0, calib_samples=0)
        errs[cand] = rel_error(runtime.run_all(runtime.session(alone), held), ref)
        if cand == mc["chosen"]:
            for k, v in inits(alone).items():
                assert np.array_equal(inits(out)[k], v), k
    assert mc["chosen"] == min(errs, key=errs.get)
    assert all(abs(mc["errors"][c] - errs[c]) <= 1e-6 * max(errs[c], 1e-12) + 1e-12 for c in errs)
    with pytest.raises(UsageError):
        make_config(PASSES.get("sparsify.auto"), {"candidates": ["sgd"]})


def test_solve_group_keeps_the_variant_with_the_least_reconstruction_error():
    """Per group, OBS/SparseGPT, the activation-weighted mask and that mask with the OBS update are solved;
    the smallest ||(W - Wq) X^T||^2 wins. ["obs"] alone is plain SparseGPT."""
    from passes.sparsify_obs import solve_group

    rng = np.random.default_rng(4)
    pat = parse_pattern("unstructured")
    for trial in range(6):
        x = correlated(256, 24, rng, rank=4 + trial) if trial % 2 else rng.standard_normal((256, 24)) * rng.uniform(0.1, 3, 24)
        h = x.T @ x / len(x)
        w = rng.standard_normal((16, 24))
        k = int(0.5 * w.size)
        errs = {}
        for v in ("obs", "act", "act_update"):
            wq, keep, num, den, got = solve_group(w, h, pat, 0.5, k, 128, 0.01, (v,))
            assert got == v and (~keep).sum() == k and np.all(wq[~keep] == 0)
            d = w - wq
            assert abs(num - float(np.sum((d @ h) * d))) <= 1e-9 * max(num, 1)
            errs[v] = num
        wq, keep, num, den, got = solve_group(w, h, pat, 0.5, k, 128, 0.01)
        assert got == min(errs, key=errs.get) and num == errs[got]
        ref, _ = sparsegpt(w, h, pat, 0.5, k=k)
        assert np.array_equal(solve_group(w, h, pat, 0.5, k, 128, 0.01, ("obs",))[0], ref)
        # the activation mask prunes each row's own share
        _, keep_act, *_ = solve_group(w, h, pat, 0.5, k, 128, 0.01, ("act",))
        assert set((~keep_act).sum(axis=1).tolist()) == {12}


def test_dense_targets_first_layer_unchanged_second_layer_closed_form_and_lower_error():
    """dense_targets: the first layer sees the dense inputs (X' = X, so W' = W: identical to plain OBS); the second
    layer's target is W' = W + W (G^T - H)(H + lambda I)^-1 with H = X'^T X', G = X'^T X (pruned vs dense
    activations), and the pruned chain's output is closer to the dense chain's than without it."""
    from passes.sparsify_obs import _dense_target
    from passes.sparsity_patterns import select_layers

    m = mlp_model()
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(64)]
    calib = Samples([{"x": x} for x in xs], None, "t")
    cfg = dict(sparsity=0.6, keep_classifier=False, min_elements=0, calib_samples=0, variants=["obs"])
    plain, _ = run_pass("sparsify.obs", m, calib, **cfg)
    dt, recs = run_pass("sparsify.obs", m, calib, dense_targets=True, **cfg)
    assert recs[0].stats["captures"] == 2
    w, p, d = inits(m), inits(plain), inits(dt)
    np.testing.assert_array_equal(d["w1"], p["w1"])  # identical inputs: the target is W itself

    x = np.concatenate(xs).astype(np.float64)
    a_dense = np.maximum(x @ w["w1"] + w["b1"], 0)
    a_pruned = np.maximum(x @ d["w1"].astype(np.float64) + w["b1"], 0)
    h, g = a_pruned.T @ a_pruned / len(x), a_pruned.T @ a_dense / len(x)
    import onnx_graphsurgeon as gs
    graph = gs.import_onnx(m)
    lay = next(l for l in select_layers(graph, make_config(PASSES.get("sparsify.obs"), cfg))[0] if l.weight.name == "w2")
    target = _dense_target(lay, [h], [g], 0.01)
    lam = 0.01 * np.mean(np.diag(h))
    ref = w["w2"].T + w["w2"].T @ (g.T - h) @ np.linalg.inv(h + lam * np.eye(len(h)))
    np.testing.assert_allclose(target, ref, rtol=1e-8, atol=1e-10)
    # the pruned chain's output error against the dense chain's, on the calibration inputs
    y = a_dense @ w["w2"]
    err = {k: float(np.sum((np.maximum(x @ q["w1"] + w["b1"], 0) @ q["w2"] - y) ** 2) / np.sum(y ** 2))
           for k, q in (("plain", p), ("dense_targets", d))}
    assert err["dense_targets"] < err["plain"], err
