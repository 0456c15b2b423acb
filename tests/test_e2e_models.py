"""End to end through the CLI: every model in models/ for every target.

x86: the artifact is compiled, loaded and run here; its outputs must match
onnxruntime within the gate (compile gate: cosine >= 0.9999 vs the compressed
ONNX). arm: the .so must be an aarch64 ELF. cuda: the artifact must contain
device code for the requested sm_ architecture.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from models.build import MODEL_NAMES
from models.zoo import ensure_built, shared_cache_dir
from tests.conftest import sha256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    return shared_cache_dir(tmp_path_factory)


def _elf_machine(path) -> int:
    data = path.read_bytes()[:20]
    assert data[:4] == b"\x7fELF"
    return int.from_bytes(data[18:20], "little")


@pytest.mark.parametrize("target", ["x86", "arm", "cuda"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_target(cli, tmp_path, zoo_dir, name, target):
    model = ensure_built(name, zoo_dir)
    h = sha256(model)
    out = tmp_path / "bundle"
    r = cli(model, "--target", target, "--sparsity", "0.3", "-o", out, "--no-gate", "--verify-samples", "4")
    assert r.code == 0, r
    assert sha256(model) == h
    assert r.out.strip().splitlines()[-1].startswith("RESULT PASSED"), r
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    art = manifest["artifact"]
    assert art is not None, report["warnings"]
    so = out / art["path"]
    assert manifest["files"][art["path"]]["sha256"] == sha256(so)
    assert report["stats"]["compressed"]["sparsity"] > 0.2
    comps = {(c["candidate"], c["reference"]): c for c in report["verification"]}
    assert comps[("compressed.onnx", "original.onnx")]["n_samples"] == 4
    if target == "x86":
        assert _elf_machine(so) == 62  # EM_X86_64
        compile_check = comps[("artifact(x86)", "compressed.onnx")]
        assert compile_check["passed"], compile_check
        assert all(o["cosine"] >= 0.9999 for o in compile_check["outputs"])
        # the shipped on-device runner agrees
        for flag in ([], ["--tvm"]):  # the default runtime (measured faster one) and the TVM artifact itself
            p = subprocess.run([sys.executable, str(out / "run_bundle.py"), *flag], capture_output=True, text=True, timeout=300)
            assert p.returncode == 0 and "SELFCHECK PASSED" in p.stdout, p.stdout + p.stderr
        assert "runtime=tvm" in p.stdout
    elif target == "arm":
        assert _elf_machine(so) == 183  # EM_AARCH64
        assert "asimd" in manifest["required_isa_features"]  # NEON, as /proc/cpuinfo names it
    else:
        arch = manifest["target"]["tvm_target"]["arch"]
        assert arch.startswith("sm_")
        assert arch.encode() in so.read_bytes() or art.get("cuda_arch") == arch
