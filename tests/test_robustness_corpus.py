"""Robustness corpus: old, unusual, corrupt and hostile ONNX files through the CLI.

Every case ends with a documented exit code (0 ok, 3 gate failed, 4 bad input), at most a
one-line error on stderr, no traceback, the input files unchanged (hash before/after) and no
partial bundle left behind on error. Exit 1 (a bug) appears nowhere. The models are built
here with onnx.helper; most runs use --no-compile (compilation is not the point), the IR-3
ResNet-like and the If models also take the default full run (TVM compile for x86).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import conv_bn_model, mlp_model, run_cli_subprocess, sha256

FAST = ["--no-compile", "--no-latency"]
OK, GATE, BAD = 0, 3, 4
V = helper.make_tensor_value_info


def _rng(seed=0):
    return np.random.default_rng(seed)


def _f(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8, value_info=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits), value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    return m


# ---------------------------------------------------------------- model builders

def resnet_like_ir3(seed=0) -> onnx.ModelProto:
    """Opset 9, IR version 3 (every initializer also listed as a graph input, as the model zoo's
    ResNet-50 has it): stem conv+BN+relu, one residual block with BN, pool, Gemm."""
    rng = _rng(seed)
    inits = {}

    def conv_bn(name, x, cin, cout, k):
        inits[f"{name}_w"] = _f(rng, cout, cin, k, k)
        inits[f"{name}_s"] = (rng.random(cout) + 0.5).astype(np.float32)
        inits[f"{name}_b"] = _f(rng, cout)
        inits[f"{name}_m"] = _f(rng, cout, scale=0.1)
        inits[f"{name}_v"] = (rng.random(cout) + 0.5).astype(np.float32)
        return [helper.make_node("Conv", [x, f"{name}_w"], [f"{name}_c"], name=f"{name}_conv", pads=[k // 2] * 4,
                                 kernel_shape=[k, k]),
                helper.make_node("BatchNormalization", [f"{name}_c", f"{name}_s", f"{name}_b", f"{name}_m", f"{name}_v"],
                                 [f"{name}_bn"], name=f"{name}_bn", epsilon=1e-5)]

    nodes = conv_bn("stem", "data", 3, 16, 3) + [helper.make_node("Relu", ["stem_bn"], ["r0"], name="relu0")]
    nodes += conv_bn("b1", "r0", 16, 16, 3) + [helper.make_node("Relu", ["b1_bn"], ["r1"], name="relu1")]
    nodes += conv_bn("b2", "r1", 16, 16, 1)
    nodes += [helper.make_node("Sum", ["b2_bn", "r0"], ["res"], name="sum"),
              helper.make_node("Relu", ["res"], ["r2"], name="relu2"),
              helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
              helper.make_node("Flatten", ["gap"], ["fl"], name="flatten"),
              helper.make_node("Gemm", ["fl", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
              helper.make_node("Softmax", ["logits"], ["prob"], name="softmax")]
    inits["fc_w"], inits["fc_b"] = _f(rng, 10, 16), _f(rng, 10)
    init_list = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    inputs = [V("data", TensorProto.FLOAT, [1, 3, 16, 16])] + [V(k, TensorProto.FLOAT, list(v.shape)) for k, v in inits.items()]
    m = _model(nodes, inputs, [V("prob", TensorProto.FLOAT, [1, 10])], init_list, opset=9, ir_version=3)
    onnx.checker.check_model(m)
    return m


def small_cnn(opset: int, seed=0) -> onnx.ModelProto:
    """Conv (weights in a Constant node) -> BN -> Relu -> Conv -> MaxPool -> Flatten -> Gemm, valid at opsets 7..12."""
    rng = _rng(seed)
    bn_attrs = {"epsilon": 1e-5} if opset >= 7 else {}
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(_f(rng, 8, 3, 3, 3), "w_value")),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["bn"], name="bn", **bn_attrs),
             helper.make_node("Relu", ["bn"], ["r0"], name="relu"),
             helper.make_node("Conv", ["r0", "w2"], ["r"], name="conv2", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["fl"], name="flatten"),
             helper.make_node("Gemm", ["fl", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    inits = {"w2": _f(rng, 8, 8, 3, 3), "b": _f(rng, 8), "s": (rng.random(8) + 0.5).astype(np.float32), "bb": _f(rng, 8), "m": _f(rng, 8, scale=0.1),
             "v": (rng.random(8) + 0.5).astype(np.float32), "fc_w": _f(rng, 10, 8 * 4 * 4), "fc_b": _f(rng, 10)}
    m = _model(nodes, [V("x", TensorProto.FLOAT, [1, 3, 8, 8])], [V("y", TensorProto.FLOAT, [1, 10])],
               [numpy_helper.from_array(v, k) for k, v in inits.items()], opset=opset, ir_version=7 if opset >= 12 else 5)
    onnx.checker.check_model(m)
    return m


def if_model(seed=0, const_cond=False) -> onnx.ModelProto:
    """The computation sits in the branches of an If: each branch has its own weights (a subgraph
    initializer, an outer-scope initializer read only by the branch) and reads an outer-scope
    intermediate (h). With const_cond the condition is a constant chain (Shape -> ReduceProd ->
    Greater) and the taken branch's result folds to a constant."""
    rng = _rng(seed)
    w_then = numpy_helper.from_array(_f(rng, 16, 8), "w_then")
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_then"], ["t0"], name="then_mm"),
                                helper.make_node("Relu", ["t0"], ["t_out"], name="then_relu")], "then_branch", [],
                               [V("t_out", TensorProto.FLOAT, [1, 8])], [w_then])
    else_g = helper.make_graph([helper.make_node("MatMul", ["h", "w_else"], ["e_out"], name="else_mm")], "else_branch", [],
                               [V("e_out", TensorProto.FLOAT, [1, 8])])
    if const_cond:
        then_g = helper.make_graph([helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(_f(rng, 1, 8), "kv")),
                                    helper.make_node("Relu", ["k"], ["t_out"], name="then_relu")], "then_branch", [],
                                   [V("t_out", TensorProto.FLOAT, [1, 8])])
        cond = [helper.make_node("Shape", ["x"], ["sh"], name="shape"),
                helper.make_node("ReduceProd", ["sh"], ["n"], name="prod", keepdims=0),
                helper.make_node("Greater", ["n", "lim"], ["c"], name="gt")]
    else:
        cond = [helper.make_node("ReduceSum", ["x"], ["s"], name="rsum", keepdims=0),
                helper.make_node("Greater", ["s", "zero"], ["c"], name="gt")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"), helper.make_node("Relu", ["h0"], ["h"], name="relu1"),
             *cond, helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    inits = [numpy_helper.from_array(_f(rng, 16, 16), "w1"), numpy_helper.from_array(_f(rng, 16, 8), "w_else"),
             numpy_helper.from_array(np.array(0, np.float32), "zero"), numpy_helper.from_array(np.array(0, np.int64), "lim")]
    m = _model(nodes, [V("x", TensorProto.FLOAT, [1, 16])], [V("y", TensorProto.FLOAT, [1, 8])], inits)
    onnx.checker.check_model(m, full_check=True)
    return m


def loop_model(seed=0) -> onnx.ModelProto:
    """A Loop (3 iterations) whose body applies a weight matrix from the body's own initializer and
    one from the outer scope: h <- relu(h @ w_body + b_outer)."""
    rng = _rng(seed)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w_body"], ["mm"], name="body_mm"),
         helper.make_node("Add", ["mm", "b_outer"], ["ad"], name="body_add"),
         helper.make_node("Relu", ["ad"], ["h_out"], name="body_relu"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [V("i", TensorProto.INT64, []), V("cond_in", TensorProto.BOOL, []), V("h_in", TensorProto.FLOAT, [1, 16])],
        [V("cond_out", TensorProto.BOOL, []), V("h_out", TensorProto.FLOAT, [1, 16])],
        [numpy_helper.from_array(_f(rng, 16, 16), "w_body")])
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"], name="mm_in"),
             helper.make_node("Loop", ["trips", "true", "h0"], ["h_final"], name="loop", body=body),
             helper.make_node("MatMul", ["h_final", "w_out"], ["y"], name="mm_out")]
    inits = [numpy_helper.from_array(_f(rng, 16, 16), "w_in"), numpy_helper.from_array(_f(rng, 16, 4), "w_out"),
             numpy_helper.from_array(_f(rng, 16), "b_outer"), numpy_helper.from_array(np.array(3, np.int64), "trips"),
             numpy_helper.from_array(np.array(True), "true")]
    m = _model(nodes, [V("x", TensorProto.FLOAT, [1, 16])], [V("y", TensorProto.FLOAT, [1, 4])], inits)
    onnx.checker.check_model(m, full_check=True)
    return m


