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
