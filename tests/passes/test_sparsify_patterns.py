"""Shared sparsity machinery: pattern masks (exact counts, validity), canonical views, im2col, global allocation."""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from compressor.errors import UsageError
from passes.sparsity_patterns import (Layer, from_matrix, global_allocation, layer_features, parse_pattern,
                                      pattern_violations, select_mask, to_matrix, unstructured_mask)
from passes.sparsify_magnitude import magnitude_mask
from tests.conftest import make_model, ort_run

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("text,kind", [("unstructured", "unstructured"), ("2:4", "nm"), ("4:8", "nm"), ("1:4", "nm"),
                                       ("1x4", "block"), ("4x1", "block"), ("8x1", "block"), ("16x1", "block"), ("3x5", "block")])
def test_parse_pattern(text, kind):
    p = parse_pattern(text)
    assert p.kind == kind and p.text == text


@pytest.mark.parametrize("bad", ["4:2", "0:4", "1x1", "diagonal", "2-4"])
def test_bad_pattern_rejected(bad):
    with pytest.raises(UsageError):
        parse_pattern(bad)


@pytest.mark.parametrize("shape", [(8, 16), (7, 13), (1, 50)])
@pytest.mark.parametrize("s", [0.1, 0.5, 0.9])
def test_unstructured_exact(shape, s):
    sc = RNG.random(shape)
    keep = select_mask(sc, parse_pattern("unstructured"), s)
    assert (~keep).sum() == round(s * sc.size)
    assert sc[keep].min() >= sc[~keep].max()
    per_row = select_mask(sc, parse_pattern("unstructured"), s, per_row=True)
    assert (~per_row).sum() == round(s * sc.size)
    cnt = (~per_row).sum(axis=1)
    assert cnt.max() - cnt.min() <= 1
    for r in range(shape[0]):  # per-row order respected
        if keep[r].any() and (~per_row[r]).any():
            assert sc[r][per_row[r]].min() >= sc[r][~per_row[r]].max()


@pytest.mark.parametrize("text", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("cols", [16, 18, 3])
def test_nm_groups(text, cols):
    p = parse_pattern(text)
    sc = RNG.random((5, cols))
    keep = select_mask(sc, p, 1 - p.n / p.m)
    assert pattern_violations(keep, p) == 0
    full = cols // p.m * p.m
    g = keep[:, :full].reshape(5, -1, p.m)
    assert (g.sum(axis=2) == p.n).all()  # full groups keep exactly N
    sg = sc[:, :full].reshape(5, -1, p.m)
    kept_min = np.where(g, sg, np.inf).min(axis=2)
    dropped_max = np.where(~g, sg, -np.inf).max(axis=2)
    assert (kept_min >= dropped_max).all()
    # the oracle counts a violation
    bad = keep.copy()
    bad[0, : min(p.m, cols)] = True
    if min(p.m, cols) > p.n:
        assert pattern_violations(bad, p) >= 1


@pytest.mark.parametrize("text", ["1x4", "4x1", "8x1", "16x1", "2x3"])
@pytest.mark.parametrize("shape", [(32, 64), (20, 30)])
@pytest.mark.parametrize("s", [0.5, 0.7, 0.9])
def test_block_mask(text, shape, s):
    p = parse_pattern(text)
    sc = np.abs(RNG.standard_normal(shape))
    keep = select_mask(sc, p, s)
    assert pattern_violations(keep, p) == 0
    assert abs((~keep).sum() - round(s * sc.size)) <= p.r * p.c / 2 + 1e-9  # exact up to one block
    # every dropped full block has a norm <= every kept full block
    R, C = shape[0] // p.r * p.r, shape[1] // p.c * p.c
    b = sc[:R, :C].reshape(R // p.r, p.r, C // p.c, p.c)
    kb = keep[:R, :C].reshape(b.shape).all(axis=(1, 3))
    norms = np.sqrt((b ** 2).sum(axis=(1, 3)))
    if kb.any() and (~kb).any():
        assert norms[kb].min() >= norms[~kb].max() - 1e-12
    bad = keep.copy()
    bad[0, 0] = not bad[0, 0]
    assert pattern_violations(bad, p) == 1


def _layer(op, w, index=1, **attrs):
    x = gs.Variable("x")
    wc = gs.Constant("w", w)
    inputs = [x, wc] if index == 1 else [wc, x]
    return Layer(gs.Node(op, "n", attrs=attrs, inputs=inputs, outputs=[gs.Variable("y")]), wc, index)


@pytest.mark.parametrize("op,shape,index,attrs", [("Conv", (8, 4, 3, 3), 1, {}), ("Gemm", (6, 10), 1, {"transB": 1}),
                                                   ("Gemm", (10, 6), 1, {"transB": 0}), ("MatMul", (10, 6), 1, {}),
                                                   ("MatMul", (6, 10), 0, {}), ("ConvTranspose", (4, 8, 3, 3), 1, {})])
def test_canonical_view_round_trip_and_axes(op, shape, index, attrs):
    w = RNG.standard_normal(shape).astype(np.float32)
    l = _layer(op, w, index, **attrs)
    w2 = to_matrix(l, w)
    np.testing.assert_array_equal(from_matrix(l, w2, w.shape), w)
    out_ch = {"Conv": 8, "Gemm": 6, "MatMul": 6, "ConvTranspose": 8}[op]
    assert w2.shape[0] == out_ch  # rows are outputs, columns the reduction axis


@pytest.mark.parametrize("attrs", [dict(pads=[1, 1, 1, 1]), dict(strides=[2, 2], pads=[0, 1, 1, 0]),
                                   dict(dilations=[2, 1], group=2, pads=[2, 1, 2, 1]), dict(auto_pad="SAME_UPPER", strides=[2, 2])])
def test_im2col_features_reproduce_conv(attrs):
    """X_g @ W2_g.T must equal onnxruntime's Conv output (the exact oracle for Wanda/OBS statistics)."""
    g = attrs.get("group", 1)
    w = RNG.standard_normal((6, 4 // g, 3, 3)).astype(np.float32)
    x = RNG.standard_normal((1, 4, 9, 8)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    m = make_model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 8])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], {"w": w})
    y = ort_run(m, {"x": x})[0]
    l = _layer("Conv", w, 1, **attrs)
    feats = layer_features(l, x.astype(np.float64))
    w2 = to_matrix(l, w)
    rows_g = 6 // g
    outs = [f @ w2[i * rows_g:(i + 1) * rows_g].T for i, f in enumerate(feats)]  # [OH*OW, rows_g]
    got = np.concatenate(outs, axis=1).reshape(y.shape[2], y.shape[3], 6).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)


