"""lower.sparse CPU cost model: features and time models with exact oracles, the fit of
bench/cost_model.py recovering a known model, decision scoring, and the decisions the
calibration (bench/cost_model.md) made on the layers issue #5 names."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from targets import lower_sparse as ls
from tests.targets.lower_sparse_util import lower


def test_dense_features_by_hand():
    # 512x512 GEMV: 2^18 MACs = targets.dense_kernels.PARALLEL_MIN_MACS -> parallel
    f = ls.time_features("MatMul", "dense", 512, 512, 1, 1.0, (8, 1))
    assert f == [0.0, 1.0, 4.0 * 512 * 512, 0.0, 0.0, 512.0 * 512, 4.0 * (512 + 512)]
    f = ls.time_features("MatMul", "dense", 256, 256, 1, 1.0, (1, 1))
    assert f[:2] == [1.0, 0.0]  # 65536 MACs: serial
    mid = ls.time_features("MatMul", "dense", 4096, 1024, 4, 1.0, (1, 1))  # 16 MiB: L3
    assert mid[2:5] == [ls.CACHE_BYTES, 4.0 * 4096 * 1024 - ls.CACHE_BYTES, 0.0]
    big = ls.time_features("MatMul", "dense", 4096, 4096, 1, 1.0, (1, 1))  # 64 MiB: beyond the L3
    assert big[2:5] == [ls.CACHE_BYTES, ls.LLC_BYTES - ls.CACHE_BYTES, 4.0 * 4096 * 4096 - ls.LLC_BYTES]


def test_sparse_features_by_hand():
    f = ls.time_features("MatMul", "sparse", 1024, 1024, 4, 0.125, (8, 1))
    stored = 0.125 * 1024 * 1024
    assert f[:2] == [0.0, 1.0]  # 524 K stored MACs: the rows kernel forks the pool
    assert ls.time_features("MatMul", "sparse", 128, 128, 1, 0.1, (8, 1))[:2] == [1.0, 0.0]  # 1.6 K: serial
    assert ls.time_features("MatMul", "sparse", 128, 128, 1, 0.1, (1, 1), perm=True)[:2] == [1.0, 0.0]
    assert f[2] + f[3] + f[4] == pytest.approx(4 * stored * (1 + 1 / 8))
    assert f[5] == pytest.approx(stored * 4)
    from targets.sparse_kernels import perm_expected_slots

    p = ls.time_features("MatMul", "sparse", 1024, 512, 2, 0.1, (1, 1), perm=True)
    slots = perm_expected_slots(1024, 512, 0.1)  # padded steps x 16 lanes, > the 52 K non-zeros
    assert 1.5 * 0.1 * 1024 * 512 < slots < 2.5 * 0.1 * 1024 * 512
    assert p[2] + p[3] + p[4] == pytest.approx(5 * slots) and p[5] == pytest.approx(2 * slots)
    conv_small = ls.time_features("Conv", "sparse", 64, 64, 16, 0.1, (1, 1))
    assert conv_small[:2] == [1.0, 0.0]  # 6.5 K stored MACs: serial conv kernel


def test_model_keys_route_to_the_kernel_that_runs():
    assert ls.model_key("MatMul", "dense", 1, (8, 1)) == "dense_gemm"
    assert ls.model_key("Conv", "dense", 196, (1, 1)) == "dense_conv"
    assert ls.model_key("Gemm", "sparse", 1, (1, 1)) == "sparse_gemm_1x1_lanes"
    assert ls.model_key("Gemm", "sparse", 8, (1, 1), perm=True) == "sparse_gemm_1x1_perm"
    assert ls.model_key("Gemm", "sparse", 4, (1, 4)) == "sparse_gemm_1x1_xt"
    assert ls.model_key("MatMul", "sparse", 16, (16, 1)) == "sparse_gemm_16x1"
    assert ls.model_key("Conv", "sparse", 49, (4, 1)) == "sparse_conv_4x1"
    keys = {ls.model_key(op, kind, m, b) for op, kind, m, b in
            itertools.product(("MatMul", "Conv"), ("dense", "sparse"), (1, 4), ((1, 1), (4, 1), (8, 1), (16, 1)))}
    keys.add(ls.model_key("MatMul", "sparse", 1, (1, 1), perm=True))
    assert keys == set(ls.CPU_TIME_MODELS)
    assert all(len(v) == len(ls.TIME_FEATURES) and min(v) >= 0 for v in ls.CPU_TIME_MODELS.values())


def test_predict_is_the_ratio_of_the_two_kernel_times():
    n, k, m, d, block = 1024, 512, 4, 0.2, (4, 1)
    ratio, basis = ls.predict("Gemm", n, k, m, 1, d, block, "x86")
    coef_d, coef_s = ls.CPU_TIME_MODELS["dense_gemm"], ls.CPU_TIME_MODELS["sparse_gemm_4x1"]
    t_d = float(np.dot(coef_d, ls.time_features("Gemm", "dense", n, k, m, 1.0, block)))
    t_s = float(np.dot(coef_s, ls.time_features("Gemm", "sparse", n, k, m, d, block)))
    assert ratio == pytest.approx(t_d / t_s, rel=1e-12) and basis == "x86-avx512 kernels measured"
    # Conv: bsz images multiply the pixels; plain aarch64 uses the default arm core's fit
    t_d = ls.kernel_time("Conv", "dense", 256, 256, 392, 1.0, block, isa=ls.ARM_DEFAULT_FIT)
    t_s = ls.kernel_time("Conv", "sparse", 256, 256, 392, d, block, isa=ls.ARM_DEFAULT_FIT)
    assert ls.predict("Conv", 256, 256, 196, 2, d, block, "arm") == (
        pytest.approx(t_d / t_s), "conv1x1 arm-cortex-a76 core model (qemu instruction counts), default for arm")
    assert ls.predicted_ratio(n, k, m, d, block) == ratio


def test_cuda_keeps_its_prior():
    n, k, m, d = 2048, 2048, 1, 0.1
    t_work = n * k * m / ls.CUDA_DENSE_MACS_PER_S
    want = (t_work + ls.CUDA_T_LAUNCH) / (t_work * d / ls.CUDA_PRIOR_EFFICIENCY + ls.CUDA_T_LAUNCH)
    assert ls.predict("MatMul", n, k, m, 1, d, (8, 1), "cuda") == (pytest.approx(want), "cuda prior")
    assert ls.predict("MatMul", n, k, 64, 1, d, (8, 1), "cuda")[0] == 0.0  # R x M > CUDA_MAX_RM


def test_fit_recovers_a_known_model():
    """Rows timed by the current constants themselves: the fit must reproduce every time."""
    from bench.cost_model import fit

    rows = []
    shapes = [("MatMul", m) for m in (1, 4, 16)] + [("Conv", m) for m in (16, 196)]
    for (op, m), n, s, blk in itertools.product(shapes, (64, 512, 2048), (0.5, 0.8, 0.95),
                                                ("1x1", "4x1", "8x1", "16x1")):
        b = tuple(int(v) for v in blk.split("x"))
        d = 1.0 - s
        rows.append({"op": op, "n": n, "k": n, "m": m, "bsz": 1, "sparsity": s, "block": blk, "density": d,
                     "dense_ms": 1e3 * ls.kernel_time(op, "dense", n, n, m, 1.0, b),
                     "sparse_ms": 1e3 * ls.kernel_time(op, "sparse", n, n, m, d, b)})
    coef = fit(rows)
    for r in rows:
        b = tuple(int(v) for v in r["block"].split("x"))
        for kind, t in (("dense", r["dense_ms"]), ("sparse", r["sparse_ms"])):
            feats = ls.time_features(r["op"], kind, r["n"], r["k"], r["m"], r["density"], b)
            got = 1e3 * float(np.dot(coef[ls.model_key(r["op"], kind, r["m"], b)], feats))
            assert got == pytest.approx(t, rel=2e-3), (r, kind)


def test_confusion_counts_and_regret():
    from bench.cost_model import confusion

    rows = [{"op": "MatMul", "n": 512, "k": 512, "m": 1, "sparsity": 0.9, "block": "1x1", "measured": m_, "p": p}
            for m_, p in ((0.8, 1.3), (2.0, 1.0), (1.1, 1.5), (0.5, 0.5), (3.0, 2.0))]
    c = confusion(rows, "p", 1.2)
    assert (c["chosen_sparse"], c["sparse_but_slower"], c["dense_but_faster"], c["wrong"]) == (3, 1, 1, 2)
    assert c["worst_regret"] == pytest.approx(1.0)  # kept dense at a measured 2.0x: 100% slower than best


# ------------------------------------------------------------------ calibrated decisions


def test_issue_misprediction_small_gemv_now_dense():
    """Issue #5: 512x512 batch-1 unstructured 90% was predicted 1.30x and measured 0.81x
    against the dense kernel (cache-resident weight): the gather kernel's prediction is now
    below the default min_speedup (measured 1.13x serial-aware, bench/cost_model.md), the
    permute-SELL kernel's above it (measured 1.87x)."""
    min_speedup = ls.LowerSparseConfig().min_speedup
    assert ls.predicted_ratio(512, 512, 1, 0.1, (1, 1)) < min_speedup
    assert ls.predict("MatMul", 512, 512, 1, 1, 0.1, (1, 1), "x86", perm=True)[0] > min_speedup
    assert ls.predicted_ratio(64, 64, 1, 0.1, (8, 1)) < min_speedup  # measured 0.71x


