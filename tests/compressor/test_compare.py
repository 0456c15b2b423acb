"""compress compare: identical models agree exactly; a perturbed one is measured and can fail."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from tests.conftest import mlp_model


def test_compare_identical_and_perturbed(cli, tmp_path):
    a = tmp_path / "a.onnx"
    onnx.save(mlp_model(), a)
    r = cli("compare", a, a)
    assert r.code == 0, r
    assert "| y      | 0       |" in r.out and "RESULT PASSED" in r.out
    m = mlp_model()
    for init in m.graph.initializer:
        if init.name == "w2":
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), "w2"))
    b = tmp_path / "b.onnx"
    onnx.save(m, b)
    r = cli("compare", a, b)
    assert r.code == 3 and "RESULT FAILED" in r.out and "cosine" in r.out


def test_compare_mismatched_inputs(cli, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp_model(), a)
    m = mlp_model()
    m.graph.input[0].name = "z"
    m.graph.node[0].input[0] = "z"
    onnx.save(m, b)
    r = cli("compare", a, b)
    assert r.code == 4 and "inputs differ" in r.err
