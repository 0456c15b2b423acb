"""x86: compile tiny ONNX models with TVM, run them, compare with onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from compressor.errors import TargetError
from targets import resolve
from targets.elf import read_elf_header
from targets.host import detect_host

pytest.importorskip("tvm")
pytestmark = pytest.mark.skipif(detect_host().arch != "x86_64", reason="x86_64 host required to run x86 code")


@pytest.mark.parametrize("model", ["gemm_relu", "conv_relu", "two_in_two_out"])
def test_x86_compile_run_matches_onnxruntime(model, request, tmp_path, make_inputs, ort_run):
    path = request.getfixturevalue(model)
    tgt, spec = resolve("x86")
    art = tgt.compile(path, spec, tmp_path, {})
    so = tmp_path / art.path
    assert art.path.name == "model_x86_64.so" and so.exists()
    assert art.kind == "tvm-relax-vm-library" and len(art.sha256) == 64
    assert art.details["elf_machine"] == "x86-64" == read_elf_header(so).machine_name
    assert art.details["compile_seconds"] > 0
    inputs = make_inputs(path)
    got = tgt.run(so, spec, inputs)
    want = ort_run(path, inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_input_order_follows_names_not_dict_order(two_in_two_out, tmp_path, make_inputs, ort_run):
    tgt, spec = resolve("x86")
    art = tgt.compile(two_in_two_out, spec, tmp_path, {})
    inputs = make_inputs(two_in_two_out)
    reversed_inputs = dict(reversed(list(inputs.items())))
    got = tgt.run(tmp_path / art.path, spec, reversed_inputs)
    for g, w in zip(got, ort_run(two_in_two_out, inputs)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tag,flags", [("x86-avx2", {"avx2", "fma"}), ("x86-avx512", {"avx512f", "avx512bw"})])
def test_fixed_isa_levels(tag, flags, gemm_relu, tmp_path, make_inputs, ort_run):
    tgt, spec = resolve(tag)
    art = tgt.compile(gemm_relu, spec, tmp_path, {})
    assert read_elf_header(tmp_path / art.path).machine_name == "x86-64"
    if not flags <= detect_host().features:
        assert not spec.runs_here
        pytest.skip(f"host lacks {sorted(flags - detect_host().features)}")
    inputs = make_inputs(gemm_relu)
    got = tgt.run(tmp_path / art.path, spec, inputs)
    np.testing.assert_allclose(got[0], ort_run(gemm_relu, inputs)[0], rtol=1e-4, atol=1e-4)


def test_timing_returns_median_seconds(gemm_relu, tmp_path, make_inputs):
    tgt, spec = resolve("x86")
    art = tgt.compile(gemm_relu, spec, tmp_path, {})
    secs = tgt.time(tmp_path / art.path, spec, make_inputs(gemm_relu), warmup=2, repeat=5)
    assert 0 < secs < 1.0


def test_input_shape_override(tmp_path, models_dir, make_inputs, ort_run):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
    )
    path = models_dir / "dyn_relu.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    tgt, spec = resolve("x86")
    art = tgt.compile(path, spec, tmp_path, {"x": [3, 6]})
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    np.testing.assert_allclose(tgt.run(tmp_path / art.path, spec, {"x": x})[0], np.maximum(x, 0))


def test_unsupported_op_is_a_precise_target_error(lstm_model, tmp_path):
    """ONNX ``RNN`` (the plain one): neither the Relax importer nor our converters have it."""
    m = onnx.load(str(lstm_model))
    lstm = m.graph.node[0]
    r = onnx.numpy_helper.to_array(m.graph.initializer[1])
    del m.graph.initializer[:]
    m.graph.initializer.extend([onnx.numpy_helper.from_array(np.ones((1, 4, 3), np.float32), "W"),
                                onnx.numpy_helper.from_array(r[:, :4, :], "R")])
    lstm.op_type = "RNN"
    path = tmp_path / "rnn.onnx"
    onnx.save(m, str(path))
    tgt, spec = resolve("x86")
    with pytest.raises(TargetError) as exc:
        tgt.compile(path, spec, tmp_path, {})
    msg = exc.value.one_line()
    assert "RNN" in msg and "not support" in msg and "\n" not in msg
    assert not (tmp_path / "model_x86_64.so").exists()
