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


def test_unnamed_nodes_are_named_and_only_the_classifier_kept_dense(cli, tmp_path):
    """Exporters may leave node names empty: the classifier rule (keyed by node name) then matched
    every MatMul and nothing was sparsified. Load names them ``<op>_<k>``."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits = [helper.make_tensor(n, TensorProto.FLOAT, (32, 32), rng.standard_normal((32, 32)).astype(np.float32).ravel())
             for n in ("w1", "w2", "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], inits)
    src = tmp_path / "unnamed.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), src)
    out = tmp_path / "b"
    r = cli(src, "--sparsity", "0.5", "--no-compile", "--no-latency", "--no-gate", "-o", out)
    assert r.code == 0, r
    rep = json.loads((out / "report.json").read_text())
    kept = [w for w in rep["warnings"] if "final classifier kept dense" in w]
    assert len(kept) == 1 and "MatMul_3" in kept[0]
    m = onnx.load(str(out / "model.onnx"))
    ws = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    assert [round(float((ws[n] == 0).mean()), 2) for n in ("w1", "w2", "w3")] == [0.5, 0.5, 0.0]
    assert sorted(n.name for n in m.graph.node) == ["MatMul_1", "MatMul_2", "MatMul_3", "Relu_1", "Relu_2"]
