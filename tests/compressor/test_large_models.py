"""Models handled without weight-sized copies (issue 19, "scale with the model"): weightless graph-level
work, streamed saving (one protobuf, or external data above the single-file limit), onnxruntime
sessions fed the weights as arrays, external-data inputs, and the per-stage time/memory record."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import ir, runtime
from models.large import build_mlp_external
from tests.conftest import REPO, ort_run

DIGITS = REPO / "models" / "digits_cnn.onnx"


def _mlp_inline(width=256, layers=2):
    """A small MLP whose weights are above ir.WEIGHTLESS_MIN_BYTES (256 x 256 float = 256 KiB)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) / 16, f"w{i}"))
        inits.append(numpy_helper.from_array(np.arange(width, dtype=np.float32) / width, f"b{i}"))  # small: kept inline
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"], name=f"add{i}")]
        x = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, width])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_weightless_copy_leaves_large_initializers_out_and_keeps_the_graph():
    m = _mlp_inline()
    before = m.SerializeToString()
    skel, big = ir.weightless(m)
    assert [t.name for t in big] == ["w0", "w1"]
    ph = {t.name: t for t in skel.graph.initializer}
    assert ph["w0"].data_location == TensorProto.EXTERNAL and not ph["w0"].raw_data and list(ph["w0"].dims) == [256, 256]
    assert ph["b0"].raw_data == m.graph.initializer[1].raw_data  # small ones stay inline
    assert skel.graph.node == m.graph.node and skel.opset_import == m.opset_import
    assert skel.ByteSize() < 10_000 < m.ByteSize()
    assert m.SerializeToString() == before  # the model itself is untouched


def test_shape_inference_on_the_weightless_copy_gives_onnx_s_own_result():
    m = _mlp_inline()
    want = onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=True)
    got = ir.infer_shapes(m)
    assert {v.name: v.type for v in got.graph.value_info} == {v.name: v.type for v in want.graph.value_info}
    assert [t.raw_data for t in got.graph.initializer] == [t.raw_data for t in m.graph.initializer]


def test_checker_on_the_weightless_copy_still_finds_graph_errors():
    m = _mlp_inline()
    ir.check_weightless(m)  # valid
    m.graph.node[1].input[0] = "nowhere"
    with pytest.raises(Exception, match="nowhere"):
        ir.check_weightless(m)


@pytest.mark.parametrize("external", [False, True])
def test_streamed_save_round_trips_and_leaves_the_model_alone(tmp_path, monkeypatch, external):
    m = ir.load(DIGITS)
    before = m.SerializeToString()
    if external:
        monkeypatch.setattr(ir, "SINGLE_FILE_MAX", 1000)
    ir.save_model(m, tmp_path / "m.onnx")
    assert m.SerializeToString() == before
    assert (tmp_path / "m.onnx.data").exists() == external
    back = onnx.load(str(tmp_path / "m.onnx"))
    if not external:
        assert back == m and (tmp_path / "m.onnx").stat().st_size == m.ByteSize()
    else:
        assert back.graph.node == m.graph.node
        want = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        got = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
        assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
        offsets = [int(e.value) for t in onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer
                   for e in t.external_data if e.key == "offset"]
        assert offsets and all(o % 4096 == 0 for o in offsets)
    # a later single-file save removes a stale weight file
    monkeypatch.setattr(ir, "SINGLE_FILE_MAX", 1_800_000_000)
    ir.save_model(m, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx.data").exists() and onnx.load(str(tmp_path / "m.onnx")) == m


def test_session_with_weights_as_arrays_computes_what_the_serialized_model_does():
    m = _mlp_inline()
    x = {"x": np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)}
    want = ort_run(m, x)
    sess = runtime.session(m)
    got = sess.run(None, x)
    np.testing.assert_array_equal(got[0], want[0])
    # this onnxruntime copies the arrays at session creation, so they are not kept (one copy less)
    assert runtime._copies_external_initializers() is (not hasattr(sess, "_compressor_initializers"))


def test_external_data_model_loads_with_its_files(tmp_path):
    path = build_mlp_external(tmp_path / "mlp.onnx", width=128, layers=2)
    files: list = []
    m = ir.load(path, files=files)
    assert files == [path, tmp_path / "mlp.onnx.data"]
    assert not ir.has_external_data(m)  # weights attached after the graph-level checks
    x = {"x": np.random.default_rng(2).standard_normal((1, 128)).astype(np.float32)}
    # oracle: the generator's MLP in numpy from the file's own tensors
    ws = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    h = x["x"]
    for i in range(3):
        h = h @ ws[f"fc{i}.weight"] + ws[f"fc{i}.bias"]
        if i < 2:
            h = np.maximum(h, 0)
    np.testing.assert_allclose(runtime.session(m).run(None, x)[0], h, rtol=1e-5, atol=1e-5)


def test_external_data_that_is_missing_is_a_one_line_input_error(tmp_path):
    path = build_mlp_external(tmp_path / "mlp.onnx", width=64, layers=1)
    (tmp_path / "mlp.onnx.data").unlink()
    from compressor.errors import InputError

    with pytest.raises(InputError, match="external data file missing"):
        ir.load(path)


def test_report_records_time_and_memory_per_stage(cli, tmp_path):
    path = build_mlp_external(tmp_path / "mlp.onnx", width=128, layers=2)
    out = tmp_path / "b"
    r = cli(path, "--sparsity", "0.5", "--no-compile", "--no-gate", "-o", out)
    assert r.code == 0, r.err[-1500:]
    rep = json.loads((out / "report.json").read_text())
    names = [s["stage"] for s in rep["stages"]]
    assert names == ["load", "reference", "passes", "verify", "search", "write model", "compile", "measure"]
    peaks = [s["peak_rss_mb"] for s in rep["stages"]]
    assert all(p > 0 for p in peaks) and peaks == sorted(peaks)  # the process's peak so far: never decreases
    assert all(s["seconds"] >= 0 for s in rep["stages"])
    # the original's size counts its external data file
    assert rep["stats"]["original"]["bytes_on_disk"] >= (tmp_path / "mlp.onnx.data").stat().st_size
