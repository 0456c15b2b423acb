"""quantize.int8: QDQ validity, per-channel scale oracle, zeros preserved, dynamic fallback
reported, target-aware schemes, keep_fp32=auto; the defaults (weight ops only, calibration method
and MatMul mode chosen on held-out samples, sensitive layers fp32 with reasons)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.data import Samples
from compressor.errors import UsageError
from compressor.pass_base import PassContext, make_config
from compressor.pass_manager import PassManager
from passes import PASSES
from passes import quant_common as qc
from passes.quantize_int8 import int8_scheme
from tests.conftest import conv_bn_model, make_model, mlp_model, ort_run


def spec(tag: str):
    import targets

    return targets.resolve(tag)[1]


def feeds_for(model: onnx.ModelProto, n: int = 16, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    vi = model.graph.input[0]
    shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return [{vi.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def run_passes(model, passes, calib=None, target=None):
    items = []
    for name, cfg in passes:
        cls = PASSES.get(name)
        items.append((cls(make_config(cls, cfg)), "builtin:test"))
    ctx = PassContext(target=target, calib=None if calib is None else Samples(calib, None, "test"), template=model)
    return PassManager(items).run(model, ctx)


def dq_weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
    """original weight name -> (q, scale, zero point, axis) of every constant DequantizeLinear."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits and n.input[0].endswith("_quantized"):
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            out[n.input[0][: -len("_quantized")]] = (inits[n.input[0]], inits[n.input[1]], inits[n.input[2]], axis)
    return out


def layer_weights(model: onnx.ModelProto) -> dict[str, str]:
    """node name -> weight initializer name of every Conv/Gemm/MatMul (after cleanup passes renamed them)."""
    inits = {t.name for t in model.graph.initializer}
    return {n.name: n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in inits}


def folded_conv_bn():
    m = conv_bn_model()
    folded, _ = run_passes(m, [("cleanup.fold_batchnorm", {})])
    return m, folded, layer_weights(folded)


def test_static_qdq_graph_is_valid_and_close():
    m = conv_bn_model()
    calib = feeds_for(m)
    out, recs = run_passes(m, [("cleanup.fold_batchnorm", {}), ("quantize.int8", {"keep_fp32": "none"})], calib)
    onnx.checker.check_model(out, full_check=True)
    ops = {n.op_type for n in out.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    st = recs[-1].stats
    assert st["mode"] == "static" and st["format"] == "QDQ"
    assert st["calibration"]["samples"] + st["calibration"]["held_out"] == len(calib) and st["calibration"]["held_out"] == 4
    assert st["fp32_layers"] == [] and st["layers_quantized"] == 2
    # every Conv/Gemm weight is an int8 initializer behind a DequantizeLinear
    w = dq_weights(out)
    names = folded_conv_bn()[2]
    assert set(names.values()) <= set(w) and len(names) == 2
    assert all(w[k][0].dtype == np.int8 for k in names.values())
    ref = [ort_run(m, f)[0] for f in calib]
    got = [ort_run(out, f)[0] for f in calib]
    assert qc.fidelity([[g] for g in got], [[r] for r in ref]) > 0.99
    assert st["fidelity_min_cosine"] > 0.99


@pytest.mark.parametrize("tag,qmax", [("x86-avx512vnni", 127), ("x86-avx2", 64)])
def test_per_channel_scales_per_output_channel_oracle(tag, qmax):
    """Symmetric per-channel int8: scale_c = max|w_c| / qmax, q = round(w / scale_c) (reduce_range on AVX2: 7-bit)."""
    m, folded, names = folded_conv_bn()
    fw = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    out, recs = run_passes(m, [("cleanup.fold_batchnorm", {}), ("quantize.int8", {"keep_fp32": "none"})], feeds_for(m), spec(tag))
    assert recs[-1].stats["scheme"]["reduce_range"] is (qmax == 64)
    for name, axis in ((names["conv"], 0), (names["fc"], 0)):
        q, scale, zp, ax = dq_weights(out)[name]
        w = fw[name]
        assert ax == axis and scale.shape == (w.shape[0],) and zp.shape == (w.shape[0],)
        assert np.all(zp == 0)
        absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        np.testing.assert_allclose(scale, absmax / qmax, rtol=1e-6)
        sc = scale.reshape(-1, *[1] * (w.ndim - 1))
        np.testing.assert_array_equal(q, np.clip(np.rint(w / sc), -qmax, qmax).astype(np.int8))
        assert np.abs(q.astype(np.float32) * sc - w).max() <= scale.max() / 2 * (1 + 1e-5)


def test_matmul_per_channel_axis_is_output_column():
    m = mlp_model()
    out, _ = run_passes(m, [("quantize.int8", {})], feeds_for(m))
    w1 = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}["w1"]
    q, scale, zp, axis = dq_weights(out)["w1"]
    assert axis == 1 and scale.shape == (w1.shape[1],)
    np.testing.assert_allclose(scale, np.abs(w1).max(axis=0) / 127, rtol=1e-6)


