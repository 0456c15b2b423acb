"""--method wanda|obs through the CLI: --calib required, sparse storage in the bundle and report."""
from __future__ import annotations

import json

import numpy as np
import pytest

from compressor.sparse_storage import read_sparse_weights


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.npz"
    np.savez(p, x=np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32))
    return p


def test_obs_without_calib_is_usage_error(cli, tiny_models, tmp_path):
    r = cli(tiny_models["mlp"], "--sparsity", "0.5", "--method", "obs", "--no-compile", "--no-latency", "-o", tmp_path / "b")
    assert r.code == 2 and "--calib" in r.err, r


@pytest.mark.parametrize("method,pattern", [("obs", "2:4"), ("wanda", "unstructured")])
def test_method_via_cli_writes_sparse_storage(cli, tiny_models, calib, tmp_path, method, pattern):
    out = tmp_path / "b"
    r = cli(tiny_models["mlp"], "--sparsity", "0.5", "--pattern", pattern, "--method", method, "--calib", calib,
            "--no-compile", "--no-latency", "--no-gate", "-o", out)
    assert r.code == 0, r
    assert "bytes stored (sparse)" in r.out
    rep = json.loads((out / "report.json").read_text())
    st = rep["sparse_storage"]
    assert st["file"] == "weights.sparse.npz" and st["stored_bytes"] == (out / st["file"]).stat().st_size
    assert "weights.sparse.npz" in json.loads((out / "manifest.json").read_text())["files"]
    ps = [p for p in rep["passes"] if p["name"] == f"sparsify.{method}"][0]
    assert ps["stats"]["layers"]["mm1"]["sparsity"] == pytest.approx(0.5)
    import onnx

    assert read_sparse_weights(out / st["file"]).SerializeToString() == onnx.load(out / "model.onnx").SerializeToString()
