"""The real-model suite (models/real_suite.py) on its two smallest models: PaddleOCR's text-orientation
classifier (a MobileNetV3 with depthwise convs, 0.6 MB, from rapidocr-onnxruntime) and Google's magika
file-type classifier (3.2 MB). Their wheels come from PyPI (cached in the suite's cache folder); a test
skips with the reason when the package cannot be fetched (offline)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from models import real_suite as rs

SMALL = ["ppocr_cls", "magika"]


@pytest.fixture(scope="module")
def built():
    def get(name):
        try:
            return rs.ensure_built(name)
        except rs.ModelUnavailable as e:
            pytest.skip(f"{name}: {e}")
    return get


def test_registry_is_complete():
    fams = " ".join(m.family for m in rs.SUITE.values()).lower()
    assert len(rs.SUITE) >= 5
    for word in ("depthwise", "transformer", "lstm", "text recognizer", "file-type"):
        assert word in fams, word
    for m in rs.SUITE.values():
        assert "==" in m.package and m.licence and m.task_metric and m.agree_metric
        assert all(shp[0] >= 1 for shp in m.inputs.values())


@pytest.mark.parametrize("name", SMALL)
def test_data_match_model_and_dense_metric_is_perfect(built, name):
    d = built(name)
    spec = rs.SUITE[name]
    model = onnx.load(str(d / "model.onnx"))
    onnx.checker.check_model(model)
    meta = json.loads((d / "meta.json").read_text())
    assert meta["onnx_sha256"] == rs._sha256(d / "model.onnx")
    inits = {t.name for t in model.graph.initializer}
    graph_inputs = {i.name: [x.dim_value for x in i.type.tensor_type.shape.dim] for i in model.graph.input if i.name not in inits}
    assert graph_inputs == spec.inputs                       # static shapes, as registered
    for f, n_min in (("calib.npz", rs.N_CALIB), ("eval.npz", 100)):
        with np.load(d / f) as z:
            assert set(z.files) - {"labels"} == set(spec.inputs), f
            n = {z[k].shape[0] for k in z.files}
            assert len(n) == 1 and n.pop() >= n_min, f
            for k, shp in spec.inputs.items():                # data-file layout: [N, *shape[1:]] for batch 1
                assert z[k].shape[1:] == tuple(shp[1:] if shp[0] == 1 else shp), (f, k)
    with np.load(d / "calib.npz") as c, np.load(d / "eval.npz") as e:
        k = next(iter(spec.inputs))
        assert not np.array_equal(c[k][: len(e[k])], e[k][: len(c[k])])   # different samples
    ev = rs.load_eval(name)
    assert "labels" in ev and ev["labels"].dtype.kind == "i"
    outs = rs.run_onnx(d / "model.onnx", ev["inputs"])      # onnxruntime on eval.npz
    for k, v in outs.items():
        np.testing.assert_allclose(v, ev["ref"][k], rtol=1e-5, atol=1e-6)
    m = spec.metric(outs, ev)
    assert m[spec.agree_metric] == 1.0
    assert m[spec.task_metric] >= 0.8 and m[spec.task_metric] == m["dense_" + spec.task_metric]
    # the metric sees a broken model: shuffled outputs disagree
    bad = {k: v[np.random.default_rng(0).permutation(len(v))] for k, v in outs.items()}
    assert spec.metric(bad, ev)[spec.agree_metric] < 0.95


def test_cli_runs_on_real_model(built, cli, tmp_path):
    d = built("ppocr_cls")
    # magnitude, no accuracy search: the CLI's plumbing on a real model in seconds (with --calib the default is
    # OBS with a sensitivity sweep, ~35 s here, plus the search on a gate failure; bench/real_models.py runs those)
    r = cli(d / "model.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz", "--no-compile", "--sparsity", "0.5",
            "--method", "magnitude", "--allocation", "uniform", "--search-budget", "0", "-o", tmp_path / "b")
    assert r.code in (0, 3), r
    assert (tmp_path / "b" / "model.onnx").exists()
    m = rs.score("ppocr_cls", tmp_path / "b" / "model.onnx")
    assert 0.0 <= m["top1_agreement"] <= 1.0


def test_ctc_and_cer_helpers():
    chars = ["<blank>", "a", "b", " "]
    probs = np.eye(4)[[1, 1, 0, 1, 2, 2, 0, 3, 0]][None]     # a a _ a b b _ ' ' _ -> "aab "
    assert rs.ctc_greedy(probs, chars) == ["aab "]
    assert rs.levenshtein("kitten", "sitting") == 3 and rs.levenshtein("", "abc") == 3