@pytest.mark.parametrize("calib_method", ["minmax", "entropy", "percentile"])
def test_zeros_stay_exactly_zero_after_sparsity(calib_method):
    m = conv_bn_model()
    seq = [("cleanup.fold_batchnorm", {}), ("sparsify.magnitude", {"sparsity": 0.6, "keep_stem": False, "keep_classifier": False}),
           ("quantize.int8", {"calib_method": calib_method, "keep_fp32": "none"})]
    sparse, _ = run_passes(m, seq[:2])
    sw = {t.name: numpy_helper.to_array(t) for t in sparse.graph.initializer}
    out, recs = run_passes(m, seq, feeds_for(m, 32))
    onnx.checker.check_model(out, full_check=True)
    for name in layer_weights(sparse).values():
        q, scale, zp, axis = dq_weights(out)[name]
        zeros = sw[name] == 0
        assert zeros.mean() == pytest.approx(0.6, abs=0.02)
        deq = (q.astype(np.float32) - zp.reshape(-1, *[1] * (q.ndim - 1))) * scale.reshape(-1, *[1] * (q.ndim - 1))
        assert np.all(deq[zeros] == 0.0)
    sp = recs[-1].stats["sparsity"]
    assert sp["zeros_preserved"] is True and sp["quantized_weights"] == 2
    assert sp["sparsity_after"] >= sp["sparsity_before"] > 0.55


def test_dynamic_without_calibration_is_reported_and_conv_warned():
    out, recs = run_passes(conv_bn_model(), [("cleanup.fold_batchnorm", {}), ("quantize.int8", {})])
    st, warns = recs[-1].stats, " ".join(recs[-1].warnings)
    assert st["mode"] == "dynamic" and st["calibration"] is None
    assert "ConvInteger" in st["quantized_ops"]
    assert "no calibration data: dynamic int8" in warns and "SLOW" in warns
    x = feeds_for(conv_bn_model(), 1)[0]
    assert qc.cosine(ort_run(out, x)[0], ort_run(conv_bn_model(), x)[0]) > 0.98
    # MLP: dynamic MatMulInteger, no conv warning
    _, recs = run_passes(mlp_model(), [("quantize.int8", {})])
    assert "MatMulInteger" in recs[-1].stats["quantized_ops"]
    assert not any("SLOW" in w for w in recs[-1].warnings)


def test_op_block_list_keeps_convs_float():
    out, recs = run_passes(conv_bn_model(), [("cleanup.fold_batchnorm", {}), ("quantize.int8", {"op_block_list": ["Conv"]})])
    assert "ConvInteger" not in recs[-1].stats["quantized_ops"] and "MatMulInteger" in recs[-1].stats["quantized_ops"]
    assert not any("SLOW" in w for w in recs[-1].warnings)


def test_target_schemes_and_isa_features():
    vnni, avx2, arm, cuda = (int8_scheme(spec(t)) for t in ("x86-avx512vnni", "x86-avx2", "arm", "cuda"))
    assert (vnni.activation, vnni.weight, vnni.reduce_range, vnni.isa_features) == ("uint8", "int8", False, ("avx512_vnni",))
    assert (avx2.activation, avx2.reduce_range, avx2.isa_features) == ("uint8", True, ("avx2",))
    assert (arm.activation, arm.weight, arm.reduce_range) == ("int8", "int8", False)
    assert cuda.symmetric_activations and cuda.op_types == ("Conv", "Gemm", "MatMul")
    # cuda: activations symmetric int8 (zero point 0), only Conv/Gemm/MatMul inputs quantized
    m = conv_bn_model()
    out, recs = run_passes(m, [("cleanup.fold_batchnorm", {}), ("quantize.int8", {"keep_fp32": "none"})], feeds_for(m), spec("cuda"))
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for n in out.graph.node:
        if n.op_type == "QuantizeLinear":
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and np.all(zp == 0)
    assert recs[-1].stats["isa_features"] == list(spec("cuda").isa_features)


