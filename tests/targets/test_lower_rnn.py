"""lower.rnn: LSTM/GRU unrolled into primitive ops; oracle = onnxruntime on the original."""
from __future__ import annotations

import itertools
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compressor import ir
from compressor.pass_base import PassContext, make_config
from compressor.pass_manager import PassManager
from compressor.errors import UsageError
from targets.lower_rnn import LowerRNN
from tests.conftest import make_model, ort_run

ATOL = 1e-5
RNN_OPS = {"LSTM", "GRU", "RNN", "Loop", "Scan"}
PRIMITIVE = {"MatMul", "Add", "Mul", "Sub", "Sigmoid", "Tanh", "Slice", "Split", "Concat", "Unsqueeze",
             "Squeeze", "Reshape", "Transpose"}


def lower(model, **cfg):
    p = LowerRNN(make_config(LowerRNN, cfg))
    out, recs = PassManager([(p, "builtin:test")]).run(model, PassContext())
    return out, recs[0]


def helper_rnn(op, *, direction="forward", layout=0, seq=7, batch=3, inp=5, hidden=4, bias=True,
               init="none", lbr=0, seed=0, outputs=None, extra_attrs=None, peephole=False):
    """One LSTM/GRU node; init in none|const|input (initial_h and, for LSTM, initial_c)."""
    rng = np.random.default_rng(seed)
    G = 4 if op == "LSTM" else 3
    nd = 2 if direction == "bidirectional" else 1
    f = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)
    inits = {"W": f(nd, G * hidden, inp), "R": f(nd, G * hidden, hidden)}
    x_shape = [seq, batch, inp] if layout == 0 else [batch, seq, inp]
    st_shape = [nd, batch, hidden] if layout == 0 else [batch, nd, hidden]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)]
    names = ["x", "W", "R", ""]
    if bias:
        inits["B"] = f(nd, 2 * G * hidden)
        names[3] = "B"
    feeds = {"x": f(*x_shape)}
    if init != "none":
        names += ["", "h0"] + (["c0"] if op == "LSTM" else [])
        for s in ["h0"] + (["c0"] if op == "LSTM" else []):
            if init == "const":
                inits[s] = f(*st_shape)
            else:
                inputs.append(helper.make_tensor_value_info(s, TensorProto.FLOAT, st_shape))
                feeds[s] = f(*st_shape)
    if peephole:
        while len(names) < 7:
            names.append("")
        names.append("P")
        inits["P"] = f(nd, 3 * hidden)
    y_shape = [seq, nd, batch, hidden] if layout == 0 else [batch, seq, nd, hidden]
    out_names = ["Y", "Y_h", "Y_c"][: (3 if op == "LSTM" else 2)]
    outputs = outputs or out_names
    attrs = dict(hidden_size=hidden, direction=direction, layout=layout, **(extra_attrs or {}))
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    node = helper.make_node(op, names, [n if n in outputs else "" for n in out_names], name=f"{op.lower()}0", **attrs)
    # consume Y through an extra op so the pass also has to rewire consumers, not only graph outputs
    nodes = [node, helper.make_node("Relu", ["Y"], ["Y_relu"])] if "Y" in outputs else [node]
    outs = [helper.make_tensor_value_info("Y_relu" if n == "Y" else n, TensorProto.FLOAT,
                                          y_shape if n == "Y" else st_shape) for n in out_names if n in outputs]
    return make_model(nodes, inputs, outs, inits), feeds


