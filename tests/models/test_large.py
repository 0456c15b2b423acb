"""models/large.py: the benchmark-scale builders export valid ONNX that onnxruntime runs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from models.large import LARGE, model_path

SHAPES = {"mlp-large": ([1, 1024], [1, 10]), "gru-large": ([1, 8, 256], [1, 10]),
          "transformer-large": ([1, 16, 512], None), "mobilenetv2-large": ([1, 3, 112, 112], [1, 1000])}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LARGE))
def test_large_model_exports_and_runs(name, tmp_path):
    from compressor.runtime import session

    p = model_path(name, tmp_path)
    assert p.is_file() and model_path(name, tmp_path) == p  # cached: built once
    m = onnx.load(str(p))
    onnx.checker.check_model(m)
    inp = m.graph.input[0]
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    want_in, want_out = SHAPES[name]
    assert shape == want_in
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    y = session(m).run(None, {inp.name: x})[0]
    assert np.isfinite(y).all() and float(np.abs(y).max()) > 0
    if want_out is not None:
        assert list(y.shape) == want_out