def test_global_allocation_single_threshold_floor_ceiling():
    scores = {"a": RNG.random((10, 10)) * 0.1, "b": RNG.random((20, 20)), "c": RNG.random((5, 40)) * 10}
    p = parse_pattern("unstructured")
    alloc, warns = global_allocation(scores, p, 0.6, 0.1, 0.95)
    n = {k: v.size for k, v in scores.items()}
    total = sum(alloc[k] * n[k] for k in n)
    assert abs(total - 0.6 * sum(n.values())) <= 1.0 and not warns
    assert all(0.1 - 1e-9 <= alloc[k] <= 0.95 + 1e-9 for k in n)
    assert alloc["a"] == pytest.approx(0.95)  # small-scale layer hits the ceiling
    assert alloc["c"] < alloc["b"] < alloc["a"]
    _, warns = global_allocation(scores, p, 0.97, 0.0, 0.95)
    assert warns  # infeasible target is reported, not silent


def test_stem_is_the_first_weighted_conv_not_a_squeeze_excite_conv():
    """``is_stem_conv``: <= 4 input channels *and* no weighted layer upstream. A squeeze-excite conv on
    4 squeezed channels (ppocr_cls's conv2_se_2) is not a stem."""
    from passes.sparsity_patterns import find_layers, is_stem_conv, select_layers, SparsifyConfig

    f32 = TensorProto.FLOAT
    w = lambda *s: RNG.standard_normal(s).astype(np.float32)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["a"], ["p"]),
             helper.make_node("Conv", ["p", "w1"], ["q"], name="se_reduce"),
             helper.make_node("Conv", ["q", "w2"], ["r"], name="se_expand"),
             helper.make_node("Mul", ["a", "r"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", f32, [1, 3, 8, 8])],
                   [helper.make_tensor_value_info("y", f32, [1, 16, 8, 8])],
                   {"w0": w(16, 3, 3, 3), "w1": w(4, 16, 1, 1), "w2": w(16, 4, 1, 1)})
    g = gs.import_onnx(m)
    stems = {l.name for l in find_layers(g) if is_stem_conv(l.node, l.values)}
    assert stems == {"stem"}
    # the default keeps the stem dense by rule; measured (sensitivity) allocation prunes it like any layer
    _, warn = select_layers(g, SparsifyConfig(sparsity=0.5, min_elements=0))
    assert any("stem: stem conv" in x for x in warn) and not any("se_expand" in x for x in warn)
    layers, warn = select_layers(g, SparsifyConfig(sparsity=0.5, min_elements=0, allocation="sensitivity"))
    assert {l.name for l in layers} == {"stem", "se_reduce", "se_expand"} and not warn


# ----------------------------------------------------------------------------- partial-sort selection: exact oracles


def _sorted_mask(scores, k, per_row=False):
    """The full-sort reference: the first k entries of a stable argsort (per row: each row's share)."""
    s = np.asarray(scores, np.float64)
    keep = np.ones(s.shape, bool)
    if not per_row:
        keep.ravel()[np.argsort(s.ravel(), kind="stable")[:k]] = False
        return keep
    per = np.full(s.shape[0], k // s.shape[0])
    per[: k - per.sum()] += 1
    order = np.argsort(s, axis=1, kind="stable")
    for r in range(s.shape[0]):
        keep[r, order[r, : per[r]]] = False
    return keep


def _sorted_global_allocation(scores, pattern, target, floor, ceiling):
    """global_allocation as it was with sorted scores (np.sort + searchsorted): the reference."""
    from passes.sparsity_patterns import block_scores

    units = {}
    for name, s in scores.items():
        if pattern.kind == "block":
            bs, size = block_scores(s, pattern.r, pattern.c)
            order = np.argsort(bs.ravel(), kind="stable")
            units[name] = (bs.ravel()[order], np.cumsum(size.ravel()[order]))
        else:
            units[name] = (np.sort(np.asarray(s, np.float64).ravel()), np.arange(1, s.size + 1, dtype=np.float64))
    n = {k: float(s.size) for k, s in scores.items()}
    total = sum(n.values())
    want = target * total
    lo_cap, hi_cap = sum(floor * v for v in n.values()), sum(ceiling * v for v in n.values())
    want = min(max(want, lo_cap), hi_cap)

    def pruned(t):
        out = {}
        for k, (sv, cum) in units.items():
            j = int(np.searchsorted(sv, t, side="left"))
            out[k] = min(max(cum[j - 1] if j > 0 else 0.0, floor * n[k]), ceiling * n[k])
        return out

    allv = np.concatenate([u[0] for u in units.values()])
    lo, hi = float(allv.min()) - 1.0, float(allv.max()) + 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if sum(pruned(mid).values()) < want:
            lo = mid
        else:
            hi = mid
    counts = pruned(hi)
    resid = want - sum(counts.values())
    for k in sorted(counts, key=lambda k: -n[k]):
        if abs(resid) < 0.5:
            break
        room = (ceiling * n[k] - counts[k]) if resid > 0 else (counts[k] - floor * n[k])
        step = min(abs(resid), max(room, 0.0)) * np.sign(resid)
        counts[k] += step
        resid -= step
    return {k: counts[k] / n[k] for k in counts}


def _tied_scores(rng, shape, levels):
    """|w|-like scores drawn from few distinct values (many ties), some exact zeros."""
    return np.abs(rng.integers(-levels, levels + 1, size=shape)).astype(np.float32) * np.float32(0.125)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 33), (64, 64), (5, 1000)])
