"""Sensitivity curves, allocation and the ``compress analyze`` subcommand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from compressor.sensitivity import Curve, allocate, analyze
from tests.conftest import mlp_model


def test_allocation_meets_target_and_prefers_insensitive_layers():
    lv = [0.0, 0.25, 0.5, 0.75, 0.9]
    curves = [Curve("robust", "Gemm", 1000, lv, [0, 0.001, 0.002, 0.004, 0.01]),
              Curve("fragile", "Gemm", 1000, lv, [0, 0.1, 0.3, 0.8, 1.0])]
    alloc, warns = allocate(curves, 0.5, 0.0, 0.9)
    assert not warns
    assert sum(alloc[c.layer] * c.numel for c in curves) == pytest.approx(0.5 * 2000)
    assert alloc["robust"] == pytest.approx(0.9) and alloc["fragile"] == pytest.approx(0.1)
    # the greedy choice is optimal here: compare with a brute-force grid search
    best = min(((a, 1.0 - a) for a in np.linspace(0, 0.9, 91) if 1.0 - a <= 0.9),
               key=lambda p: curves[0].error_at(p[0]) + curves[1].error_at(p[1]))
    got = curves[0].error_at(alloc["robust"]) + curves[1].error_at(alloc["fragile"])
    assert got <= curves[0].error_at(best[0]) + curves[1].error_at(best[1]) + 1e-12


def test_unreachable_target_is_reported():
    curves = [Curve("a", "Gemm", 10, [0.0, 0.5], [0.0, 0.1])]
    alloc, warns = allocate(curves, 0.8, 0.0, 0.5)
    assert warns and alloc["a"] == pytest.approx(0.5)


def test_analyze_measures_monotone_error_on_mlp():
    m = mlp_model()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(8)]
    an = analyze(m, feeds, levels=(0.0, 0.5, 0.9), target=0.5)
    assert [c.layer for c in an.curves] == ["mm1", "mm2"]
    for c in an.curves:
        assert c.errors[0] == 0.0 and c.errors[1] > 0 and c.errors[2] > c.errors[1]
    assert an.curves[1].excluded == "final classifier" and set(an.allocation) == {"mm1"}


def test_cli_analyze_writes_table_and_plot(cli, tiny_models, tmp_path):
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((6, 16)).astype(np.float32))
    out = tmp_path / "an"
    r = cli("analyze", tiny_models["mlp"], "--calib", calib, "-o", out, "--sparsity", "0.5", "--samples", "6")
    assert r.code == 0, r
    assert "err@0.5" in r.out and "mm1" in r.out and "allocated" in r.out
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "sensitivity.json").read_text())
    assert {c["layer"] for c in data["curves"]} == {"mm1", "mm2"}
    r = cli("analyze", tiny_models["mlp"])
    assert r.code == 2 and "--calib" in r.err