def scan_model(seed=0) -> onnx.ModelProto:
    """A Scan over 5 time steps: a tiny RNN cell s <- tanh(x_t @ w_x + s @ w_s), weights in the body."""
    rng = _rng(seed)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "w_x"], ["a"]), helper.make_node("MatMul", ["s_in", "w_s"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Tanh", ["ab"], ["s_out"]),
         helper.make_node("Identity", ["s_out"], ["y_t"])],
        "scan_body", [V("s_in", TensorProto.FLOAT, [1, 8]), V("x_t", TensorProto.FLOAT, [1, 4])],
        [V("s_out", TensorProto.FLOAT, [1, 8]), V("y_t", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(_f(rng, 4, 8), "w_x"), numpy_helper.from_array(_f(rng, 8, 8), "w_s")])
    nodes = [helper.make_node("Scan", ["s0", "x"], ["s_last", "ys"], name="scan", body=body, num_scan_inputs=1),
             helper.make_node("Flatten", ["ys"], ["yf"], name="flat", axis=0),
             helper.make_node("MatMul", ["yf", "w_out"], ["y"], name="head")]
    inits = [numpy_helper.from_array(np.zeros((1, 8), np.float32), "s0"), numpy_helper.from_array(_f(rng, 40, 3), "w_out")]
    m = _model(nodes, [V("x", TensorProto.FLOAT, [5, 1, 4])], [V("y", TensorProto.FLOAT, [1, 3])], inits)
    onnx.checker.check_model(m, full_check=True)
    return m


def tiny_bert(seed=0, vocab=30, types=2, seq=8, hidden=16) -> onnx.ModelProto:
    """BERT-style encoder front: word + token-type + position embeddings (Gather on tables), an
    attention mask turned into an additive bias (Unsqueeze -> Cast -> Sub -> Mul), one attention
    head, mean pooling, classifier. Inputs input_ids, attention_mask, token_type_ids (int64)."""
    rng = _rng(seed)
    inits = {"word": _f(rng, vocab, hidden), "type": _f(rng, types, hidden), "pos": _f(rng, seq, hidden),
             "wq": _f(rng, hidden, hidden), "wk": _f(rng, hidden, hidden), "wv": _f(rng, hidden, hidden),
             "wo": _f(rng, hidden, 3), "one": np.array(1.0, np.float32), "neg": np.array(-10000.0, np.float32),
             "scale": np.array(1.0 / np.sqrt(hidden), np.float32), "ax1": np.array([1], np.int64),
             "pos_ids": np.arange(seq, dtype=np.int64)[None, :]}
    nodes = [
        helper.make_node("Gather", ["word", "input_ids"], ["we"], name="word_emb"),
        helper.make_node("Unsqueeze", ["token_type_ids", "ax1"], ["tt1"], name="tt_unsq"),
        helper.make_node("Squeeze", ["tt1", "ax1"], ["tt"], name="tt_sq"),
        helper.make_node("Gather", ["type", "tt"], ["te"], name="type_emb"),
        helper.make_node("Gather", ["pos", "pos_ids"], ["pe"], name="pos_emb"),
        helper.make_node("Add", ["we", "te"], ["e1"]), helper.make_node("Add", ["e1", "pe"], ["e"]),
        helper.make_node("MatMul", ["e", "wq"], ["q"], name="q"), helper.make_node("MatMul", ["e", "wk"], ["k"], name="k"),
        helper.make_node("MatMul", ["e", "wv"], ["v"], name="v"),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["qk"]), helper.make_node("Mul", ["qk", "scale"], ["qks"]),
        helper.make_node("Unsqueeze", ["attention_mask", "ax1"], ["m1"], name="mask_unsq"),
        helper.make_node("Cast", ["m1"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mf"], ["inv"]), helper.make_node("Mul", ["inv", "neg"], ["bias"]),
        helper.make_node("Add", ["qks", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["att"], axis=-1),
        helper.make_node("MatMul", ["att", "v"], ["ctx"]),
        helper.make_node("ReduceMean", ["ctx"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["pooled", "wo"], ["y"], name="cls"),
    ]
    ins = [V(n, TensorProto.INT64, [1, seq]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    m = _model(nodes, ins, [V("y", TensorProto.FLOAT, [1, 3])], [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.checker.check_model(m, full_check=True)
    return m


def bert_bad_position_ids() -> onnx.ModelProto:
    """A checker-valid model that onnxruntime cannot run: a constant index (512) outside its 8-row table."""
    m = tiny_bert()
    for t in m.graph.initializer:
        if t.name == "pos_ids":
            t.CopyFrom(numpy_helper.from_array(np.array([[0, 1, 2, 3, 4, 5, 6, 512]], np.int64), "pos_ids"))
    return m


def int_shape_input_model() -> onnx.ModelProto:
    """An int64 input used as a Reshape target shape: no range can be inferred for random values."""
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")]
    return _model(nodes, [V("x", TensorProto.FLOAT, [1, 16]), V("shape", TensorProto.INT64, [2])],
                  [V("y", TensorProto.FLOAT, [1, 4])], [numpy_helper.from_array(_f(_rng(), 16, 4), "w")])


def conv_model(pads=(1, 1, 1, 1), strides=(1, 1), dilations=(1, 1), x_shape=(1, 3, 8, 8)) -> onnx.ModelProto:
    rng = _rng()
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=list(pads), strides=list(strides),
                              dilations=list(dilations), kernel_shape=[3, 3])]
    return _model(nodes, [V("x", TensorProto.FLOAT, list(x_shape))], [V("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                  [numpy_helper.from_array(_f(rng, 4, 3, 3, 3), "w")])


def constant_of_shape_model(n: int) -> onnx.ModelProto:
    """y = x + ConstantOfShape([n]) broadcast: a constant that would need n floats."""
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Add", ["x", "big"], ["y"])]
    return _model(nodes, [V("x", TensorProto.FLOAT, [1])], [V("y", TensorProto.FLOAT, ["n"])],
                  [numpy_helper.from_array(np.array([n], np.int64), "shape")])


def shape_computed_huge_model() -> onnx.ModelProto:
    """The absurd size appears only through data propagation: ConstantOfShape(Shape(x) * 2**42)."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Mul", ["s", "k"], ["s2"]),
             helper.make_node("ConstantOfShape", ["s2"], ["big"], value=numpy_helper.from_array(np.array([1.0], np.float32))),
             helper.make_node("Add", ["x", "big"], ["y"])]
    return _model(nodes, [V("x", TensorProto.FLOAT, [1])], [V("y", TensorProto.FLOAT, ["n"])],
                  [numpy_helper.from_array(np.array([1 << 42], np.int64), "k")])


def sequence_internal_model() -> onnx.ModelProto:
    """A sequence value inside the graph (SequenceConstruct -> ConcatFromSequence): tensor inputs/outputs."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm"), helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("SequenceConstruct", ["a", "b"], ["seq"]),
             helper.make_node("ConcatFromSequence", ["seq"], ["y"], axis=1)]
    return _model(nodes, [V("x", TensorProto.FLOAT, [1, 16])], [V("y", TensorProto.FLOAT, [1, 16])],
                  [numpy_helper.from_array(_f(_rng(), 16, 8), "w")])


def sequence_input_model() -> onnx.ModelProto:
    nodes = [helper.make_node("ConcatFromSequence", ["xs"], ["c"], axis=0), helper.make_node("MatMul", ["c", "w"], ["y"])]
    seq = helper.make_value_info("xs", helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4])))
    return _model(nodes, [seq], [V("y", TensorProto.FLOAT, ["n", 4])], [numpy_helper.from_array(_f(_rng(), 4, 4), "w")])


def optional_output_model() -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Optional", ["a"], ["y"])]
    opt = helper.make_value_info("y", helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [1, 4])))
    return _model(nodes, [V("x", TensorProto.FLOAT, [1, 4])], [opt], [numpy_helper.from_array(_f(_rng(), 4, 4), "w")], opset=18)


def optional_internal_model() -> onnx.ModelProto:
    """Optional values inside the graph (Optional -> OptionalGetElement); tensor inputs/outputs."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Optional", ["a"], ["o"]),
             helper.make_node("OptionalGetElement", ["o"], ["g"]), helper.make_node("Relu", ["g"], ["y"])]
    return _model(nodes, [V("x", TensorProto.FLOAT, [1, 4])], [V("y", TensorProto.FLOAT, [1, 4])],
                  [numpy_helper.from_array(_f(_rng(), 4, 4), "w")], opset=18)


def pad_model(pad: int) -> onnx.ModelProto:
    pads = np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64)
    return _model([helper.make_node("Pad", ["x", "pads"], ["y"], name="pad")], [V("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                  [V("y", TensorProto.FLOAT, ["a", "b", "c", "d"])], [numpy_helper.from_array(pads, "pads")])


def resize_model(scale: float) -> onnx.ModelProto:
    scales = np.array([1, 1, scale, scale], np.float32)
    return _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], name="resize")],
                  [V("x", TensorProto.FLOAT, [1, 3, 8, 8])], [V("y", TensorProto.FLOAT, ["a", "b", "c", "d"])],
                  [numpy_helper.from_array(scales, "scales")])


def lying_initializer_model(kind: str) -> onnx.ModelProto:
    m = mlp_model()
    w = m.graph.initializer[0]
    if kind == "short_raw":
        w.raw_data = w.raw_data[: len(w.raw_data) // 2]
    elif kind == "huge_dims":
        w.dims[0] = 1 << 40
    elif kind == "typed_short":
        arr = numpy_helper.to_array(w)
        w.ClearField("raw_data")
        w.float_data.extend(arr.reshape(-1)[:10].tolist())
    return m


# ---------------------------------------------------------------- the CLI check


def _run_case(cli, tmp_path: Path, model_path: Path, args=(), expect=(OK, GATE, BAD), extra_files=()):
    """Run the CLI on ``model_path``; check the corpus contract; return the result."""
    watched = [model_path, *extra_files]
    hashes = {p: sha256(p) for p in watched}
    outs = tmp_path / "outs"
    outs.mkdir(exist_ok=True)
    out = outs / "bundle"
    r = cli(model_path, "-o", out, "--force", *map(str, args))
    assert r.code in (OK, GATE, BAD), r
    assert r.code in expect, r
    assert "Traceback" not in r.err + r.out, r
    errs = [ln for ln in r.err.splitlines() if ln.strip()]
    if r.code == BAD:
        assert len(errs) == 1 and errs[0].startswith("compress: error: "), r
        assert not any(outs.iterdir()), sorted(os.listdir(outs))  # no bundle, no staging dir
    else:
        assert (out / "manifest.json").is_file(), r
        assert [p.name for p in outs.iterdir()] == ["bundle"], sorted(os.listdir(outs))
    for p, h in hashes.items():
        assert sha256(p) == h, f"{p} was modified"
    return r


def _save(tmp_path: Path, model: onnx.ModelProto, name="m.onnx") -> Path:
    p = tmp_path / name
    p.write_bytes(model.SerializeToString())
    return p


# ---------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_truncated_file(cli, tmp_path, fraction):
    good = conv_bn_model().SerializeToString()
    p = tmp_path / "trunc.onnx"
    p.write_bytes(good[: int(len(good) * fraction)])
    r = _run_case(cli, tmp_path, p, FAST, expect=(BAD,))
    assert "not an ONNX model" in r.err or "model fails" in r.err or "holds" in r.err, r


def _flipped(data: bytes, seed: int, flips: int) -> bytes:
    rng = _rng(seed)
    b = bytearray(data)
    for pos in rng.integers(0, len(b), flips):
        b[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(b)


@pytest.mark.parametrize("seed", range(24))
def test_bit_flipped_file(cli, tmp_path, seed):
    """Random bit flips anywhere in the file (header, names, attributes, dims, weights)."""
    p = tmp_path / "flip.onnx"
    p.write_bytes(_flipped(conv_bn_model().SerializeToString(), seed, flips=1 + seed % 4))
    _run_case(cli, tmp_path, p, [*FAST, "--sparsity", "0.5"])


@pytest.mark.parametrize("kind", ["short_raw", "huge_dims", "typed_short"])
def test_initializer_lies_about_its_size(cli, tmp_path, kind):
    r = _run_case(cli, tmp_path, _save(tmp_path, lying_initializer_model(kind)), FAST, expect=(BAD,))
    assert "'w1'" in r.err, r


# ---------------------------------------------------------------- resource limits


def test_absurd_input_dim(cli, tmp_path):
    m = mlp_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 12 << 40  # 12Ti x 16 float32: 768 TiB (the user report)
    r = _run_case(cli, tmp_path, _save(tmp_path, m), FAST, expect=(BAD,))
    assert "input 'x'" in r.err and "768.0 TiB" in r.err, r


@pytest.mark.parametrize("case,needle", [
    ({"pads": (1_000_000_000,) * 4}, "pads"),
    ({"pads": (60_000,) * 4}, "tensor 'y'"),  # accepted attribute, but the output would need ~214 GiB
    ({"strides": (0, 1)}, "strides"),
    ({"dilations": (1 << 30, 1)}, "dilations"),
    ({"pads": (-5, 0, 0, 0)}, "pads"),
])
def test_absurd_conv_attributes(cli, tmp_path, case, needle):
    r = _run_case(cli, tmp_path, _save(tmp_path, conv_model(**case)), FAST, expect=(BAD,))
    assert needle in r.err and "conv" in r.err, r


@pytest.mark.parametrize("build,needle", [(lambda: pad_model(1 << 20), "Pad node 'pad'"),
                                          (lambda: resize_model(1e6), "Resize node 'resize'")])
def test_absurd_pad_and_resize(cli, tmp_path, build, needle):
    r = _run_case(cli, tmp_path, _save(tmp_path, build()), FAST, expect=(BAD,))
    assert needle in r.err and "TiB" in r.err, r


def test_absurd_input_shape_flag(cli, tmp_path):
    r = _run_case(cli, tmp_path, _save(tmp_path, mlp_model(dynamic=True)), [*FAST, "--input-shape", "x:100000000000x16"],
                  expect=(BAD,))
    assert "input 'x'" in r.err and "over the limit" in r.err, r


def test_huge_constant_of_shape(cli, tmp_path):
    r = _run_case(cli, tmp_path, _save(tmp_path, constant_of_shape_model(1 << 42)), FAST, expect=(BAD,))
    assert "'big'" in r.err and "ConstantOfShape" in r.err, r


def test_huge_shape_from_data_propagation(cli, tmp_path):
    r = _run_case(cli, tmp_path, _save(tmp_path, shape_computed_huge_model()), FAST, expect=(BAD,))
    assert "shape inference failed" in r.err or "TiB" in r.err, r


# ---------------------------------------------------------------- old IR / opsets / Constant weights


def test_ir3_resnet_like_full_run(cli, tmp_path):
    """IR 3 + opset 9 (initializers listed as inputs), BN folded into convs, sparsified, compiled."""
    p = _save(tmp_path, resnet_like_ir3())
    r = _run_case(cli, tmp_path, p, ["--sparsity", "0.5", "--no-latency"], expect=(OK, GATE))
    out = onnx.load(tmp_path / "outs" / "bundle" / "model.onnx")
    assert out.ir_version >= 7 and out.opset_import[0].version == 13
    assert "BatchNormalization" not in {n.op_type for n in out.graph.node}
    assert not {i.name for i in out.graph.input} & {i.name for i in out.graph.initializer}
    assert (tmp_path / "outs" / "bundle" / "model_x86_64.so").exists() or "artifact" in r.out, r


@pytest.mark.parametrize("opset", [7, 8, 9, 10, 11, 12])
def test_old_opsets_converted(cli, tmp_path, opset):
    p = _save(tmp_path, small_cnn(opset))
    _run_case(cli, tmp_path, p, [*FAST, "--sparsity", "0.5", "--no-gate"], expect=(OK,))
    out = onnx.load(tmp_path / "outs" / "bundle" / "model.onnx")
    assert out.opset_import[0].version == 13
    assert "Constant" not in {n.op_type for n in out.graph.node}  # the stem weight was lifted into an initializer
    assert any(list(t.dims) == [8, 3, 3, 3] for t in out.graph.initializer)
    w2 = next(numpy_helper.to_array(t) for t in out.graph.initializer if list(t.dims) == [8, 8, 3, 3])
    assert (w2 == 0).mean() > 0.3


def test_external_data_in_folder(cli, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    onnx.save(conv_bn_model(), d / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    _run_case(cli, tmp_path, d / "m.onnx", FAST, expect=(OK,), extra_files=[d / "m.data"])


@pytest.mark.parametrize("kind", ["parent", "absolute", "length_past_end", "missing"])
def test_external_data_bad(cli, tmp_path, kind):
    d = tmp_path / "model"
    d.mkdir()
    onnx.save(conv_bn_model(), d / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    m = onnx.load(d / "m.onnx", load_external_data=False)
    t = m.graph.initializer[0]
    entries = {e.key: e for e in t.external_data}
    if kind == "parent":
        (tmp_path / "m.data").write_bytes((d / "m.data").read_bytes())
        entries["location"].value = "../m.data"
    elif kind == "absolute":
        entries["location"].value = str((d / "m.data").resolve())
    elif kind == "length_past_end":
        entries["offset"].value = str((d / "m.data").stat().st_size - 8) if "offset" in entries else "0"
        if "offset" not in entries:
            t.external_data.add(key="offset", value=str((d / "m.data").stat().st_size - 8))
    else:
        entries["location"].value = "nope.data"
    onnx.save(m, d / "m.onnx")
    r = _run_case(cli, tmp_path, d / "m.onnx", FAST, expect=(BAD,), extra_files=[d / "m.data"])
    assert "external data" in r.err or "holds" in r.err, r


# ---------------------------------------------------------------- control flow, sequences, optional


def test_if_with_weights_in_branches_full_run(cli, tmp_path):
    r = _run_case(cli, tmp_path, _save(tmp_path, if_model()), ["--no-latency"], expect=(OK,))
    assert "control-flow" not in r.out  # no compression pass ran: nothing to warn about


def test_if_sparsified_warns_about_branches(cli, tmp_path):
    r = _run_case(cli, tmp_path, _save(tmp_path, if_model()), [*FAST, "--sparsity", "0.5", "--no-gate"], expect=(OK,))
    assert "weights inside control-flow bodies left untouched" in r.out and "If node 'branch'" in r.out, r
    out = onnx.load(tmp_path / "outs" / "bundle" / "model.onnx")
    assert [n.op_type for n in out.graph.node].count("If") == 1


def test_if_constant_condition_full_run(cli, tmp_path):
    """Constant condition: the If is replaced by its branch, whose result folds to a constant."""
    _run_case(cli, tmp_path, _save(tmp_path, if_model(const_cond=True)), ["--no-latency"], expect=(OK,))
    out = onnx.load(tmp_path / "outs" / "bundle" / "model.onnx")
    assert "If" not in {n.op_type for n in out.graph.node}


@pytest.mark.parametrize("build", [loop_model, scan_model])
def test_loop_and_scan_bodies(cli, tmp_path, build):
    _run_case(cli, tmp_path, _save(tmp_path, build()), [*FAST, "--sparsity", "0.5", "--no-gate"], expect=(OK,))


@pytest.mark.parametrize("build", [sequence_internal_model, optional_internal_model])
def test_sequence_and_optional_inside_graph(cli, tmp_path, build):
    _run_case(cli, tmp_path, _save(tmp_path, build()), [*FAST, "--sparsity", "0.5", "--no-gate"], expect=(OK,))


@pytest.mark.parametrize("build,needle", [(sequence_input_model, "sequence<"), (optional_output_model, "optional<")])
def test_sequence_and_optional_io_refused(cli, tmp_path, build, needle):
    r = _run_case(cli, tmp_path, _save(tmp_path, build()), FAST, expect=(BAD,))
    assert needle in r.err, r


# ---------------------------------------------------------------- verification inputs


def test_tiny_bert_random_ids_and_masks(cli, tmp_path):
    r = _run_case(cli, tmp_path, _save(tmp_path, tiny_bert()), [*FAST, "--sparsity", "0.3", "--no-gate"], expect=(OK,))
    assert "input_ids: ids in [0, 30)" in r.out and "token_type_ids: ids in [0, 2)" in r.out, r
    assert "attention_mask: 0/1 padding mask" in r.out and "weak evidence" in r.out, r
    feeds = np.load(tmp_path / "outs" / "bundle" / "selfcheck" / "inputs.npz")
    assert feeds["token_type_ids"].max() <= 1 and feeds["input_ids"].max() < 30
    assert set(np.unique(feeds["attention_mask"])) <= {0, 1} and (feeds["attention_mask"][..., 0] == 1).all()


def test_int_input_without_range_refused(cli, tmp_path):
    r = _run_case(cli, tmp_path, _save(tmp_path, int_shape_input_model()), FAST, expect=(BAD,))
    assert "integer input 'shape'" in r.err and "--calib" in r.err, r


def test_model_onnxruntime_cannot_run(cli, tmp_path):
    r = _run_case(cli, tmp_path, _save(tmp_path, bert_bad_position_ids()), FAST, expect=(BAD,))
    assert "onnxruntime cannot run the original model" in r.err and "pos_emb" in r.err, r


@pytest.mark.parametrize("build", [bert_bad_position_ids, if_model])
def test_stderr_one_line_in_a_subprocess(tmp_path, build):
    """What a shell sees on file descriptor 2 (onnxruntime's C++ logger writes there directly, past
    Python's sys.stderr): only the CLI's one error line."""
    p = _save(tmp_path, build())
    h = sha256(p)
    bad = build is bert_bad_position_ids
    r = run_cli_subprocess(p, "-o", tmp_path / "out", *FAST, *(["--no-gate", "--dump-ir", tmp_path / "ir"] if not bad else []),
                           timeout=300)
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    if bad:
        assert r.code == BAD and len(lines) == 1 and lines[0].startswith("compress: error: "), r
        assert not (tmp_path / "out").exists()
    else:
        assert r.code == OK and not lines, r
    assert sha256(p) == h


ZOO_RESNET50 = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"


@pytest.mark.skipif(not ZOO_RESNET50.is_file(), reason="onnx's test data not installed")
def test_model_zoo_resnet50_ir3_opset9(cli, tmp_path):
    """The opset-9, IR-3 ResNet-50 that ships in the onnx package (weights as ConstantOfShape nodes,
    initializers listed as graph inputs): BN folded, sparsified, valid after the last pass."""
    r = _run_case(cli, tmp_path, ZOO_RESNET50, [*FAST, "--sparsity", "0.5", "--verify-samples", "2"], expect=(OK, GATE))
    assert "cleanup.fold_batchnorm" in r.out and "folded=53" in r.out, r
