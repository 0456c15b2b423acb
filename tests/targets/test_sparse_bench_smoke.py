"""Smoke configuration of bench/sparse_kernels.py: runs all three engines, checks numerics."""
from __future__ import annotations

import importlib.util
from pathlib import Path


def test_sparse_kernel_bench_smoke(capsys):
    path = Path(__file__).resolve().parents[2] / "bench" / "sparse_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_sparse_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--sizes", "128", "--batches", "1", "4", "--sparsities", "0.9",
                   "--patterns", "unstructured", "8x1", "--rounds", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("vs ort") == 4 and "NUMERICS FAIL" not in out


def test_sparse_kernel_bench_conv1x1_smoke(capsys):
    path = Path(__file__).resolve().parents[2] / "bench" / "sparse_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_sparse_kernels_conv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rc = mod.main(["--conv1x1", "--conv-shapes", "32:49", "--sparsities", "0.9", "--patterns", "unstructured", "8x1",
                   "--rounds", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert out.count("vs ort") == 2 and "conv1x1/mt" in out and "NUMERICS FAIL" not in out