@pytest.mark.parametrize("s", [0.0, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_unstructured_mask_equals_full_sort(seed, shape, s):
    rng = np.random.default_rng(seed)
    for sc in (_tied_scores(rng, shape, 1 + seed), rng.standard_normal(shape).astype(np.float32)):
        k = round(s * sc.size)
        keep = unstructured_mask(sc, s)
        assert (~keep).sum() == k
        np.testing.assert_array_equal(keep, _sorted_mask(sc, k))
        rows = unstructured_mask(sc, s, per_row=True)
        assert (~rows).sum() == k
        np.testing.assert_array_equal(rows, _sorted_mask(sc, k, per_row=True))
        for kk in (1, sc.size // 3, sc.size):  # an explicit count (OBS's use)
            np.testing.assert_array_equal(unstructured_mask(sc, 0.0, k=kk), _sorted_mask(sc, kk))
            np.testing.assert_array_equal(unstructured_mask(sc, 0.0, per_row=True, k=kk), _sorted_mask(sc, kk, per_row=True))


def test_unstructured_mask_nan_inf_and_signed_zero_like_a_stable_sort():
    sc = np.array([[np.nan, 0.0, -0.0, np.inf, 1.0, np.nan, -np.inf, 0.0],
                   [2.0, np.nan, np.nan, np.nan, 0.0, -0.0, 2.0, 2.0]])
    for k in range(sc.size + 1):
        np.testing.assert_array_equal(unstructured_mask(sc, 0.0, k=k), _sorted_mask(sc, k))
        np.testing.assert_array_equal(unstructured_mask(sc, 0.0, per_row=True, k=k), _sorted_mask(sc, k, per_row=True))


def test_magnitude_mask_equals_full_sort_with_ties():
    rng = np.random.default_rng(7)
    w = (rng.integers(-3, 4, size=(8, 4, 3, 3)) * 0.5).astype(np.float32)  # a conv weight full of ties
    for s in (0.2, 0.5, 0.77):
        keep = magnitude_mask(w, s)
        assert (~keep).sum() == round(s * w.size)
        np.testing.assert_array_equal(keep, _sorted_mask(np.abs(w).reshape(1, -1), round(s * w.size)).reshape(w.shape))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pattern", ["unstructured", "1x4", "4x1", "3x5"])
@pytest.mark.parametrize("target,floor,ceiling", [(0.6, 0.1, 0.95), (0.9, 0.0, 0.99), (0.3, 0.0, 1.0), (0.97, 0.0, 0.95),
                                                  (0.05, 0.2, 0.9)])
def test_global_allocation_equals_full_sort(seed, pattern, target, floor, ceiling):
    rng = np.random.default_rng(seed)
    scores = {"a": _tied_scores(rng, (10, 12), 3), "b": rng.random((20, 21)).astype(np.float32),
              "c": _tied_scores(rng, (5, 40), 2) * 10, "d": np.zeros((4, 8), np.float32)}
    p = parse_pattern(pattern)
    alloc, _ = global_allocation(scores, p, target, floor, ceiling)
    assert alloc == _sorted_global_allocation(scores, p, target, floor, ceiling)


@pytest.mark.parametrize("kind", ["spread", "zeros", "levels", "strided"])
@pytest.mark.parametrize("pattern", ["unstructured", "4x1"])
@pytest.mark.parametrize("target,floor,ceiling", [(0.5, 0.0, 0.99), (0.9, 0.0, 0.99), (0.6, 0.3, 0.8), (0.95, 0.0, 0.95)])
def test_global_allocation_equals_full_sort_on_sampled_sizes(kind, pattern, target, floor, ceiling):
    """Big enough (> 65536 scores) that the threshold is bracketed from a sample: exact all the same, also with many
    ties, floors/ceilings that bind, and a sample that misrepresents the scores (every 4th score large)."""
    rng = np.random.default_rng(1)
    shapes = {"a": (256, 512), "b": (128, 256), "c": (512, 192)}
    scores = {}
    for i, (name, shape) in enumerate(shapes.items()):
        x = np.abs(rng.standard_normal(shape)).astype(np.float32) * np.float32(10.0 ** (i - 1))
        if kind == "zeros":
            x[rng.random(shape) < 0.6] = 0
        elif kind == "levels":
            x = np.round(x * 4) / 4
        elif kind == "strided":
            flat = x.reshape(-1)
            flat[::4] += np.float32(100)  # the sample (a stride) sees only these
        scores[name] = x
    p = parse_pattern(pattern)
    alloc, _ = global_allocation(scores, p, target, floor, ceiling)
    assert alloc == _sorted_global_allocation(scores, p, target, floor, ceiling)


@pytest.mark.parametrize("special", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("target", [0.2, 0.5, 0.9])
def test_global_allocation_equals_full_sort_with_nan_and_inf(special, target):
    rng = np.random.default_rng(3)
    scores = {"a": rng.random((6, 7)), "b": rng.random((5, 9)) * 3}
    scores["a"][1, 2] = scores["b"][4, 0] = special
    p = parse_pattern("unstructured")
    assert global_allocation(scores, p, target, 0.0, 0.99)[0] == _sorted_global_allocation(scores, p, target, 0.0, 0.99)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.9])
def test_global_allocation_equals_full_sort_with_both_infinities(target):
    rng = np.random.default_rng(4)
    scores = {"a": rng.random((6, 7)), "b": rng.random((5, 9))}
    scores["a"][0, 0], scores["b"][1, 1] = -np.inf, np.inf  # the first middle is NaN
    p = parse_pattern("unstructured")
    assert global_allocation(scores, p, target, 0.0, 0.99)[0] == _sorted_global_allocation(scores, p, target, 0.0, 0.99)
