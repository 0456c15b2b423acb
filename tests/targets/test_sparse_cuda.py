"""lower.sparse for CUDA: the pass lowers (GEMV/SpMM and 1x1 conv), the converter emits the
CUDA BSR kernels, dlight leaves them alone (tirx.is_scheduled), and the compiled cuda
artifact embeds their sm_80 device code (nvcc fatbin). Compile-only: nothing runs here."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from compressor.pass_base import PassContext
from targets.lower_sparse import DOMAIN, LowerSparse, LowerSparseConfig
from targets import resolve
from targets import sparse_kernels as sk
from targets.cuda import find_nvcc

pytest.importorskip("tvm")
needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="nvcc (CUDA toolkit) not found: cannot build device code")


def _model():
    """MatMul 512x512 (8x1 blocks, 90%) + Relu at batch 1, then a 1x1 conv 64->64 on 8x8 (unstructured 90%)."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((512, 512)) * np.kron(rng.random((64, 512)) < 0.1, np.ones((8, 1)))).astype(np.float32)
    wc = (rng.standard_normal((64, 64)) * (rng.random((64, 64)) < 0.1)).astype(np.float32).reshape(64, 64, 1, 1)
    bc = rng.standard_normal(64).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shp"], ["img"], name="to_img"),
             helper.make_node("Conv", ["img", "Wc", "Bc"], ["y"], name="pw", kernel_shape=[1, 1])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 8, 1])],
                          [numpy_helper.from_array(w1.T.copy(), "W1"), numpy_helper.from_array(wc, "Wc"),
                           numpy_helper.from_array(bc, "Bc"), numpy_helper.from_array(np.array([1, 64, 8, 1], np.int64), "shp")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_cuda_target_requires_lower_sparse():
    assert resolve("cuda")[0].required_passes[-1] == "lower.sparse"


def test_pass_lowers_for_cuda_with_prior_warning():
    _, spec = resolve("cuda")
    model = _model()
    graph = gs.import_onnx(model)
    ctx = PassContext(target=spec, opset=17, template=model)
    res = LowerSparse(LowerSparseConfig(min_speedup=1.0)).run(graph, ctx)
    out = ctx.export(graph)
    assert res.stats["lowered"] == 2, res
    assert {(n.op_type, n.domain) for n in out.graph.node if n.domain} == {("SparseMatMulRelu", DOMAIN), ("SparseConv1x1", DOMAIN)}
    assert all(r["cost_model"] == "cuda prior" for r in res.stats["layers"])
    assert not any("no CUDA lowering" in w for w in res.warnings)
    assert any("bench/cuda_check.py" in w for w in res.warnings)


def test_cuda_kernels_are_marked_scheduled_and_codegen():
    import tvm

    for f in (sk.make_primfunc(4, 64, 64, (8, 1), 40, "relu", "cuda"),
              sk.make_conv1x1_primfunc(2, 200, 64, 32, (4, 1), 30, "relu", "cuda")):
        assert bool(f.attrs["tirx.is_scheduled"])
        tgt = tvm.target.Target({"kind": "cuda", "arch": "sm_80"})
        with tgt:
            ex = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=tgt)
        src = "".join(m.inspect_source() for m in getattr(ex, "mod", ex).imports)
        assert "blockIdx.x" in src and "threadIdx.x" in src


@needs_nvcc
@pytest.mark.slow
def test_cuda_artifact_embeds_bsr_kernels(tmp_path):
    """Full cuda compile of the lowered model: the BSR kernels survive the dlight pass
    unchanged and their device code is in the sm_80 fatbin of the .so."""
    tgt, spec = resolve("cuda")
    model = _model()
    graph = gs.import_onnx(model)
    ctx = PassContext(target=spec, opset=17, template=model)
    LowerSparse(LowerSparseConfig(min_speedup=1.0)).run(graph, ctx)
    path = tmp_path / "lowered.onnx"
    onnx.save(ctx.export(graph), str(path))

    from targets import tvm_backend

    mod = tvm_backend.import_onnx(path, {}, target=spec.tvm_target)
    names = [gv.name_hint for gv in mod.functions]
    assert any(n.startswith("bsr_8x1_relu") for n in names) and any(n.startswith("bsr_conv1x1_1x1") for n in names)
    art = tgt.compile(path, spec, tmp_path, {})
    assert art.details["device_code"]["sass"] == ["sm_80"]
    blob = (tmp_path / art.path).read_bytes()
    # kernel names sit in the CUDA module's function map next to the fatbin
    assert b"bsr_8x1_relu" in blob and b"bsr_conv1x1_1x1_none" in blob


def test_cuda_prior_refuses_too_many_partial_sums():
    from targets.lower_sparse import CUDA_MAX_RM, predict

    ok, basis = predict("MatMul", 4096, 4096, 16, 1, 0.1, (8, 1), "cuda")
    assert ok > 1.2 and basis == "cuda prior"
    too_big, why = predict("MatMul", 4096, 4096, CUDA_MAX_RM // 8 + 1, 1, 0.1, (8, 1), "cuda")
    assert too_big == 0.0 and str(CUDA_MAX_RM) in why


def _bench_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "cuda_check.py"
    spec = importlib.util.spec_from_file_location("bench_cuda_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cuda_check_skips_cleanly_or_passes(capsys):
    mod = _bench_module()
    present, _ = mod.gpu_present()
    rc = mod.main(["--quick", "--patterns", "8x1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    if present:
        assert "NUMERICS FAIL" not in out and out.count("sparse ") == 2
    else:
        assert out.startswith("no GPU")


def test_cuda_check_compile_only_builds_every_kernel(capsys):
    rc = _bench_module().main(["--compile-only", "--quick", "--patterns", "unstructured", "8x1"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count(": built") == 4, out
