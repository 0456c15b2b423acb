"""Every kernel variant compiles for the CPUs users have, whatever CPU runs the tests (issue 16).

The plain ``x86`` target expands from the host's /proc/cpuinfo; here it is expanded for the CPU
profiles of ``targets.host.CPU_PROFILES`` (Haswell ... Sapphire Rapids, Zen 2-4), next to the fixed
levels and aarch64. For each distinct expansion a child process (an LLVM abort must fail one test,
not kill the worker) compiles ``targets.isa_matrix``'s catalogue -- dense/conv/sparse (unstructured,
1x4, Rx1, RxC, perm)/fused-RNN kernels up to 4096 wide -- through the Relax CPU pipeline and writes
the object code; where this host can execute the ISA it also runs the kernels against numpy oracles.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import targets
from targets.host import CPU_PROFILES, detect_host, profile_host
from targets.x86 import X86Target

ROOT = Path(__file__).resolve().parents[2]


def _matrix() -> list[tuple[str, dict, tuple[str, ...]]]:
    """(test id, tvm target, cpuinfo flags the code needs), one per distinct target dict."""
    seen: dict[str, list] = {}
    for cpu in CPU_PROFILES:
        spec = X86Target().expand("x86", profile_host(cpu))
        key = json.dumps(spec.tvm_target, sort_keys=True)
        seen.setdefault(key, [[], spec.tvm_target, spec.isa_features])[0].append(f"host:{cpu}")
    for tag in ("x86-avx2", "x86-avx512", "x86-avx512vnni", "arm"):
        _, spec = targets.resolve(tag)
        key = json.dumps(spec.tvm_target, sort_keys=True)
        seen.setdefault(key, [[], spec.tvm_target, spec.isa_features if spec.family == "x86" else ("<aarch64>",)])[0].append(tag)
    return [("+".join(names), t, tuple(f)) for names, t, f in seen.values()]


MATRIX = _matrix()


def test_matrix_covers_the_cpus_and_levels():
    ids = "+".join(i for i, _, _ in MATRIX)
    for cpu in ("znver2", "znver3", "znver4", "haswell", "skylake", "skylake-avx512", "icelake-server", "sapphirerapids"):
        assert f"host:{cpu}" in ids
    for tag in ("x86-avx2", "x86-avx512", "arm"):
        assert tag in ids
    # the host expansion names a generic psABI level, never a CPU with its features switched off
    for _, t, _ in MATRIX:
        if t.get("mtriple", "").startswith("x86_64"):
            assert t["mcpu"] in ("x86-64-v3", "x86-64-v4")


def test_host_expansion_per_cpu():
    """Zen 3 builds 8-lane code without AVX-512 (its expansion listed -avx512f, which a substring
    test read as AVX-512); Zen 4 and Sapphire Rapids get 16 lanes and their extensions."""
    from targets.sparse_kernels import llvm_features, vector_floats

    z3 = X86Target().expand("x86", profile_host("znver3"))
    assert z3.tvm_target["mcpu"] == "x86-64-v3" and "-avx512f" in z3.tvm_target["mattr"]
    assert vector_floats(z3.tvm_target) == 8 and "avx512f" not in llvm_features(z3.tvm_target)
    assert {"vaes", "avx2", "fma"} <= llvm_features(z3.tvm_target)
    z4 = X86Target().expand("x86", profile_host("znver4"))
    assert z4.tvm_target["mcpu"] == "x86-64-v4" and vector_floats(z4.tvm_target) == 16
    assert {"avx512vnni", "avx512bf16"} <= llvm_features(z4.tvm_target)
    spr = X86Target().expand("x86", profile_host("sapphirerapids"))
    assert "avx512fp16" in llvm_features(spr.tvm_target) and "amx-int8" in llvm_features(spr.tvm_target)
    assert z3.round_to == 8 and z4.round_to == 16
    # the kernel choice per ISA: the AVX-512 permute kernel only where LLVM has AVX-512
    from targets.sparse_kernels import kernel_params

    assert kernel_params((1, 1), 1, z3.tvm_target, 2048, 2048) == kernel_params((1, 1), 1, "x86")
    assert kernel_params((1, 1), 1, z3.tvm_target, 2048, 2048).lanes == 8
    assert kernel_params((1, 1), 1, z4.tvm_target, 2048, 2048).variant == "perm"
    assert kernel_params((1, 1), 1, spr.tvm_target, 2048, 2048).variant == "perm"
    assert kernel_params((1, 1), 4, z3.tvm_target, 2048, 2048).variant == "xt"
    # runs_here is about this machine, not the profile the spec was built for
    here = detect_host().features
    assert z4.runs_here == (detect_host().arch == "x86_64" and set(z4.isa_features) <= here)


@pytest.mark.parametrize("tvm_target,needs", [(t, f) for _, t, f in MATRIX], ids=[i for i, _, _ in MATRIX])
def test_every_kernel_compiles(tvm_target, needs, tmp_path):
    host = detect_host()
    runs = host.arch == "x86_64" and "<aarch64>" not in needs and set(needs) <= host.features
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "targets.isa_matrix", "--target", json.dumps(tvm_target), "--json", str(out)]
    proc = subprocess.run(cmd + (["--run"] if runs else []), cwd=ROOT, capture_output=True, text=True, timeout=900)
    if proc.returncode < 0:  # killed by a signal: find the kernel by compiling case by case
        each = subprocess.run(cmd + ["--each"], cwd=ROOT, capture_output=True, text=True, timeout=900)
        last = [ln for ln in each.stdout.splitlines() if ln.startswith("compiling ")][-1:]
        err = [ln for ln in (proc.stderr or "").splitlines() if "LLVM ERROR" in ln or "rror" in ln][-1:]
        pytest.fail(f"code generation killed the process (signal {-proc.returncode}) at {last}: {err}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["cases"] and all(c["compiled"] for c in res["cases"].values())
    kinds = " ".join(res["cases"])
    for family in ("sparse_matmul", "sparse_conv1x1", "dense_matmul", "conv stem", "conv depthwise", "fused GRU",
                   "fused LSTM", "4096"):
        assert family in kinds
    if runs:
        ran = [c for c in res["cases"].values() if "max_rel_err" in c]
        assert len(ran) >= 15 and all(c["max_rel_err"] <= 1e-5 for c in ran)


def test_zen3_target_compiles_the_seed_mlp_sparse(cli, tmp_path):
    """The exact failing case of issue 16: a 4-layer 2048-wide MLP at 90% for a Zen 3 (the
    x86 target as a Zen 3 host expands it) aborted LLVM; now it is a sparse bundle, and it runs
    here when this host has AVX2."""
    from models.large import build_mlp_large

    model = build_mlp_large(tmp_path / "mlp.onnx", widths=(2048, 2048, 2048, 2048))
    out = tmp_path / "b"
    r = cli(model, "--target", "x86-znver3", "--sparsity", "0.9", "--no-gate", "--no-latency", "-o", out)
    assert r.code == 0, r.out + r.err
    rep = json.loads((out / "report.json").read_text())
    assert rep["target"]["tvm_target"]["mcpu"] == "x86-64-v3" and "avx512f" not in rep["target"]["isa_features"]
    low = [p for p in rep["target_passes"] if p["name"] == "lower.sparse"][0]
    assert low["stats"]["lowered"] == 3 and rep["sparse_fallback"] is None
    assert rep["artifact"]["path"] == "model_x86_64_znver3.so"
    if {"avx2", "fma"} <= detect_host().features:
        art = [c for c in rep["verification"] if c["candidate"] == "artifact(x86-znver3)" and c["reference"] == "compressed.onnx"]
        assert art and art[0]["passed"]
