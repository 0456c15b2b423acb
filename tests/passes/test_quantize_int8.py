"""quantize.int8: QDQ validity, per-channel scale oracle, zeros preserved, dynamic fallback
reported, target-aware schemes, keep_fp32=auto."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from compressor.data import Samples
from compressor.errors import UsageError
from compressor.pass_base import PassContext, make_config
from compressor.pass_manager import PassManager
from passes import PASSES
from passes import quant_common as qc
from passes.quantize_int8 import int8_scheme
from tests.conftest import conv_bn_model, mlp_model, ort_run


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
    out, recs = run_passes(m, [("cleanup.fold_batchnorm", {}), ("quantize.int8", {})], calib)
    onnx.checker.check_model(out, full_check=True)
    ops = {n.op_type for n in out.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops
    st = recs[-1].stats
    assert st["mode"] == "static" and st["format"] == "QDQ" and st["calibration"]["samples"] == len(calib)
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
    out, recs = run_passes(m, [("cleanup.fold_batchnorm", {}), ("quantize.int8", {})], feeds_for(m), spec(tag))
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
           ("quantize.int8", {"calib_method": calib_method})]
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
    out, recs = run_passes(m, [("cleanup.fold_batchnorm", {}), ("quantize.int8", {})], feeds_for(m), spec("cuda"))
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for n in out.graph.node:
        if n.op_type == "QuantizeLinear":
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and np.all(zp == 0)
    assert recs[-1].stats["isa_features"] == list(spec("cuda").isa_features)


def test_keep_fp32_auto_keeps_most_sensitive_layers_until_target():
    m = conv_bn_model()
    calib = feeds_for(m, 24)
    seq = [("cleanup.fold_batchnorm", {})]
    # unreachable-by-full-int8 target: at least one layer must stay fp32
    out, recs = run_passes(m, seq + [("quantize.int8", {"keep_fp32": "auto", "min_cosine": 0.99999})], calib)
    st = recs[-1].stats["keep_fp32"]
    kept = [k["layer"] for k in st["kept_fp32"]]
    assert kept, st
    sens = st["sensitivity"]
    assert kept[0] == max(sens, key=sens.get)  # most sensitive first
    assert st["target_met"] == (st["fidelity_min_cosine"] >= 0.99999)
    kept_weights = folded_conv_bn()[2]
    for layer in kept:
        assert kept_weights[layer] not in dq_weights(out)  # stays float
    assert all(any(f"{layer}: kept fp32" in w for w in recs[-1].warnings) for layer in kept)
    # easy target: nothing kept
    _, recs = run_passes(m, seq + [("quantize.int8", {"keep_fp32": "auto", "min_cosine": 0.5})], calib)
    assert recs[-1].stats["keep_fp32"]["kept_fp32"] == [] and recs[-1].stats["keep_fp32"]["target_met"]


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


def test_runtime_choice():
    m = mlp_model()
    assert qc.choose_runtime(m, spec("x86"))["name"] == "tvm"
    out, _ = run_passes(m, [("quantize.int8", {})], feeds_for(m))
    rc = qc.choose_runtime(out, spec("x86"))
    assert rc["name"] == "onnxruntime" and "DequantizeLinear" in rc["quantized_ops"] and "dequantize" in rc["reason"]
