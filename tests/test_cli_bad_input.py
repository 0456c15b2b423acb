"""Every bad input gets a one-line error, a documented exit code, no traceback,
no output written, and the input model file untouched."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compressor.errors import EXIT_INPUT, EXIT_USAGE
from tests.conftest import make_model, mlp_model, sha256

FAST = ["--no-compile", "--no-latency"]


def _assert_one_line_error(r, code, needle):
    assert r.code == code, r
    lines = [l for l in r.err.splitlines() if l.strip()]
    assert len(lines) == 1, r.err
    assert lines[0].startswith("compress: error: "), r.err
    assert needle in lines[0], r.err
    assert "Traceback" not in r.err + r.out


def _model_file(tmp_path, model=None, name="m.onnx"):
    p = tmp_path / name
    onnx.save(model or mlp_model(), p)
    return p


def test_missing_file(cli, tmp_path):
    _assert_one_line_error(cli(tmp_path / "nope.onnx", "-o", tmp_path / "out"), EXIT_INPUT, "model file not found")
    assert not (tmp_path / "out").exists()


def test_not_onnx(cli, tmp_path):
    p = tmp_path / "notes.onnx"
    p.write_text("this is not a protobuf\n" * 10)
    _assert_one_line_error(cli(p, "-o", tmp_path / "out"), EXIT_INPUT, "not an ONNX model")


def test_truncated_protobuf(cli, tmp_path):
    good = _model_file(tmp_path).read_bytes()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(good[: len(good) // 2])
    _assert_one_line_error(cli(p, "-o", tmp_path / "out"), EXIT_INPUT, "not an ONNX model")
    assert not (tmp_path / "out").exists()


def test_fails_checker(cli, tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["undefined_tensor"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    p = tmp_path / "bad.onnx"
    p.write_bytes(m.SerializeToString())
    _assert_one_line_error(cli(p, "-o", tmp_path / "out"), EXIT_INPUT, "onnx.checker")


@pytest.mark.parametrize("opset", [5, 99])
def test_unsupported_opset(cli, tmp_path, opset):
    m = mlp_model()
    m.opset_import[0].version = opset
    p = tmp_path / "op.onnx"
    p.write_bytes(m.SerializeToString())
    _assert_one_line_error(cli(p, "-o", tmp_path / "out"), EXIT_INPUT, "unsupported opset")


def test_old_opset_is_converted(cli, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    m = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], {}, opset=11)
    p = _model_file(tmp_path, m)
    r = cli(p, "-o", tmp_path / "out", *FAST)
    assert r.code == 0, r
    assert onnx.load(tmp_path / "out" / "model.onnx").opset_import[0].version == 13


def test_dynamic_dims_need_input_shape(cli, tmp_path):
    p = _model_file(tmp_path, mlp_model(dynamic=True))
    r = cli(p, "-o", tmp_path / "out", *FAST)
    _assert_one_line_error(r, EXIT_INPUT, "dynamic dimensions")
    assert "--input-shape x:1x16" in r.err
    r = cli(p, "-o", tmp_path / "out", "--input-shape", "x:2x16", *FAST)
    assert r.code == 0, r


def _bert_like(tmp_path):
    """ids, mask: [batch, sequence] (a transformers export's dynamic axes) -> embedding * mask -> MatMul."""
    rng = np.random.default_rng(0)
    inits = {"emb": rng.standard_normal((100, 16)).astype(np.float32), "w": rng.standard_normal((16, 4)).astype(np.float32),
             "ax": np.array([2], np.int64)}
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]), helper.make_node("Cast", ["mask"], ["mf"], to=1),
             helper.make_node("Unsqueeze", ["mf", "ax"], ["m3"]), helper.make_node("Mul", ["e", "m3"], ["em"]),
             helper.make_node("MatMul", ["em", "w"], ["y"])]
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("ids", "mask")]
    m = make_model(nodes, ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4])], inits, opset=17)
    np.savez(tmp_path / "calib.npz", ids=rng.integers(0, 100, (8, 24)), mask=np.ones((8, 24), np.int64))
    return _model_file(tmp_path, m)