def as_layout0(model):
    """onnxruntime has no layout=1 kernels: the reference is the same node in layout 0
    between Transposes (X / initial states in, Y / Y_h / Y_c out)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    del m.graph.node[:]
    for n in nodes:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type not in ("LSTM", "GRU") or "layout" not in attrs or attrs["layout"].i == 0:
            m.graph.node.append(n)
            continue
        attrs["layout"].i = 0
        for i in (0, 5, 6):
            if i < len(n.input) and n.input[i]:
                m.graph.node.append(helper.make_node("Transpose", [n.input[i]], [n.input[i] + "_l0"], perm=[1, 0, 2]))
                n.input[i] += "_l0"
        post = []
        for i, perm in ((0, [2, 0, 1, 3]), (1, [1, 0, 2]), (2, [1, 0, 2])):
            if i < len(n.output) and n.output[i]:
                post.append(helper.make_node("Transpose", [n.output[i] + "_l0"], [n.output[i]], perm=perm))
                n.output[i] += "_l0"
        m.graph.node.extend([n] + post)
    return m


def check_lowered(model, feeds, **cfg):
    ref = ort_run(as_layout0(model), feeds)
    out, rec = lower(model, **cfg)
    ops = {n.op_type for n in out.graph.node}
    assert not ops & RNN_OPS, ops
    assert ops <= PRIMITIVE | {"Relu", "Identity", "Gather", "Shape", "Cast", "Slice"}, ops
    assert rec.stats["lowered"] >= 1 and rec.stats["skipped"] == 0 and rec.stats["nodes_added"] > 0
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    got = ort_run(out, feeds)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, rtol=0, atol=ATOL)
    return out, rec


CONFIGS = list(itertools.product(["forward", "reverse", "bidirectional"], [0, 1], [7, 1], [3, 1]))


@pytest.mark.parametrize("direction,layout,seq,batch", CONFIGS)
@pytest.mark.parametrize("bias,init", [(True, "input"), (False, "none"), (True, "const")])
def test_lstm_helper_models(direction, layout, seq, batch, bias, init):
    m, feeds = helper_rnn("LSTM", direction=direction, layout=layout, seq=seq, batch=batch, bias=bias, init=init)
    check_lowered(m, feeds)


@pytest.mark.parametrize("direction,layout,seq,batch", CONFIGS)
@pytest.mark.parametrize("lbr", [0, 1])
@pytest.mark.parametrize("bias,init", [(True, "input"), (False, "none"), (True, "const"), (True, "none")])
def test_gru_helper_models(direction, layout, seq, batch, lbr, bias, init):
    m, feeds = helper_rnn("GRU", direction=direction, layout=layout, seq=seq, batch=batch, bias=bias, init=init, lbr=lbr)
    check_lowered(m, feeds)


@pytest.mark.parametrize("op,outputs", [("LSTM", ["Y_h"]), ("LSTM", ["Y_c"]), ("LSTM", ["Y", "Y_c"]), ("GRU", ["Y_h"]),
                                        ("GRU", ["Y"])])
def test_only_consumed_outputs_are_built(op, outputs):
    m, feeds = helper_rnn(op, direction="bidirectional", init="input", outputs=outputs, seed=3)
    out, _ = check_lowered(m, feeds)
    ops = [n.op_type for n in out.graph.node]
    if "Y" not in outputs:
        assert "Unsqueeze" not in ops  # the Y stack is not built
    if op == "LSTM" and outputs == ["Y_h"]:
        # the last cell state only feeds tanh(C) for H; no dangling ops survive cleanup
        assert all(o for n in out.graph.node for o in n.output)


def test_sequence_lens_equal_to_seq_len_is_accepted_and_other_values_skipped():
    m, feeds = helper_rnn("GRU", seq=4, batch=2, init="input")
    node = m.graph.node[0]
    node.input[4] = "sl"
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array([4, 4], np.int32), "sl"))
    check_lowered(m, feeds)
    m.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(np.array([4, 2], np.int32), "sl"))
    out, rec = lower(m)
    assert [n.op_type for n in out.graph.node].count("GRU") == 1
    assert rec.stats == {"lowered": 0, "skipped": 1, "fused": [], "nodes_added": 0}
    assert "sequence_lens" in rec.warnings[0]


@pytest.mark.parametrize("case", ["peephole", "activations", "clip", "max_steps"])
def test_unsupported_nodes_are_skipped_and_reported(case):
    kw = {"peephole": dict(peephole=True, init="input"),
          "activations": dict(extra_attrs={"activations": ["Sigmoid", "Relu", "Tanh"]}),
          "clip": dict(extra_attrs={"clip": 2.0}),
          "max_steps": {}}[case]
    m, feeds = helper_rnn("LSTM", seed=5, **kw)
    # a second, supported RNN in the same graph is still lowered
    g, gfeeds = helper_rnn("GRU", seed=6, init="none", outputs=["Y_h"])
    gru = g.graph.node[0]
    for i in (1, 2, 3):
        gru.input[i] = "g" + gru.input[i]
    gru.input[0] = "x"
    gru.output[1] = "G_h"
    m.graph.node.append(gru)
    m.graph.initializer.extend(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), "g" + t.name)
                               for t in g.graph.initializer)
    m.graph.output.append(helper.make_tensor_value_info("G_h", TensorProto.FLOAT, [1, 3, 4]))
    ref = ort_run(as_layout0(m), feeds)
    out, rec = lower(m, **({"max_steps": 6} if case == "max_steps" else {}))
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    if case == "max_steps":  # both nodes have 7 steps
        assert ops.count("LSTM") == 1 and ops.count("GRU") == 1
        assert rec.stats == {"lowered": 0, "skipped": 2, "fused": [], "nodes_added": 0} and rec.modified is False
        assert all("exceeds max_steps=6" in w for w in rec.warnings) and len(rec.warnings) == 2
    else:
        assert ops.count("LSTM") == 1 and "GRU" not in ops
        assert rec.stats["lowered"] == 1 and rec.stats["skipped"] == 1
        assert len(rec.warnings) == 1 and "lstm0" in rec.warnings[0] and case in rec.warnings[0]
    for a, b in zip(ort_run(out, feeds), ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


def test_zero_peephole_constant_is_treated_as_absent():
    m, feeds = helper_rnn("LSTM", peephole=True, init="input", seed=7)
    next(t for t in m.graph.initializer if t.name == "P").CopyFrom(
        onnx.numpy_helper.from_array(np.zeros((1, 12), np.float32), "P"))
    check_lowered(m, feeds)


def test_config_validation_and_no_rnn_is_a_no_op():
    with pytest.raises(UsageError):
        make_config(LowerRNN, {"max_steps": 0})
    from tests.conftest import conv_bn_model
    out, rec = lower(conv_bn_model())
    assert rec.modified is False and rec.stats == {"lowered": 0, "skipped": 0, "fused": [], "nodes_added": 0}


# ---- torch-exported models ---------------------------------------------------------------

torch = pytest.importorskip("torch")


class _Net(torch.nn.Module):
    def __init__(self, kind, bidirectional, with_state):
        super().__init__()
        cls = torch.nn.LSTM if kind == "LSTM" else torch.nn.GRU
        self.rnn = cls(5, 6, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.kind, self.with_state = kind, with_state

    def forward(self, x, *state):
        if self.with_state:
            st = state if self.kind == "LSTM" else state[0]
            y, hs = self.rnn(x, st)
        else:
            y, hs = self.rnn(x)
        if self.kind == "LSTM":
            return y, hs[0], hs[1]
        return y, hs


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_torch_exported_models(tmp_path, kind, bidirectional, with_state):
    torch.manual_seed(0)
    net = _Net(kind, bidirectional, with_state).eval()
    batch, seq, nd = 3, 7, 2 if bidirectional else 1
    x = torch.randn(batch, seq, 5)
    args = [x]
    names = ["x"]
    if with_state:
        args.append(torch.randn(2 * nd, batch, 6))
        names.append("h0")
        if kind == "LSTM":
            args.append(torch.randn(2 * nd, batch, 6))
            names.append("c0")
    path = tmp_path / "rnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, tuple(args), str(path), dynamo=False, opset_version=17, input_names=names)
    raw = onnx.load(str(path))
    assert kind in {n.op_type for n in raw.graph.node}
    model = ir.load(path)
    feeds = {n: a.numpy() for n, a in zip(names, args)}
    out, rec = check_lowered(model, feeds)
    assert rec.stats["lowered"] == 2
    with torch.no_grad():
        want = net(*args)
    for g, w in zip(ort_run(out, feeds), want):
        np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=ATOL)
