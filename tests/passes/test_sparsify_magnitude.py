"""sparsify.magnitude: exact zero counts, untouched biases, exact no-op at 0."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from compressor.errors import UsageError
from compressor.pass_base import PassContext, make_config
from compressor.pass_manager import PassManager
from passes import PASSES
from passes.sparsify_magnitude import magnitude_mask
from tests.conftest import conv_bn_model, mlp_model, ort_run


def sparsify(model, **cfg):
    cls = PASSES.get("sparsify.magnitude")
    return PassManager([(cls(make_config(cls, cfg)), "builtin:test")]).run(model, PassContext())


@pytest.mark.parametrize("s", [0.3, 0.5, 0.9])
def test_exact_per_layer_sparsity_and_biases_untouched(s):
    m = mlp_model()
    before = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    out, recs = sparsify(m, sparsity=s, keep_classifier=False)
    after = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    for name in ("w1", "w2"):
        w = after[name]
        assert np.count_nonzero(w == 0) == round(s * w.size)
        kept = before[name][w != 0]
        dropped = before[name][w == 0]
        assert np.abs(kept).min() >= np.abs(dropped).max()  # magnitude order respected
        np.testing.assert_array_equal(w[w != 0], before[name][w != 0])  # survivors unchanged
    np.testing.assert_array_equal(after["b1"], before["b1"])
    assert recs[0].stats["achieved_sparsity"] == pytest.approx(s, abs=1 / 512)


def test_zero_sparsity_is_exact_noop():
    m = conv_bn_model()
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    out, recs = sparsify(m, sparsity=0.0)
    np.testing.assert_array_equal(ort_run(out, {"x": x})[0], ort_run(m, {"x": x})[0])
    assert recs[0].modified is False


def test_ignore_and_min_elements_are_reported():
    out, recs = sparsify(mlp_model(), sparsity=0.5, ignore=["mm1"], min_elements=0, keep_classifier=False)
    assert set(recs[0].stats["layers"]) == {"mm2"}
    assert any("mm1" in w and "ignored" in w for w in recs[0].warnings)


def test_stem_and_classifier_kept_dense_by_default_and_reported():
    # conv_bn_model: conv has 3 input channels (stem), fc feeds the output through Dropout->Identity-like ops
    m = conv_bn_model()
    out, recs = sparsify(m, sparsity=0.5)
    assert recs[0].stats["layers"] == {}
    text = " ".join(recs[0].warnings)
    assert "conv: stem conv" in text
    out, recs = sparsify(m, sparsity=0.5, keep_stem=False, keep_classifier=False)
    assert set(recs[0].stats["layers"]) == {"conv", "fc"}


def test_mask_ties_give_exact_count():
    w = np.ones((4, 4), np.float32)
    assert (~magnitude_mask(w, 0.5)).sum() == 8


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_bad_sparsity_rejected(bad):
    cls = PASSES.get("sparsify.magnitude")
    with pytest.raises(UsageError):
        make_config(cls, {"sparsity": bad})


def test_unknown_config_key_rejected():
    cls = PASSES.get("sparsify.magnitude")
    with pytest.raises(UsageError, match="unknown config key"):
        make_config(cls, {"sparsty": 0.5})


# --- patterns and allocation -------------------------------------------------------------------------------

from compressor.data import Samples  # noqa: E402
from passes.sparsity_patterns import parse_pattern, pattern_violations  # noqa: E402


@pytest.mark.parametrize("pattern,s", [("2:4", 0.5), ("4:8", 0.5), ("1:4", 0.75), ("1x4", 0.5), ("4x1", 0.7), ("8x1", 0.5), ("16x1", 0.9)])
def test_patterns_through_the_pass_are_valid(pattern, s):
    m = mlp_model()  # w1 [16, 32] (MatMul B: canonical view is w.T [32 outputs, 16 reduction])
    out, recs = sparsify(m, sparsity=s, pattern=pattern, keep_classifier=False, min_elements=0)
    w1 = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}["w1"]
    p = parse_pattern(pattern)
    assert pattern_violations(w1.T != 0, p) == 0
    # exact for N:M (16 columns) and up to one block for RxC (whole blocks only)
    assert abs(np.count_nonzero(w1 == 0) - round(s * w1.size)) <= (p.r * p.c / 2 if p.kind == "block" else 0)
    assert recs[0].stats["layers"]["mm1"]["sparsity"] == pytest.approx(s, abs=(p.r * p.c / 2 + 0.5) / w1.size)


def test_global_allocation_meets_target_with_one_threshold():
    m = mlp_model()
    out, recs = sparsify(m, sparsity=0.6, allocation="global", keep_classifier=False, min_elements=0)
    st = recs[0].stats
    assert st["achieved_sparsity"] == pytest.approx(0.6, abs=1 / 640)
    w = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    before = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    kept = np.concatenate([np.abs(before[n][w[n] != 0]) for n in ("w1", "w2")])
    dropped = np.concatenate([np.abs(before[n][w[n] == 0]) for n in ("w1", "w2")])
    assert kept.min() >= dropped.max()  # one threshold across layers


def test_sensitivity_allocation_needs_calib_and_meets_target():
    m = mlp_model()
    with pytest.raises(UsageError, match="--calib"):
        sparsify(m, sparsity=0.5, allocation="sensitivity", keep_classifier=False)
    rng = np.random.default_rng(0)
    calib = Samples([{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(16)], None, "t")
    cls = PASSES.get("sparsify.magnitude")
    out, recs = PassManager([(cls(make_config(cls, {"sparsity": 0.7, "allocation": "sensitivity", "keep_classifier": False})), "t")]
                            ).run(m, PassContext(calib=calib, template=m))
    st = recs[0].stats
    assert st["achieved_sparsity"] == pytest.approx(0.7, abs=1 / 640)
    assert set(st["sensitivity"]) == {"mm1", "mm2"}


def test_nm_with_allocation_is_a_warning():
    out, recs = sparsify(mlp_model(), sparsity=0.5, pattern="2:4", allocation="global", keep_classifier=False)
    assert any("allocation global ignored" in w for w in recs[0].warnings)


def test_include_overrides_default_exclusions_through_cli(cli, tmp_path):
    import json

    import onnx

    onnx.save(conv_bn_model(), tmp_path / "m.onnx")
    r = cli(tmp_path / "m.onnx", "--sparsity", "0.5", "--include", "conv", "-o", tmp_path / "o", "--no-compile", "--no-latency", "--no-gate")
    assert r.code == 0, r
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    layers = [p for p in rep["passes"] if p["name"] == "sparsify.magnitude"][0]["stats"]["layers"]
    assert "conv" in layers and "fc" not in layers  # stem included on request; classifier still kept by default