def test_dynamic_axes_one_error_shared_names_and_data(cli, tmp_path):
    p = _bert_like(tmp_path)
    r = cli(p, "-o", tmp_path / "o1", *FAST)
    _assert_one_line_error(r, EXIT_INPUT, "inputs 'ids', 'mask' have dynamic dimensions")
    assert "--input-shape ids:1x<sequence>" in r.err and "mask: same dim names" in r.err and "--calib" in r.err, r.err
    r = cli(p, "-o", tmp_path / "o2", "--input-shape", "ids:1x24", *FAST)  # mask follows ids' batch/sequence
    assert r.code == 0, r
    rep = json.loads((tmp_path / "o2" / "report.json").read_text())
    assert any("'mask'" in w and "1x24" in w for w in rep["warnings"]), rep["warnings"]
    r = cli(p, "-o", tmp_path / "o3", "--calib", tmp_path / "calib.npz", *FAST)  # the data's shape fixes them
    assert r.code == 0, r
    rep = json.loads((tmp_path / "o3" / "report.json").read_text())
    assert any("'ids'" in w and "1x24" in w and "data" in w for w in rep["warnings"]), rep["warnings"]
    m = onnx.load(tmp_path / "o3" / "model.onnx")
    assert [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input] == [[1, 24], [1, 24]]


@pytest.mark.parametrize("spec,needle", [("x:abc", "bad --input-shape"), ("nosuch:1x16", "unknown inputs"), ("x:1x16x3", "rank")])
def test_bad_input_shape(cli, tmp_path, spec, needle):
    p = _model_file(tmp_path, mlp_model(dynamic=True))
    _assert_one_line_error(cli(p, "-o", tmp_path / "out", "--input-shape", spec, *FAST), EXIT_USAGE, needle)


