"""End to end: compress digits_cnn --sparsity 0.8 --quantize int8 --calib: quantized sparse model,
onnxruntime chosen as the bundle runtime (and why), zeros preserved, bundle self-check passes."""
from __future__ import annotations

import json
import subprocess
import sys

import onnx
from onnx import numpy_helper

from models.zoo import DIGITS_CALIB, DIGITS_EVAL, DIGITS_ONNX


def test_sparse_int8_digits_end_to_end(cli, tmp_path):
    out = tmp_path / "bundle"
    r = cli(DIGITS_ONNX, "--target", "x86", "--sparsity", "0.8", "--quantize", "int8", "--calib", DIGITS_CALIB,
            "--eval", DIGITS_EVAL, "-o", out)
    assert r.code == 0, r
    assert "RESULT PASSED" in r.out
    rep = json.loads((out / "report.json").read_text())
    rt = rep["runtime"]
    assert rt["name"] == "onnxruntime" and "would dequantize" in rt["reason"] and rt["quantized_ops"]["DequantizeLinear"] > 0
    assert rep["artifact"] is None
    assert any(w.startswith("runtime: onnxruntime (") for w in rep["warnings"])
    assert json.loads((out / "manifest.json").read_text())["runtime"]["name"] == "onnxruntime"
    q = next(p for p in rep["passes"] if p["name"] == "quantize.int8")
    st = q["stats"]
    assert st["mode"] == "static" and st["per_channel"] and st["isa_features"]
    assert st["sparsity"]["zeros_preserved"] and st["sparsity"]["sparsity_after"] >= st["sparsity"]["sparsity_before"] > 0.5
    # artifact-side verification ran on onnxruntime's optimized session
    cands = {c["candidate"] for c in rep["verification"]}
    assert "runtime(onnxruntime, ORT_ENABLE_ALL)" in cands
    assert rep["accuracy"]["artifact"] is not None
    assert rep["accuracy"]["original"] - rep["accuracy"]["compressed"] <= rep["accuracy"]["max_drop"]
    # the bundle's model holds int8 weights behind DequantizeLinear, and is smaller
    m = onnx.load(out / "model.onnx")
    int8 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT8 and numpy_helper.to_array(t).size > 100]
    assert len(int8) >= 2
    # defaults with --calib: the 1-channel stem conv and the final Gemm stay fp32, each a warning with its reason
    rows = {r["layer"]: r for r in st["fp32_layers"]}
    assert set(rows) == {"/features/features.0/Conv", "/classifier/classifier.3/Gemm"}, rows
    assert "stem conv (1 input channel)" in rows["/features/features.0/Conv"]["reason"]
    assert "final layer" in rows["/classifier/classifier.3/Gemm"]["reason"]
    assert sum("kept fp32 (keep_fp32=auto)" in w for w in rep["warnings"]) == 2
    assert set(st["calibration"]["scores"]) == {"minmax", "entropy", "percentile"}
    assert rep["stats"]["compressed"]["bytes_on_disk"] < 0.35 * rep["stats"]["original"]["bytes_on_disk"]
    # on-device self-check: the runner picks onnxruntime from the manifest
    p = subprocess.run([sys.executable, str(out / "run_bundle.py"), str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "runtime=onnxruntime" in p.stdout, p.stdout + p.stderr


def test_bench_quantize_smoke(capsys):
    """Tiny configuration of bench/quantize.py: every variant builds and is measured."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("bench_quantize", REPO / "bench" / "quantize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--models", "mlp", "--quick"]) == 0
    out = capsys.readouterr().out
    for variant in ("| fp32 |", "| int8 static |", "| int8 dynamic |", "| fp16 |", "| int4 |"):
        assert variant in out
    assert "failed:" not in out
