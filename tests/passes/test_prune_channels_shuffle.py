"""prune.channels through channel shuffles and grouped 1x1 convs (ShuffleNet v1/v2).

A shuffle (Reshape C -> (g, C/g), Transpose, Reshape back) is followed as a permutation: only index j of
the C/g axis goes, from all g blocks at once. Grouped convs whose whole-group units a shuffle would merge
are pruned in balanced mode: the same number of channels from each group, ``group`` unchanged.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import ir, runtime
from tests.passes.prune_channels_util import feeds_for, zero_then_remove


def _model(nodes, inits, x_shape, y_shape, opset=17):
    graph = helper.make_graph(
        nodes, "shuffle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _shuffle(n, x, y, c, g, hw, tag):
    return [n("Reshape", [x, f"{tag}_s1"], [f"{tag}_r"], name=f"{tag}_split"),
            n("Transpose", [f"{tag}_r"], [f"{tag}_t"], name=f"{tag}_perm", perm=[0, 2, 1, 3, 4]),
            n("Reshape", [f"{tag}_t", f"{tag}_s2"], [y], name=f"{tag}_merge")], {
        f"{tag}_s1": np.array([1, g, c // g, hw, hw], np.int64), f"{tag}_s2": np.array([1, c, hw, hw], np.int64)}


def shufflenet_v1_unit() -> onnx.ModelProto:
    """stem -> [gconv1x1 (g=3) -> BN -> Relu -> shuffle(3) -> dw3x3 -> BN -> gconv1x1 (g=3) -> BN] + x -> Relu
    -> GAP -> Gemm."""
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    pos = lambda *s: (rng.random(s) + 0.5).astype(np.float32)
    n = helper.make_node
    inits = {"w0": f(24, 3, 3, 3), "b0": f(24), "wa": f(36, 8, 1, 1), "ga": pos(36), "ba": f(36), "ma": f(36),
             "va": pos(36), "wd": f(36, 1, 3, 3), "gd": pos(36), "bd": f(36), "md": f(36), "vd": pos(36),
             "wb": f(24, 12, 1, 1), "gb": pos(24), "bb": f(24), "mb": f(24), "vb": pos(24), "fc": f(24, 10),
             "fcb": f(10)}
    sh, shc = _shuffle(n, "a", "s", 36, 3, 8, "sh")
    inits.update(shc)
    nodes = [n("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             n("Relu", ["c0"], ["r0"], name="r0"),
             n("Conv", ["r0", "wa"], ["ca"], name="gconv_a", group=3),
             n("BatchNormalization", ["ca", "ga", "ba", "ma", "va"], ["na"], name="bn_a"),
             n("Relu", ["na"], ["a"], name="ra"), *sh,
             n("Conv", ["s", "wd"], ["cd"], name="dw", group=36, pads=[1, 1, 1, 1]),
             n("BatchNormalization", ["cd", "gd", "bd", "md", "vd"], ["nd"], name="bn_d"),
             n("Conv", ["nd", "wb"], ["cb"], name="gconv_b", group=3),
             n("BatchNormalization", ["cb", "gb", "bb", "mb", "vb"], ["nb"], name="bn_b"),
             n("Add", ["nb", "r0"], ["sum"], name="add"),
             n("Relu", ["sum"], ["r1"], name="r1"),
             n("GlobalAveragePool", ["r1"], ["gap"], name="gap"),
             n("Flatten", ["gap"], ["fl"], name="flat"),
             n("Gemm", ["fl", "fc", "fcb"], ["y"], name="fc")]
    return _model(nodes, inits, [1, 3, 8, 8], [1, 10])


def shufflenet_v2_unit() -> onnx.ModelProto:
    """stem -> Split(16, 16) -> [x1 | conv1x1 -> Relu -> dw3x3 -> conv1x1 -> Relu (x2)] -> Concat -> shuffle(2)
    -> Split -> the same unit again -> Concat -> shuffle(2) -> GAP -> Gemm."""
    rng = np.random.default_rng(1)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    n = helper.make_node
    inits = {"w0": f(32, 3, 3, 3), "b0": f(32), "fc": f(32, 10), "fcb": f(10), "split": np.array([16, 16], np.int64)}
    nodes = [n("Conv", ["x", "w0", "b0"], ["c0"], name="stem", pads=[1, 1, 1, 1]), n("Relu", ["c0"], ["in0"], name="r0")]
    for u in range(2):
        p = f"u{u}"
        inits.update({f"{p}_w1": f(16, 16, 1, 1), f"{p}_b1": f(16), f"{p}_wd": f(16, 1, 3, 3), f"{p}_w2": f(16, 16, 1, 1),
                      f"{p}_b2": f(16)})
        sh, shc = _shuffle(n, f"{p}_cat", f"in{u + 1}", 32, 2, 8, f"{p}_sh")
        inits.update(shc)
        nodes += [n("Split", [f"in{u}", "split"], [f"{p}_x1", f"{p}_x2"], name=f"{p}_split", axis=1),
                  n("Conv", [f"{p}_x2", f"{p}_w1", f"{p}_b1"], [f"{p}_c1"], name=f"{p}_pw1"),
                  n("Relu", [f"{p}_c1"], [f"{p}_r1"], name=f"{p}_r1"),
                  n("Conv", [f"{p}_r1", f"{p}_wd"], [f"{p}_cd"], name=f"{p}_dw", group=16, pads=[1, 1, 1, 1]),
                  n("Conv", [f"{p}_cd", f"{p}_w2", f"{p}_b2"], [f"{p}_c2"], name=f"{p}_pw2"),
                  n("Relu", [f"{p}_c2"], [f"{p}_r2"], name=f"{p}_r2"),
                  n("Concat", [f"{p}_x1", f"{p}_r2"], [f"{p}_cat"], name=f"{p}_cat", axis=1), *sh]
    nodes += [n("GlobalAveragePool", ["in2"], ["gap"], name="gap"), n("Flatten", ["gap"], ["fl"], name="flat"),
              n("Gemm", ["fl", "fc", "fcb"], ["y"], name="fc")]
    return _model(nodes, inits, [1, 3, 8, 8], [1, 10])


def _shape(model, name):
    return list(numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).shape)


def _conv(model, name):
    node = next(x for x in model.graph.node if x.name == name)
    w = next(t for t in model.graph.initializer if t.name == node.input[1])
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return list(w.dims), group


def _reshapes(model):
    inits = {t.name: t for t in model.graph.initializer}
    return {x.name: numpy_helper.to_array(inits[x.input[1]]).tolist() for x in model.graph.node if x.op_type == "Reshape"}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_shufflenet_v1_unit(ratio):
    r = zero_then_remove(shufflenet_v1_unit(), ratio=ratio, order="uniform")  # the residual stream too
    assert set(r["plan"].dep.view.balanced) == {"gconv_a", "gconv_b"}
    assert "barrier" not in r["status"] and r["params"][1] < r["params"][0]
    pr = r["pruned"]
    (wa, ga), (wd, gd), (wb, gb) = _conv(pr, "gconv_a"), _conv(pr, "dw"), _conv(pr, "gconv_b")
    assert ga == gb == 3 and wa[0] % 3 == 0 and wa[0] < 36  # bottleneck pruned, 3 groups kept
    assert gd == wd[0] == wa[0]  # depthwise follows
    m = wa[0] // 3
    shapes = _reshapes(pr)
    assert shapes["sh_split"] == [1, 3, m, 8, 8] and shapes["sh_merge"] == [1, 3 * m, 8, 8]
    assert wb[1] * 3 == wa[0]
    stem, _ = _conv(pr, "stem")  # the residual stream: equal per group of both gconvs (8 and 8 per group)
    assert stem[0] < 24 and stem[0] % 3 == 0 and wa[1] * 3 == stem[0] and wb[0] == stem[0]


def test_shufflenet_v2_unit():
    r = zero_then_remove(shufflenet_v2_unit(), ratio=0.3)
    assert "barrier" not in r["status"] and r["params"][1] < r["params"][0]
    shapes = _reshapes(r["pruned"])
    assert shapes["u0_sh_split"][2] < 16 and shapes["u1_sh_split"][1] == 2  # g stays, C/g shrinks


def test_shuffle_rounding():
    """round_to with 3 groups: kept counts are multiples of both; 8 cannot be met below 24 channels, so the
    groups stay whole and the report says why."""
    r = zero_then_remove(shufflenet_v1_unit(), ratio=0.5, round_to=6, order="uniform")
    (stem, _), (wa, ga) = _conv(r["pruned"], "stem"), _conv(r["pruned"], "gconv_a")
    assert stem[0] == 12 and wa[0] == 18 and ga == 3
    r = zero_then_remove(shufflenet_v1_unit(), ratio=0.3, round_to=8, order="uniform")
    assert r["removed"] == 0
    st = [s for s in r["plan"].group_stats if s["status"] == "unchanged"]
    assert len(st) == 2 and all("equal per group with round_to 8" in s["barriers"][0] for s in st)


# ---------------------------------------------------------------------------------------- the model zoo's ShuffleNet

def light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """A model of the ONNX model zoo as shipped in the onnx package's backend test data ("light" copies: every
    weight is a ConstantOfShape of 0.02), with random weights: He-normal kernels, BN scales/variances in
    [0.5, 1.5), small biases/means; initializers no longer listed as graph inputs (IR >= 4)."""
    import onnx.backend.test as bt

    m = onnx.load(str(Path(bt.__file__).parent / "data" / "light" / f"light_{name}.onnx"))
    rng = np.random.default_rng(seed)
    inits = {i.name: i for i in m.graph.initializer}
    keep, new = [], []
    for node in m.graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in inits:
            keep.append(node)
            continue
        shape = [int(d) for d in numpy_helper.to_array(inits[node.input[0]])]
        out = node.output[0]
        if out.endswith(("_riv_0", "_s_0")):  # BN variance / scale
            v = rng.uniform(0.5, 1.5, shape)
        elif len(shape) >= 2:
            v = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        else:
            v = rng.standard_normal(shape) * 0.1
        new.append(numpy_helper.from_array(v.astype(np.float32), out))
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for node in m.graph.node for i in node.input}
    kept = [i for i in list(m.graph.initializer) + new if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(kept)
    names = {i.name for i in kept}
    ins = [i for i in m.graph.input if i.name not in names and i.name in used]
    del m.graph.input[:]
    m.graph.input.extend(ins)
    m.ir_version = max(m.ir_version, 7)
    _calibrate_bn(m)
    return m


def _calibrate_bn(m: onnx.ModelProto) -> None:
    """Set every BatchNormalization's mean/var to its input's statistics on the tests' input (feeds_for, seed 0),
    in topological order, so activations stay O(1) and the Softmax output is not saturated (random weights
    alone give logits ~1e6: a one-hot output that would hide errors from the oracle)."""
    bns = [node for node in m.graph.node if node.op_type == "BatchNormalization"]
    stats = {x for node in bns for x in node.input[3:5]}
    inits = {i.name: i for i in m.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    kept = [i for i in probe.graph.initializer if i.name not in stats]
    del probe.graph.initializer[:]
    probe.graph.initializer.extend(kept)
    feeds = feeds_for(m)
    for node in bns:
        c = list(inits[node.input[3]].dims)
        for x, v in zip(node.input[3:5], (0.0, 1.0)):
            probe.graph.input.append(helper.make_tensor_value_info(x, TensorProto.FLOAT, c))
            feeds[x] = np.full(c, v, np.float32)
        probe.graph.output.append(helper.make_empty_tensor_value_info(node.input[0]))
    sess = runtime.session(probe)
    for node in bns:  # each run sees the earlier BNs calibrated
        a = sess.run([node.input[0]], feeds)[0].astype(np.float64)
        feeds[node.input[3]] = a.mean(axis=(0, 2, 3)).astype(np.float32)
        feeds[node.input[4]] = (a.var(axis=(0, 2, 3)) + 1e-5).astype(np.float32)
    for node in bns:
        for x in node.input[3:5]:
            inits[x].CopyFrom(numpy_helper.from_array(feeds[x], x))


@pytest.fixture(scope="module")
def zoo_shufflenet(tmp_path_factory):
    path = tmp_path_factory.mktemp("light") / "shufflenet.onnx"
    onnx.save(light_model("shufflenet"), path)
    return ir.load(path, {})


@pytest.mark.parametrize("round_to", [1, 16])
def test_zoo_shufflenet(zoo_shufflenet, round_to):
    r = zero_then_remove(zoo_shufflenet, ratio=0.3, round_to=round_to, order="uniform")
    before, after = r["params"]
    assert 1 - after / before >= 0.15, (before, after)
    probs = runtime.session(r["base"]).run(None, feeds_for(r["base"]))[0]
    assert probs.max() < 0.9  # the oracle compares an unsaturated Softmax
    assert r["status"].count("pruned") >= 15 and r["status"].count("barrier") <= 1  # the classifier's Softmax
    for node in r["pruned"].graph.node:
        if node.op_type == "Conv":
            w = next(t for t in r["pruned"].graph.initializer if t.name == node.input[1])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            assert w.dims[0] % group == 0 and w.dims[0] % round_to == 0


def test_balanced_without_scipy(monkeypatch):
    """Without scipy's MILP the proportional search still gives a balanced (if coarser) removal."""
    import passes.prune_channels as pc

    monkeypatch.setattr(pc, "_balanced_counts_milp", lambda *a, **k: None)
    r = zero_then_remove(shufflenet_v1_unit(), ratio=0.5, order="uniform")
    (wa, ga), (wb, gb) = _conv(r["pruned"], "gconv_a"), _conv(r["pruned"], "gconv_b")
    assert ga == gb == 3 and wa[0] < 36 and wb[1] * 3 == wa[0]
