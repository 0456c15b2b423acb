"""Compact sparse weight storage: exact round trip, every encoding, size accounting."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor.sparse_storage import _decode, _encodings, read_sparse_weights, write_sparse_weights
from tests.conftest import ort_run


def _sparse(shape, s, rng, block=None):
    w = rng.standard_normal(shape).astype(np.float32)
    if block:
        r, c = block
        m = rng.random((shape[0] // r, shape[1] // c)) < s
        w[np.repeat(np.repeat(m, r, 0), c, 1)] = 0
    else:
        w[rng.random(shape) < s] = 0
    return w


@pytest.mark.parametrize("case", ["dense", "s50", "s95", "block4x1", "negzero", "int", "conv4d"])
def test_every_encoding_round_trips_bit_exactly(case):
    rng = np.random.default_rng(0)
    a = {"dense": lambda: rng.standard_normal((32, 64)).astype(np.float32),
         "s50": lambda: _sparse((32, 64), 0.5, rng),
         "s95": lambda: _sparse((64, 128), 0.95, rng),
         "block4x1": lambda: _sparse((64, 64), 0.7, rng, (4, 1)),
         "negzero": lambda: np.where(_sparse((16, 16), 0.5, rng) == 0, np.float32(-0.0), np.float32(1.5)),
         "int": lambda: np.arange(200, dtype=np.int64).reshape(20, 10),
         "conv4d": lambda: _sparse((8, 72), 0.8, rng).reshape(8, 8, 3, 3)}[case]()
    for enc, parts in _encodings(a):
        back = _decode(enc, parts, a.shape, a.dtype)
        assert back.tobytes() == a.tobytes(), enc  # bit-exact (keeps -0.0)


def test_block_sparse_prefers_bsr_and_high_sparsity_beats_dense():
    rng = np.random.default_rng(1)
    a = _sparse((64, 64), 0.8, rng, (8, 1))
    encs = {e: sum(p.nbytes for p in parts.values()) for e, parts in _encodings(a)}
    assert min(encs, key=encs.get) == "bsr8x1"
    assert encs["bsr8x1"] < 0.3 * encs["dense"]


def test_model_round_trip_and_bytes(tmp_path):
    m = mlp_model_big()
    rng = np.random.default_rng(2)
    for init in m.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.size >= 64:
            init.CopyFrom(numpy_helper.from_array(np.where(rng.random(a.shape) < 0.9, 0, a).astype(a.dtype), init.name))
    info = write_sparse_weights(m, tmp_path / "w.npz")
    assert info["file"] == "w.npz" and info["stored_bytes"] == (tmp_path / "w.npz").stat().st_size
    assert info["dense_bytes"] == m.ByteSize() and info["stored_bytes"] < info["dense_bytes"]
    back = read_sparse_weights(tmp_path / "w.npz")
    assert back.SerializeToString() == m.SerializeToString()
    onnx.checker.check_model(back)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(back, {"x": x})[0], ort_run(m, {"x": x})[0])


def mlp_model_big():
    from onnx import TensorProto, helper

    from tests.conftest import make_model

    rng = np.random.default_rng(3)
    inits = {"w1": rng.standard_normal((64, 128)).astype(np.float32), "b1": rng.standard_normal(128).astype(np.float32),
             "w2": rng.standard_normal((128, 10)).astype(np.float32), "shape": np.array([1, 10], np.int64)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("MatMul", ["hb", "w2"], ["o"]), helper.make_node("Reshape", ["o", "shape"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