def test_external_data_outside_folder_refused(cli, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    m = mlp_model()
    onnx.save(m, inner / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    (inner / "w.bin").rename(tmp_path / "w.bin")
    m2 = onnx.load(inner / "m.onnx", load_external_data=False)
    for t in m2.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../w.bin"
    onnx.save(m2, inner / "m.onnx")
    _assert_one_line_error(cli(inner / "m.onnx", "-o", tmp_path / "out"), EXIT_INPUT, "outside the model's folder")


def test_external_data_inside_folder_works(cli, tmp_path):
    m = mlp_model()
    onnx.save(m, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    h = sha256(tmp_path / "m.onnx"), sha256(tmp_path / "w.bin")
    r = cli(tmp_path / "m.onnx", "-o", tmp_path / "out", "--sparsity", "0.5", "--no-gate", *FAST)
    assert r.code == 0, r
    assert (sha256(tmp_path / "m.onnx"), sha256(tmp_path / "w.bin")) == h


@pytest.mark.parametrize("value", ["1.0", "-0.1", "2", "abc"])
def test_sparsity_out_of_range(cli, tmp_path, value):
    p = _model_file(tmp_path)
    _assert_one_line_error(cli(p, "--sparsity", value, "-o", tmp_path / "out"), EXIT_USAGE, "sparsity")


def test_unknown_target(cli, tmp_path):
    _assert_one_line_error(cli(_model_file(tmp_path), "--target", "tpu", "-o", tmp_path / "o"), EXIT_USAGE, "unknown target 'tpu'")


def test_unknown_pass(cli, tmp_path):
    _assert_one_line_error(cli(_model_file(tmp_path), "--pass", "nope.pass", "-o", tmp_path / "o"), EXIT_USAGE, "unknown pass 'nope.pass'")


def test_unknown_plugin_file(cli, tmp_path):
    _assert_one_line_error(cli(_model_file(tmp_path), "--plugin", tmp_path / "missing.py", "-o", tmp_path / "o"), EXIT_USAGE, "plugin file not found")


def test_plugin_that_raises_on_load(cli, tmp_path):
    plug = tmp_path / "boom.py"
    plug.write_text("raise RuntimeError('kaboom at import')\n")
    _assert_one_line_error(cli(_model_file(tmp_path), "--plugin", plug, "-o", tmp_path / "o"), EXIT_USAGE, "kaboom at import")


def test_plugin_pass_that_raises_in_run(cli, tmp_path):
    plug = tmp_path / "boom_run.py"
    plug.write_text(
        "from compressor.pass_base import Pass\n"
        "class Boom(Pass):\n"
        "    name = 'test.boom_run'\n"
        "    def run(self, graph, ctx):\n"
        "        raise ValueError('exploded in run')\n")
    try:
        r = cli(_model_file(tmp_path), "--plugin", plug, "--pass", "cleanup.dead_code", "--pass", "test.boom_run", "-o", tmp_path / "o")
        _assert_one_line_error(r, EXIT_USAGE, "exploded in run")
        assert "cleanup.dead_code" in r.err  # names the passes that ran before
        assert not (tmp_path / "o").exists()
    finally:
        from passes import PASSES

        PASSES.unregister("test.boom_run")


def test_output_dir_exists(cli, tmp_path):
    p = _model_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _assert_one_line_error(cli(p, "-o", out), EXIT_INPUT, "output directory exists")
    assert (out / "keep.txt").exists()
    r = cli(p, "-o", out, "--force", *FAST)
    assert r.code == 0, r
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_eval_data_wrong_names(cli, tmp_path):
    p = _model_file(tmp_path)
    d = tmp_path / "e.npz"
    np.savez(d, wrong=np.zeros((4, 16), np.float32), labels=np.zeros(4, np.int64))
    r = cli(p, "--eval", d, "-o", tmp_path / "o", *FAST)
    _assert_one_line_error(r, EXIT_INPUT, "lacks input(s) x")
    assert "x: [N, 16] float32" in r.err


def test_eval_data_wrong_shape(cli, tmp_path):
    p = _model_file(tmp_path)
    d = tmp_path / "e.npz"
    np.savez(d, x=np.zeros((4, 15), np.float32), labels=np.zeros(4, np.int64))
    _assert_one_line_error(cli(p, "--eval", d, "-o", tmp_path / "o", *FAST), EXIT_INPUT, "has shape [4, 15]")


def test_eval_data_not_npz(cli, tmp_path):
    d = tmp_path / "e.npz"
    d.write_text("nope")
    _assert_one_line_error(cli(_model_file(tmp_path), "--eval", d, "-o", tmp_path / "o", *FAST), EXIT_INPUT, "not a readable .npz")


def test_unknown_flag_is_one_line(cli, tmp_path):
    _assert_one_line_error(cli(_model_file(tmp_path), "--sparsty", "0.5"), EXIT_USAGE, "unrecognized arguments")


def test_input_model_never_modified(cli, tmp_path):
    p = _model_file(tmp_path)
    h = sha256(p)
    r = cli(p, "--sparsity", "0.7", "-o", tmp_path / "o", "--no-gate", *FAST)
    assert r.code == 0, r
    assert sha256(p) == h
    r = cli(p, "--sparsity", "0.7", "-o", tmp_path / "o", "--force", "--no-gate", *FAST)
    assert sha256(p) == h


def test_output_dir_containing_input_refused_even_with_force(cli, tmp_path):
    p = _model_file(tmp_path)
    h = sha256(p)
    _assert_one_line_error(cli(p, "-o", tmp_path, "--force"), EXIT_INPUT, "contains the input model")
    assert sha256(p) == h


def test_unknown_method(cli, tmp_path):
    _assert_one_line_error(cli(_model_file(tmp_path), "--sparsity", "0.5", "--method", "nope", "-o", tmp_path / "o"), EXIT_USAGE,
                           "--method must be auto, magnitude, wanda, obs or sparsegpt")


def test_input_without_a_shape_is_one_error(cli, tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])  # no checker: the shape is missing on purpose
    p = tmp_path / "m.onnx"
    onnx.save(m, p)
    r = cli(p, "-o", tmp_path / "out", *FAST)
    assert r.code == EXIT_INPUT and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r
