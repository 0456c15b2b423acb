"""prune.channels: zero-then-remove oracle on every model and handler, ratio 0 identity, criteria, CLI."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor import ir
from compressor.errors import UsageError
from passes import PASSES
from passes.prune_channels import PruneChannelsConfig, plan
from tests.passes.prune_channels_util import cleaned, zero_then_remove

OPSET = 21


def _model(nodes, x_shape, y_shape, inits, opset=OPSET, x_type=TensorProto.FLOAT):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, x_shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
                          [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _rng_f(seed=0):
    rng = np.random.default_rng(seed)
    return lambda *s: rng.standard_normal(s).astype(np.float32), rng


def ops_zoo_cnn() -> onnx.ModelProto:
    """BN, Pad, GroupNorm, depthwise + grouped Conv, InstanceNorm, SE (ReduceMean/Mul), broadcast Mul/Div
    constants, Split/Concat, Slice, Resize, ConvTranspose, pooling, Flatten, Gemm(transB)."""
    f, rng = _rng_f(1)
    pos = lambda *s: (rng.random(s) + 0.5).astype(np.float32)
    i64 = lambda *v: np.array(v, dtype=np.int64)
    inits = {"w1": f(16, 4, 3, 3), "b1": f(16), "g": pos(16), "be": f(16), "mu": f(16), "var": pos(16),
             "pads": i64(0, 0, 1, 1, 0, 0, 1, 1), "w2": f(16, 16, 3, 3), "gns": pos(16), "gnb": f(16),
             "wdw": f(16, 1, 3, 3), "wg": f(16, 4, 1, 1), "ins": pos(16), "inb": f(16), "axes": i64(2, 3),
             "se1": f(8, 16, 1, 1), "se1b": f(8), "se2": f(16, 8, 1, 1), "se2b": f(16), "cm": pos(1, 16, 1, 1),
             "cd": pos(1, 16, 1, 1), "split": i64(8, 8), "st": i64(4), "en": i64(20), "ax1": i64(1),
             "scales": np.array([1, 1, 2, 2], np.float32), "wt": f(16, 8, 2, 2), "bt": f(8), "fc": f(10, 8), "fcb": f(10)}
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"], name="bn"),
        n("Relu", ["bn"], ["r"], name="r"),
        n("Pad", ["r", "pads"], ["p"], name="pad"),
        n("Conv", ["p", "w2"], ["c2"], name="c2"),
        n("GroupNormalization", ["c2", "gns", "gnb"], ["gn"], name="gn", num_groups=4),
        n("Conv", ["gn", "wdw"], ["dw"], name="dw", group=16, pads=[1, 1, 1, 1]),
        n("Conv", ["dw", "wg"], ["gc"], name="gc", group=4),
        n("InstanceNormalization", ["gc", "ins", "inb"], ["inn"], name="in"),
        n("Sigmoid", ["inn"], ["sg"], name="sg"),
        n("ReduceMean", ["sg", "axes"], ["m"], name="se_mean", keepdims=1),
        n("Conv", ["m", "se1", "se1b"], ["s1"], name="se1"),
        n("Relu", ["s1"], ["s1r"], name="se_relu"),
        n("Conv", ["s1r", "se2", "se2b"], ["s2"], name="se2"),
        n("HardSigmoid", ["s2"], ["s2s"], name="se_gate"),
        n("Mul", ["sg", "s2s"], ["se"], name="se_mul"),
        n("Mul", ["se", "cm"], ["mc"], name="mulc"),
        n("Div", ["mc", "cd"], ["dc"], name="divc"),
        n("Split", ["dc", "split"], ["sa", "sb"], name="split", axis=1),
        n("Concat", ["sb", "sa", "sa"], ["cat"], name="cat", axis=1),
        n("Slice", ["cat", "st", "en", "ax1"], ["sl"], name="slice"),
        n("Resize", ["sl", "", "scales"], ["rs"], name="resize", mode="nearest"),
        n("ConvTranspose", ["rs", "wt", "bt"], ["ct"], name="ct", strides=[2, 2]),
        n("LeakyRelu", ["ct"], ["lr"], name="lrelu"),
        n("MaxPool", ["lr"], ["mp"], name="mp", kernel_shape=[2, 2], strides=[2, 2]),
        n("GlobalAveragePool", ["mp"], ["gap"], name="gap"),
        n("Flatten", ["gap"], ["fl"], name="flat"),
        n("Gemm", ["fl", "fc", "fcb"], ["y"], name="fc", transB=1),
    ]
    return _model(nodes, [1, 4, 8, 8], [1, 10], inits)


def ops_zoo_seq(cumsum: bool = False) -> onnx.ModelProto:
    """LayerNorm over a non-channel axis, Transpose, MatMul + bias Add, Unsqueeze/Squeeze, Reshape into Gemm
    (channel x spatial), Softmax over a spatial axis; optionally a CumSum (no handler) on the channels."""
    f, _ = _rng_f(2)
    i64 = lambda *v: np.array(v, dtype=np.int64)
    inits = {"w": f(8, 4, 3, 3), "lns": f(4), "lnb": f(4), "mw": f(8, 12), "mb": f(12), "ax0": i64(0),
             "shape": i64(1, 192), "fc": f(192, 10), "one": i64(1)}
    n = helper.make_node
    nodes = [n("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             n("LayerNormalization", ["c", "lns", "lnb"], ["ln"], name="ln", axis=-1),
             n("Softmax", ["ln"], ["sm"], name="sm", axis=2),
             n("Transpose", ["sm"], ["t"], name="t1", perm=[0, 2, 3, 1]),
             n("MatMul", ["t", "mw"], ["mm"], name="mm"),
             n("Add", ["mm", "mb"], ["mmb"], name="bias"),
             n("Relu", ["mmb"], ["r"], name="relu"),
             n("Transpose", ["r"], ["t2"], name="t2", perm=[0, 3, 1, 2])]
    last = "t2"
    if cumsum:
        nodes.append(n("CumSum", ["t2", "one"], ["cs"], name="cumsum"))
        last = "cs"
    nodes += [n("Unsqueeze", [last, "ax0"], ["u"], name="unsq"),
              n("Squeeze", ["u", "ax0"], ["sq"], name="sq"),
              n("Reshape", ["sq", "shape"], ["rs"], name="reshape"),
              n("Gemm", ["rs", "fc"], ["y"], name="fc")]
    return _model(nodes, [1, 4, 4, 4], [1, 10], inits)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_handlers_cnn_zoo(ratio):
    r = zero_then_remove(ops_zoo_cnn(), ratio=ratio)
    assert "barrier" not in r["status"], r["plan"].group_stats
    assert r["params"][1] < r["params"][0]
    pruned = {o.name: o for o in r["pruned"].graph.node}
    assert pruned["gc"].attribute[0].i < 4 or any(a.name == "group" and a.i < 4 for a in pruned["gc"].attribute)


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_handlers_seq_zoo(ratio):
    r = zero_then_remove(ops_zoo_seq(), ratio=ratio)
    assert r["status"].count("pruned") == 2, r["plan"].group_stats
    fc = next(t for t in r["pruned"].graph.initializer if t.dims[-1] == 10)
    assert fc.dims[0] < 192 and fc.dims[0] % 16 == 0  # channel x spatial rows removed in blocks of 16


def test_barrier_is_reported_and_not_pruned():
    m = ops_zoo_seq(cumsum=True)
    g, ctx = cleaned(m)
    res = PASSES.get("prune.channels")(PruneChannelsConfig(ratio=0.5)).run(g, ctx)
    assert res.stats["barrier_ops"] == {"CumSum": 1}
    assert any("CumSum" in w for w in res.warnings)
    r = zero_then_remove(m, ratio=0.5)
    assert "barrier" in r["status"] and "pruned" in r["status"]


def test_layernorm_over_channels_is_inexact_unless_allowed():
    m = ops_zoo_seq()
    m.graph.node[1].attribute[0].i = 1  # LN over (C, H, W): channel axis normalised
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.ones((8, 4, 4), np.float32), "lns"))
    m.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.zeros((8, 4, 4), np.float32), "lnb"))
    g, ctx = cleaned(m)
    st = plan(g, ctx, PruneChannelsConfig(ratio=0.5)).group_stats
    assert "inexact" in [s["status"] for s in st]
    st2 = plan(g, ctx, PruneChannelsConfig(ratio=0.5, allow_inexact=True)).group_stats
    assert "inexact" not in [s["status"] for s in st2]


def test_ratio_zero_returns_identical_graph():
    m = ops_zoo_cnn()
    g, ctx = cleaned(m)
    before = ctx.export(g).SerializeToString()
    res = PASSES.get("prune.channels")(PruneChannelsConfig(ratio=0.0)).run(g, ctx)
    assert not res.modified and ctx.export(g).SerializeToString() == before
    assert res.stats["groups_pruned"] == 0 and res.stats["channels_before"] == res.stats["channels_after"] > 0


def test_round_to_and_min_channels():
    m = ops_zoo_seq()
    g, ctx = cleaned(m)
    pl = plan(g, ctx, PruneChannelsConfig(ratio=0.3, round_to=4))
    for s in pl.group_stats:
        if s["status"] == "pruned":
            assert s["channels_after"] % 4 == 0
    pl = plan(g, ctx, PruneChannelsConfig(ratio=0.9, min_channels=6))
    assert all(s["channels_after"] >= 6 for s in pl.group_stats if s["status"] == "pruned")


def test_round_keep_small_groups_and_multiples():
    from passes.prune_channels import _round_keep

    assert _round_keep(4, 8, 1, 16) == 8  # smaller than the multiple: step 8, never collapsed to the floor (was 1)
    assert _round_keep(3, 6, 1, 16) == 4
    assert _round_keep(1, 2, 1, 16) == 2
    assert _round_keep(12, 24, 1, 16) == 16
    assert _round_keep(24, 48, 1, 16) == 32
    assert _round_keep(3.5, 7, 1, 1) == 4


def concat_model() -> onnx.ModelProto:
    """Two 16-channel convs concatenated, read by one conv: one group, two producer segments. Segment b's
    channels are read with tiny consumer weights, so a group-level ranking would take most units from b."""
    f, _ = _rng_f(3)
    wc = f(8, 32, 3, 3)
    wc[:, 16:] *= 0.01
    inits = {"wa": f(16, 4, 3, 3) * 10, "wb": f(16, 4, 3, 3), "wc": wc}
    n = helper.make_node
    nodes = [n("Conv", ["x", "wa"], ["a"], name="ca", pads=[1, 1, 1, 1]),
             n("Conv", ["x", "wb"], ["b"], name="cb", pads=[1, 1, 1, 1]),
             n("Concat", ["a", "b"], ["cat"], name="cat", axis=1),
             n("Relu", ["cat"], ["r"], name="r"),
             n("Conv", ["r", "wc"], ["y"], name="cc", pads=[1, 1, 1, 1])]
    return _model(nodes, [1, 4, 8, 8], [1, 8, 8, 8], inits)


@pytest.mark.parametrize("ratio,kept", [(0.5, 8), (0.3, 8), (0.8, 8)])
def test_concat_segments_rounded_each(ratio, kept):
    r = zero_then_remove(concat_model(), ratio=ratio, round_to=8)
    w = {t.name: tuple(t.dims) for t in r["pruned"].graph.initializer}
    outs = sorted(d[0] for k, d in w.items() if k.startswith(("wa", "wb")))
    assert outs == [kept, kept]  # each concat slice a multiple of 8 (the total alone would allow 5 + 11)
    assert next(d for k, d in w.items() if k.startswith("wc"))[1] == 2 * kept


def test_global_allocation_and_ignore():
    g, ctx = cleaned(ops_zoo_seq())
    pl = plan(g, ctx, PruneChannelsConfig(ratio=0.5, allocation="global"))
    before = sum(s["channels_before"] for s in pl.group_stats if s["status"] == "pruned")
    after = sum(s["channels_after"] for s in pl.group_stats if s["status"] == "pruned")
    assert after == before - round(0.5 * before)
    pl = plan(g, ctx, PruneChannelsConfig(ratio=0.5, ignore=("mm*",)))
    assert "ignored" in [s["status"] for s in pl.group_stats]


def test_bn_gamma_reads_gamma_folded_away():
    """cleanup.fold_batchnorm folds BN before the pass; bn_gamma reads gamma from ctx.template."""
    m = ops_zoo_cnn()
    gamma = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "g"))
    g, ctx = cleaned(m)
    assert not any(n.op == "BatchNormalization" for n in g.nodes)
    pl = plan(g, ctx, PruneChannelsConfig(ratio=0.5, criterion="bn_gamma"))
    st = next(s for s in pl.group_stats if "c1" in s["members"])
    assert st["criterion"] == "bn_gamma"
    removed = pl.removed[("bn", 1)]
    assert sorted(removed.tolist()) == sorted(np.argsort(np.abs(gamma))[:8].tolist())


@pytest.mark.parametrize("criterion", ["l1", "l2", "fpgm", "mean_act", "apoz", "taylor", "obs"])
def test_criteria_run_and_differ_from_random(criterion):
    from compressor.data import Samples
    from tests.passes.prune_channels_util import feeds_for

    m = ops_zoo_seq()
    g, ctx = cleaned(m)
    ctx.calib = Samples([feeds_for(m, s) for s in range(4)], None, "test")
    pl = plan(g, ctx, PruneChannelsConfig(ratio=0.5, criterion=criterion))
    st = [s for s in pl.group_stats if s["status"] == "pruned"]
    assert st and all(s["criterion"] == criterion for s in st), st
    if criterion == "l1":  # lowest-L1 filters of the conv (with the consumer's slices) go
        w = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w"))
        assert len(pl.removed[("c", 1)]) == 4


def test_bad_config_is_usage_error():
    with pytest.raises(UsageError):
        PruneChannelsConfig(ratio=1.0)
    with pytest.raises(UsageError):
        PruneChannelsConfig(criterion="random")
    with pytest.raises(UsageError):
        PruneChannelsConfig(allocation="hessian")


def test_reconstruct_reduces_error_on_calibration_data():
    from compressor import runtime
    from compressor.data import load_npz
    from models.zoo import DIGITS_CALIB, DIGITS_ONNX

    model = ir.load(DIGITS_ONNX, {})
    calib = load_npz(DIGITS_CALIB, ir.input_specs(model), "--calib")
    errs = {}
    for rec in (False, True):
        g, ctx = cleaned(model)
        ctx.calib = calib
        res = PASSES.get("prune.channels")(PruneChannelsConfig(ratio=0.5, reconstruct=rec)).run(g, ctx)
        assert res.stats["reconstructed"] == (3 if rec else 0), res.stats
        pruned = ctx.export(g)
        s0, s1 = runtime.session(model), runtime.session(pruned)
        errs[rec] = np.mean([np.square(s0.run(None, f)[0] - s1.run(None, f)[0]).mean() for f in calib.feeds[:64]])
    assert errs[True] < 0.5 * errs[False], errs


def test_cli_structured(cli, tmp_path):
    from models.zoo import DIGITS_CALIB, DIGITS_EVAL, DIGITS_ONNX

    r = cli(DIGITS_ONNX, "--target", "x86", "--structured", "0.3", "--eval", DIGITS_EVAL, "--calib", DIGITS_CALIB,
            "--no-compile", "--no-latency", "-o", tmp_path / "b", "--no-gate")
    assert r.code == 0, r
    import json

    rep = json.loads((tmp_path / "b" / "report.json").read_text())
    p = next(p for p in rep["passes"] if p["name"] == "prune.channels")
    st = p["stats"]
    assert st["groups_pruned"] >= 2 and st["params_after"] < st["params_before"]


@pytest.mark.slow
def test_bench_smoke(capsys):
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_structured", REPO / "bench" / "structured.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[4].strip(): line.split("|") for line in out.splitlines() if line.startswith("| cnn ")}
    assert set(rows) == {"prune.channels", "torch-pruning", "onnxsim"}
    ours = rows["prune.channels"]
    assert 0 < float(ours[6]) < 1.0  # fewer MACs after pruning
    assert float(ours[11]) <= 1e-5  # zero-then-remove oracle
    for tool, r in rows.items():  # every tool either measured or says why not
        assert r[7].strip() or r[12].strip(), tool