def test_large_dram_bound_layers_still_lowered():
    cfg = ls.LowerSparseConfig()
    for block, least in (((8, 1), 3.0), ((16, 1), 3.0), ((1, 1), 1.5)):
        assert ls.predicted_ratio(4096, 4096, 1, 0.1, block) >= least, block
    assert ls.predicted_ratio(4096, 4096, 1, 0.05, (8, 1)) > ls.predicted_ratio(4096, 4096, 1, 0.1, (8, 1))
    assert ls.predicted_ratio(4096, 4096, 16, 0.1, (8, 1)) >= cfg.min_speedup


def _one_matmul(n: int, k: int, m: int, sparsity: float, rng) -> object:
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[rng.random((k, n)) < sparsity] = 0.0
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                          [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_pass_keeps_the_small_gemv_dense_and_says_why():
    res, out = lower(_one_matmul(512, 512, 1, 0.9, np.random.default_rng(0)))
    assert not res.modified and res.stats["kept_dense"] == 1
    rec = res.stats["layers"][0]
    assert rec["predicted_ratio"] < 1.2 and rec["cost_model"] == "x86-avx512 kernel fit (no x86-sse2 fit)"
    assert len(res.warnings) == 1
    assert "kept dense (predicted" in res.warnings[0] and "512x512, batch 1" in res.warnings[0]


def test_layers_below_the_calibrated_sizes_are_capped():
    # a 48x32 conv on 4 pixels: the raw fit extrapolates call overheads to > min_speedup
    raw = (ls.kernel_time("Conv", "dense", 48, 32, 4, 1.0, (1, 1))
           / ls.kernel_time("Conv", "sparse", 48, 32, 4, 0.25, (1, 1)))
    ratio, basis = ls.predict("Conv", 48, 32, 4, 1, 0.25, (1, 1), "x86")
    assert ratio == min(raw, 1.0) and "capped" in basis
    # the smallest calibrated sizes themselves are not capped
    assert "capped" not in ls.predict("Conv", 64, 64, 16, 1, 0.1, (8, 1), "x86")[1]
    assert "capped" not in ls.predict("MatMul", 64, 64, 1, 1, 0.1, (8, 1), "x86")[1]


def test_bench_smoke(capsys):
    """bench/cost_model.py measures, checks numerics and scores one tiny point."""
    from bench.cost_model import main

    assert main(["--sizes", "64", "--batches", "1", "--sparsities", "0.9", "--blocks", "8x1", "--no-conv",
                 "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| MatMul | 64x64 | 1 | 0.90 | 8x1 | rows |" in out and "after (pass constants)" in out


def test_cost_model_is_versioned_data(tmp_path, monkeypatch):
    """The constants live in targets/cost_models/<isa>.json (written by bench/cost_model.py --fit --write),
    not in code; a file of another version or feature set is refused."""
    import json

    from targets import lower_sparse as ls

    d = ls.load_cost_model(ls.DEFAULT_FIT)
    assert d["isa"] == ls.DEFAULT_FIT and d["host"] and d["command"].startswith(".venv/bin/python bench/cost_model.py")
    assert {k: [float(x) for x in v] for k, v in d["models"].items()} == ls.CPU_TIME_MODELS
    assert ls.DEFAULT_FIT in ls.fitted_isas()
    monkeypatch.setattr(ls, "COST_MODEL_DIR", tmp_path)
    (tmp_path / "bad-version.json").write_text(json.dumps(dict(d, version=d["version"] + 1)))
    (tmp_path / "bad-features.json").write_text(json.dumps(dict(d, features=d["features"][:-1])))
    for name in ("bad-version", "bad-features"):
        with pytest.raises(ValueError, match="do not match"):
            ls.load_cost_model(name)


def test_cost_model_is_chosen_by_the_code_isa(tmp_path, monkeypatch):
    """x86 targets use the fit of the ISA their code is built for (x86-avx2 code on any host uses the
    AVX2 fit when targets/cost_models/x86-avx2.json exists), and say which fit decided."""
    assert ls.cost_isa({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"}) == "x86-avx512"
    assert ls.cost_isa({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}) == "x86-avx2"
    assert ls.cost_isa({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}) == "x86-sse2"
    assert ls.cost_isa({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}) == "arm"
    # a fit for a made-up ISA with every sparse kernel 10x slower: its decisions follow it
    d = ls.load_cost_model(ls.DEFAULT_FIT)
    slow = {k: ([x * 10 for x in v] if k.startswith("sparse") else v) for k, v in d["models"].items()}
    (tmp_path / "x86-test.json").write_text(__import__("json").dumps({**d, "isa": "x86-test", "models": slow}))
    monkeypatch.setattr(ls, "COST_MODEL_DIR", tmp_path)
    monkeypatch.setitem(ls._FITS, "x86-test", None)
    ls._FITS.pop("x86-test")
    base, b0 = ls.predict("MatMul", 2048, 2048, 1, 1, 0.1, (8, 1), "x86", isa=ls.DEFAULT_FIT)
    r, b1 = ls.predict("MatMul", 2048, 2048, 1, 1, 0.1, (8, 1), "x86", isa="x86-test")
    assert b0 == "x86-avx512 kernels measured" and b1 == "x86-test kernels measured"
    assert r < base / 5
    _, b2 = ls.predict("MatMul", 2048, 2048, 1, 1, 0.1, (8, 1), "x86", isa="x86-none")
    assert b2 == "x86-avx512 kernel fit (no x86-none fit)"