def deep_mlp(seed: int = 0) -> onnx.ModelProto:
    """x[1,16] -> mm1 -> Relu -> mm2 -> Relu -> mm3 -> Relu -> mm4 (the final layer)."""
    rng = np.random.default_rng(seed)
    dims = [16, 32, 32, 32, 4]
    inits = {f"w{i}": (rng.standard_normal((dims[i - 1], dims[i])) / np.sqrt(dims[i - 1])).astype(np.float32)
             for i in range(1, 5)}
    nodes, x = [], "x"
    for i in range(1, 5):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        if i < 4:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                      [helper.make_tensor_value_info("h4", TensorProto.FLOAT, [1, 4])], inits)


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,12,12] -> stem conv(3->8) -> Relu -> conv 1x1(8->16) -> Relu -> depthwise 3x3(16) -> Relu
    -> conv 1x1(16->16) -> GlobalAveragePool -> Flatten -> Gemm(10)."""
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = {"w0": f(8, 3, 3, 3), "w1": f(16, 8, 1, 1), "wd": f(16, 1, 3, 3), "w2": f(16, 16, 1, 1), "fc": f(10, 16)}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"], name="r0"),
             helper.make_node("Conv", ["r0", "w1"], ["c1"], name="pw1"),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "wd"], ["cd"], name="dw", group=16, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["cd"], ["rd"], name="rd"),
             helper.make_node("Conv", ["rd", "w2"], ["c2"], name="pw2"),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["fl"], name="flatten"),
             helper.make_node("Gemm", ["fl", "fc"], ["y"], name="classifier", transB=1)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)


def outlier_encoder(seed: int = 0, outlier: float = 300.0) -> onnx.ModelProto:
    """An attention block whose residual stream carries one outlier channel (bias 300, then a gain of
    0.002 takes it back out, as LayerNorm gammas do in real encoders):
    x[1,8,32] -> proj MatMul -> +bias -> *gain -> self-attention (Softmax) -> +residual -> ffn -> Relu -> head."""
    rng = np.random.default_rng(seed)
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    b1 = (0.1 * rng.standard_normal(32)).astype(np.float32)
    b1[5] = outlier
    gain = np.ones(32, np.float32)
    gain[5] = 0.002
    inits = {"w1": f(32, 32), "b1": b1, "gain": gain, "w2": f(32, 16), "w3": f(16, 8), "temp": np.array(0.2, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"], name="proj"),
             helper.make_node("Add", ["a", "b1"], ["h"], name="bias"),
             helper.make_node("Mul", ["h", "gain"], ["n"], name="gain"),
             helper.make_node("Transpose", ["n"], ["nt"], name="tr", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["n", "nt"], ["sc"], name="scores"),
             helper.make_node("Mul", ["sc", "temp"], ["scs"], name="scale"),
             helper.make_node("Softmax", ["scs"], ["att"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["att", "n"], ["ctx"], name="context"),
             helper.make_node("Add", ["ctx", "n"], ["o"], name="residual"),
             helper.make_node("MatMul", ["o", "w2"], ["y"], name="ffn"),
             helper.make_node("Relu", ["y"], ["yr"], name="relu"),
             helper.make_node("MatMul", ["yr", "w3"], ["z"], name="head")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])],
                      [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 8])], inits)


OLD_DEFAULTS = {"op_types": ["all"], "calib_method": "minmax", "keep_fp32": "none", "matmul": "static"}  # before issue 17


def quantized_tensors(model: onnx.ModelProto) -> set[str]:
    """Float tensors a QuantizeLinear / DynamicQuantizeLinear reads (a graph output quantized in place
    is renamed NAME_QuantizeLinear_Input)."""
    return {n.input[0].removesuffix("_QuantizeLinear_Input") for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")}


def test_default_quantizes_weight_ops_only():
    """Default op_types: only Conv/Gemm/MatMul-with-constant-weight inputs and outputs get QDQ; the
    attention MatMuls, Add, Mul, Softmax stay float. op_types [all] puts QDQ around them too."""
    m = outlier_encoder()
    weight_io = {t for n in m.graph.node if n.name in ("proj", "ffn", "head") for t in (*n.input, *n.output)}
    calib = feeds_for(m, 16)
    out, recs = run_passes(m, [("quantize.int8", {"keep_fp32": "none", "matmul": "static"})], calib)
    st = recs[-1].stats
    assert st["op_types"] == ["Conv", "Gemm", "MatMul"] and st["scheme"]["op_types"] == ["Conv", "Gemm", "MatMul"]
    q = quantized_tensors(out)
    assert q and q <= weight_io, q - weight_io
    assert {n.name for n in out.graph.node if n.op_type in ("MatMul",) and n.name in ("scores", "context")} == {"scores", "context"}
    assert st["layers_quantizable"] == 3 and st["layers_quantized"] == 3
    old, recs = run_passes(m, [("quantize.int8", OLD_DEFAULTS)], calib)
    assert recs[-1].stats["op_types"] == "all supported"
    assert {"h", "n", "sc", "att", "o"} <= quantized_tensors(old)


def test_default_keeps_outlier_model_close_where_old_config_collapsed():
    m = outlier_encoder()
    calib, test = feeds_for(m, 32), feeds_for(m, 16, seed=7)
    ref = qc.run_model(m, test)
    old, _ = run_passes(m, [("quantize.int8", OLD_DEFAULTS)], calib)
    new, recs = run_passes(m, [("quantize.int8", {})], calib)
    old_cos, new_cos = qc.fidelity(qc.run_model(old, test), ref), qc.fidelity(qc.run_model(new, test), ref)
    assert old_cos < 0.99 and new_cos >= 0.99, (old_cos, new_cos)
    st = recs[-1].stats
    # attention model: static and dynamic MatMuls both measured, the closer kept
    mm = st["matmul"]
    assert mm["attention"] is True and set(mm["scores"]) == {"static", "dynamic"}
    err = {k: 1 - v for k, v in mm["scores"].items()}
    assert mm["mode"] == ("dynamic" if err["dynamic"] <= 0.9 * err["static"] else "static")
    assert st["quantized_ops"].get("MatMulInteger" if mm["mode"] == "dynamic" else "DequantizeLinear", 0) >= 1
    # the final layer stays fp32, with its reason and measured error
    assert [r["layer"] for r in st["fp32_layers"]] == ["head"]
    assert any(w.startswith("head: kept fp32") and "final layer" in w and "output cosine" in w for w in recs[-1].warnings)


def test_calibration_method_chosen_on_held_out_samples():
    m = small_cnn()
    calib = feeds_for(m, 16)
    _, recs = run_passes(m, [("quantize.int8", {"keep_fp32": "none"})], calib)
    cal = recs[-1].stats["calibration"]
    assert set(cal["scores"]) == {"minmax", "entropy", "percentile"}
    assert cal["method"] == max(cal["scores"], key=cal["scores"].get)
    assert (cal["samples"], cal["held_out"]) == (12, 4) and "held-out" in cal["chosen_by"]
    assert recs[-1].stats["matmul"] is None  # no MatMul layer
    # an explicit method is used as given, nothing scored
    _, recs = run_passes(m, [("quantize.int8", {"keep_fp32": "none", "calib_method": "entropy"})], calib)
    cal = recs[-1].stats["calibration"]
    assert cal["method"] == "entropy" and cal["scores"] == {} and cal["chosen_by"] == "config"


def test_sensitive_layers_kept_fp32_with_reasons():
    """With calibration data, keep_fp32 auto (the default) keeps the stem, depthwise and final layers
    fp32: a warning and a stats row each, with the measured error; keep_fp32 none quantizes all."""
    m = small_cnn()
    calib = feeds_for(m, 16)
    out, recs = run_passes(m, [("quantize.int8", {})], calib)
    st, warns = recs[-1].stats, recs[-1].warnings
    rows = {r["layer"]: r for r in st["fp32_layers"]}
    assert set(rows) == {"stem", "dw", "classifier"}
    assert all(r["why"] == "keep_fp32 (structure)" and 0 < r["cosine_if_quantized"] <= 1 for r in rows.values())
    for layer, why in (("stem", "stem conv (3 input channels)"), ("dw", "depthwise conv (16 channels, 9 weights per filter)"),
                       ("classifier", "final layer (last weighted op before output y)")):
        assert any(w.startswith(f"{layer}: kept fp32 (keep_fp32=auto): {why}; quantizing only this layer gives output cosine")
                   for w in warns), (layer, warns)
    assert st["layers_quantized"] == 2 and st["keep_fp32"]["target_met"]
    assert set(dq_weights(out)) == {"w1", "w2"}
    _, recs = run_passes(m, [("quantize.int8", {"keep_fp32": "none"})], calib)
    assert recs[-1].stats["fp32_layers"] == [] and recs[-1].stats["layers_quantized"] == 5
    assert not any("kept fp32" in w for w in recs[-1].warnings)
    assert qc.structural_sensitive_layers(gs.import_onnx(m), ["stem", "pw1", "dw", "pw2", "classifier"]) == {
        "stem": "stem conv (3 input channels)", "dw": "depthwise conv (16 channels, 9 weights per filter)",
        "classifier": "final layer (last weighted op before output y)"}


def test_keep_fp32_auto_keeps_most_sensitive_layers_until_target():
    m = deep_mlp()
    calib = feeds_for(m, 24)
    # unreachable-by-full-int8 target: layers beyond the final one must stay fp32, most sensitive first
    out, recs = run_passes(m, [("quantize.int8", {"min_cosine": 0.99999})], calib)
    st = recs[-1].stats["keep_fp32"]
    kept = st["kept_fp32"]
    assert kept[0]["layer"] == "mm4" and kept[0]["rule"] == "structure"
    searched = [k for k in kept if k["rule"] == "sensitivity"]
    assert searched, st
    sens = {k: v for k, v in st["sensitivity"].items() if k != "mm4"}
    assert searched[0]["layer"] == max(sens, key=sens.get) and searched[0]["rank"] == 1  # most sensitive first
    assert st["target_met"] == (st["fidelity_min_cosine"] >= 0.99999)
    for k in kept:
        assert f"w{k['layer'][2:]}" not in dq_weights(out)  # stays float
        assert any(w.startswith(f"{k['layer']}: kept fp32") for w in recs[-1].warnings)
    assert {r["layer"] for r in recs[-1].stats["fp32_layers"]} == {k["layer"] for k in kept}
    # easy target: only the structural keep
    _, recs = run_passes(m, [("quantize.int8", {"min_cosine": 0.5})], calib)
    assert [k["layer"] for k in recs[-1].stats["keep_fp32"]["kept_fp32"]] == ["mm4"]
    assert recs[-1].stats["keep_fp32"]["target_met"]


def test_keep_fp32_auto_without_calibration_warns():
    _, recs = run_passes(mlp_model(), [("quantize.int8", {"keep_fp32": "auto"})])
    assert any("keep_fp32=auto needs calibration data" in w for w in recs[-1].warnings)


def test_config_and_mode_errors():
    cls = PASSES.get("quantize.int8")
    with pytest.raises(UsageError):
        make_config(cls, {"calib_method": "kl"})
    with pytest.raises(UsageError):
        make_config(cls, {"mode": "fast"})
    with pytest.raises(UsageError):
        run_passes(mlp_model(), [("quantize.int8", {"mode": "static"})])
    for bad in ({"op_types": ["Add"]}, {"op_types": []}, {"matmul": "int4"}):
        with pytest.raises(UsageError):
            make_config(cls, bad)
    assert make_config(cls, {}).keep_fp32 == "auto" and make_config(cls, {}).calib_method == "auto"


def test_runtime_choice():
    m = mlp_model()
    assert qc.choose_runtime(m, spec("x86"))["name"] == "tvm"
    out, _ = run_passes(m, [("quantize.int8", {})], feeds_for(m))
    rc = qc.choose_runtime(out, spec("x86"))
    assert rc["name"] == "onnxruntime" and "DequantizeLinear" in rc["quantized_ops"] and "dequantize" in rc["reason"]
